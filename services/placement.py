"""Where each kind of actor asks to run on a Ray cluster (`prefer_labelled_nodes`).

An operator labels nodes for the kinds they should host, e.g.
`ray start --labels='{"promptrec-shards": "yes", "promptrec-consumers": "yes"}'`. Each
actor then asks for such a node first and for any node second (Ray's `label_selector`
with a `fallback_strategy`), so that when its node is lost Ray restarts it on another
one instead of leaving it pending. Off (the default), Ray places every actor itself.
"""

from __future__ import annotations

from typing import Any

from services.config import Settings

KINDS = ("registries", "shards", "consumers", "replicas", "train")
LABELLED = "yes"


def node_label(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown actor kind {kind!r}: one of {KINDS}")
    return f"promptrec-{kind}"


def actor_options(settings: Settings, kind: str) -> dict[str, Any]:
    """Ray actor options for an actor of `kind`: a labelled node first, then any."""
    if not settings.infra.prefer_labelled_nodes:
        return {}
    return {"label_selector": {node_label(kind): LABELLED},
            "fallback_strategy": [{"label_selector": {}}]}


def train_label_selector(settings: Settings) -> dict[str, str] | None:
    """Ray Train's workers take no fallback: the train label when a live node has it
    now (a round starts after the check), else None (anywhere)."""
    if not settings.infra.prefer_labelled_nodes:
        return None
    import ray

    label = node_label("train")
    if any(n["Alive"] and n.get("Labels", {}).get(label) == LABELLED for n in ray.nodes()):
        return {label: LABELLED}
    return None
