"""The prequential result file, its README table and its plot (HR@10 per window)."""

from __future__ import annotations

from pathlib import Path

from bench.prequential import Evaluation

BASELINES = ("popularity", "recent_popularity")
LEARNING_ARMS = ("online", "rounds_only")  # the arms that follow rounds


def build_result(evaluation: Evaluation, **meta) -> dict:
    return {**meta,
            "arms": {name: t.summary() for name, t in evaluation.totals.items()},
            "segments": {name: {seg: t.summary() for seg, t in segs.items()}
                         for name, segs in evaluation.segments.items()},
            "blocks": block_wins(evaluation.windows, meta.get("rounds", [])),
            "leak_check": {name: c.to_dict() for name, c in evaluation.leaks.items()},
            # answers (one per user and window) that read the user's profile text
            "profile_reads": {name: evaluation.profile_reads[name] for name in evaluation.totals},
            "phase_seconds": {name: round(v, 1) for name, v in evaluation.seconds.items()},
            "windows": evaluation.windows}


def block_wins(windows: list[dict], rounds: list[dict], min_events: int = 1000) -> dict:
    """From the first published round on, consecutive windows grouped into blocks of at
    least `min_events` sampled events (so that a block's difference is not noise; a last,
    smaller rest is left out), and in how many blocks each learning arm's HR@10 is above
    each baseline's (a tie is no win)."""
    published = [r["after_events"] for r in rounds if r.get("outcome") == "published"]
    start = published[0] if published else None
    series: list[dict] = []
    block: list[dict] = []
    evaluated = 0
    for w in windows:
        if start is None or w["first_event"] < start or not w["arms"]:
            continue
        block.append(w)
        evaluated += w["evaluated"]
        if evaluated >= min_events:
            names = block[0]["arms"]
            hits = {a: sum(b["arms"][a]["hr10"] * b["arms"][a]["events_evaluated"]
                           for b in block) for a in names}
            series.append({"first_event": block[0]["first_event"],
                           "end_event": w["first_event"] + w["events"],
                           "events_evaluated": evaluated,
                           "hr10": {a: round(h / evaluated, 4) for a, h in hits.items()}})
            block, evaluated = [], 0
    wins = {arm: {base: sum(b["hr10"][arm] > b["hr10"][base] for b in series)
                  for base in BASELINES if series and base in series[0]["hr10"]}
            for arm in LEARNING_ARMS if series and arm in series[0]["hr10"]}
    return {"min_sampled_events": min_events, "from_event": start, "count": len(series),
            "wins": wins, "series": series}


def markdown_table(result: dict) -> str:
    lines = ["| arm | HR@10 | NDCG@10 | events evaluated |", "|---|---|---|---|"]
    for name, arm in result["arms"].items():
        lines.append(f"| {name} | {arm['hr10']} | {arm['ndcg10']} | {arm['events_evaluated']:,} |")
    blocks = result.get("blocks") or {}
    for arm, against in blocks.get("wins", {}).items():
        for base, won in against.items():
            lines.append(f"\n{arm} above {base} in {won} of {blocks['count']} blocks of "
                         f">= {blocks['min_sampled_events']:,} sampled events after the "
                         f"first round")
    return "\n".join(lines)


def smoothed_hr(windows: list[dict], arm: str, span: int) -> list[float]:
    """HR@10 over the last `span` windows that had sampled events (hits / evaluated),
    one value per such window."""
    hits = [w["arms"][arm]["hr10"] * w["arms"][arm]["events_evaluated"] for w in windows]
    counts = [w["arms"][arm]["events_evaluated"] for w in windows]
    out = []
    for i in range(len(windows)):
        lo = max(0, i - span + 1)
        out.append(sum(hits[lo:i + 1]) / max(1, sum(counts[lo:i + 1])))
    return out


def plot(result: dict, path: Path, span: int = 10) -> Path:
    """HR@10 per arm over the replay (mean over the last `span` windows: one window alone
    holds few sampled events); dotted lines where a round published a version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = [w for w in result["windows"] if w["arms"]]
    x = [(w["first_event"] + w["events"]) / 1000 for w in windows]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    styles = {"rounds_only": "--", "personal_only": "--"}  # ablations: dashed
    for name, total in result["arms"].items():
        ax.plot(x, smoothed_hr(windows, name, span), linestyle=styles.get(name, "-"),
                linewidth=1.6, label=f"{name} (total HR@10 {total['hr10']})")
    for i, r in enumerate(r for r in result["rounds"] if r["outcome"] == "published"):
        ax.axvline(r["after_events"] / 1000, color="grey", linestyle=":", linewidth=1,
                   label="round published" if i == 0 else None)
    ax.set_xlabel("events replayed (thousands)")
    ax.set_ylabel(f"HR@10, last {span} windows ({span * result['window_events']:,} events)")
    sample = result["sample"]
    ax.set_title(f"Prequential HR@10, {result['dataset']}, {result['events_replayed']:,} events "
                 f"in windows of {result['window_events']:,}; 1 event in {sample.get('every')} "
                 f"tested after a {sample.get('warmup', 0):.0%} warm-up", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":  # re-draw a result file's plot: python -m bench.prequential_report FILE
    import json
    import sys

    for name in sys.argv[1:]:
        print(plot(json.loads(Path(name).read_text()), Path(name).with_suffix(".png")))
