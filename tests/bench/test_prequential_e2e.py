"""The prequential evaluator end to end on a small MovieLens-100K slice, against the real
broker, local Ray, Ray Train and Ray Serve (the default arms, one training round)."""

from __future__ import annotations

import json

import pytest

from bench.prequential import SampleRule
from bench.prequential_run import run_prequential
from services.config_sources import load_settings
from services.embedded import free_port
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.slow

EVENTS, WINDOW, SAMPLE = 2000, 200, SampleRule(every=4, warmup=0.25)


def test_prequential_on_an_ml100k_slice(tmp_path):
    settings = load_settings(env={}, overrides={
        "data_dir": str(tmp_path / "promptrec"), "http_port": free_port(),
        "metrics_port": free_port(), "partitions": 2, "num_consumers": 1, "num_shards": 2,
        "num_replicas": 1, "train_workers": 1, "train_steps": 2, "batch_size": 8,
        "val_users": 20, "gate_margin": 1.0, "train_every_events": 1000, "log_flush_s": 0.2,
        "namespace": "promptrec-prequential", "cache_dir": str(TEST_CACHE)})
    out = tmp_path / "prequential_ml-100k.json"
    result = run_prequential(settings, out, window=WINDOW, sample=SAMPLE, max_events=EVENTS,
                             progress=False, command="pytest", recent_window=500)

    # The output format: the file is the result; per-arm totals and per-window series.
    assert json.loads(out.read_text()) == result
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    expected = sum(SAMPLE(p, EVENTS) for p in range(EVENTS))
    assert list(result["arms"]) == ["popularity", "recent_popularity", "static", "online"]
    assert result["recent_window_events"] == 500
    for arm in result["arms"].values():
        assert set(arm) == {"hr10", "ndcg10", "events_evaluated"}
        assert arm["events_evaluated"] == expected
        assert 0 <= arm["ndcg10"] <= arm["hr10"] <= 1
    assert result["arms"]["popularity"]["hr10"] > 0  # MovieLens has popular items
    windows = result["windows"]
    assert len(windows) == EVENTS // WINDOW
    assert sum(w["evaluated"] for w in windows) == expected
    assert all(w["ts_start"] <= w["ts_end"] <= n["ts_start"]
               for w, n in zip(windows, windows[1:], strict=False))
    for key in ("dataset", "events_replayed", "window_events", "sample", "rounds",
                "rounds_published", "wall_seconds", "command", "leak_check"):
        assert key in result

    # Each arm ran the app it claims: static pinned without personal prompts.
    apps = result["arm_apps"]
    assert apps["static"] == {"route": "/static", "prompt_version": 1, "pinned": True,
                              "personal_prompts": False, "profiles": True}
    assert apps["online"] == {"route": "/", "prompt_version": 1, "pinned": False,
                              "personal_prompts": True, "profiles": True}
    assert result["profiles_published"] == 0 and set(result["profile_reads"].values()) == {0}

    # No leak: every answer used exactly the user's events before its window, none of it.
    for arm, check in result["leak_check"].items():
        assert check["answers"] > 0 and check["ahead"] == 0, (arm, check)
        assert check["behind"] == 0, (arm, check)  # and the evaluator waited for the past

    # Rounds happen as in production, and only the online arm follows them.
    assert [r["after_events"] for r in result["rounds"]] == [1000]
    assert result["rounds"][0]["outcome"] == "published", result["rounds"]
    version = result["rounds"][0]["version"]
    for w in windows:
        if w["arms"]:
            assert w["arms"]["static"]["prompt_versions"] == [1]
            online = w["arms"]["online"]["prompt_versions"]
            assert online == ([version] if w["first_event"] >= 1000 else [1]), w


def _one_shard_settings(tmp_path, namespace: str, **changes):
    """A one-shard, one-replica stack whose rounds (2 steps) always publish."""
    return load_settings(env={}, overrides={
        "data_dir": str(tmp_path / "promptrec"), "http_port": free_port(),
        "metrics_port": free_port(), "partitions": 2, "num_consumers": 1, "num_shards": 1,
        "num_replicas": 1, "train_workers": 1, "train_steps": 2, "batch_size": 8,
        "val_users": 20, "gate_margin": 1.0, "train_every_events": 1000, "log_flush_s": 0.2,
        "namespace": namespace, "cache_dir": str(TEST_CACHE), **changes})


def test_a_profile_run_publishes_the_profiles_first_and_one_arm_reads_none(tmp_path):
    """With user_text, the data set's 943 profiles are in the shards before the first
    window: every online answer reads one, the no_profiles arm (same versions) never."""
    settings = _one_shard_settings(tmp_path, "promptrec-prequential-profiles",
                                   user_text=True)
    arms = ("popularity", "online", "no_profiles")
    result = run_prequential(settings, tmp_path / "p.json", window=WINDOW, sample=SAMPLE,
                             max_events=EVENTS, progress=False, command="pytest", arms=arms)
    assert result["profiles_published"] == 943 and result["settings"]["user_text"] is True
    answers = {arm: check["answers"] for arm, check in result["leak_check"].items()}
    assert answers["online"] > 0
    assert result["profile_reads"] == {"popularity": 0, "online": answers["online"],
                                       "no_profiles": 0}
    assert result["arm_apps"]["no_profiles"]["profiles"] is False
    assert result["arm_apps"]["online"]["profiles"] is True
    # Both follow the rounds: the comparison is of reading profiles, on the same versions.
    version = result["rounds"][0]["version"]
    assert result["rounds"][0]["outcome"] == "published", result["rounds"]
    assert set(result["rounds"][0]["publish_to_live_ms"]) == {"/", "/no_profiles"}
    last = result["windows"][-1]["arms"]
    assert last["online"]["prompt_versions"] == last["no_profiles"]["prompt_versions"] == \
        [version]
    assert result["segments"]["online"]["new_users"]["events_evaluated"] > 0


def test_the_prequential_replay_drives_the_canary(tmp_path):
    """A round's version is first a canary; the replay's sampled events quote the answer
    they tested, so the live metrics credit them, and the judge decides during the replay
    (a margin of 1: any canary with enough events is promoted)."""
    settings = _one_shard_settings(tmp_path, "promptrec-prequential-canary",
                                   canary_share=0.5, canary_min_events=30, canary_margin=1.0)
    result = run_prequential(settings, tmp_path / "p.json", window=WINDOW, sample=SAMPLE,
                             max_events=EVENTS, progress=False, command="pytest",
                             arms=("popularity", "online"))
    version = result["rounds"][0]["version"]
    assert result["rounds"][0]["outcome"] == "published", result["rounds"]
    record = result["canary"]
    assert record["share"] == 0.5
    outcome = next(o for o in record["outcomes"] if o["version"] == version)
    assert outcome["outcome"] == "promote", record
    verdict = next(v for v in record["verdicts"] if v["prompt_version"] == version)
    assert min(verdict["canary"]["events"], verdict["serving"]["events"]) >= 30, verdict
    assert record["serving_at_end"] == version
    # Credited by the request id each sampled event quoted, not guessed by time.
    assert record["live_counts"]["attributed"] >= 60, record
