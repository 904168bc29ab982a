"""One training round: event log -> Ray Train (DDP) -> validation gate -> registry.

    examples from the log  ──►  long-lived TorchTrainer run  ──►  candidate prompt
    warm start: serving version   (training/trainer.py: workers     │
                                   stay up between rounds)          ▼
    publish if finite and held-out NDCG@10 >= serving's - gate_margin, else reject
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
import ray

from services import metrics
from services.catalog import Catalog
from services.config import Settings
from services.eventlog import read_event_log
from services.model import (
    BadPromptWeights,
    PromptRecModel,
    has_item_weights,
    load_backbone,
    prompt_from_bytes,
    prompt_structure,
    prompt_to_bytes,
    resolve_backbone_path,
    unseen_items_fall_back_to_text,
)
from training.examples import Examples, build_examples
from training.step import evaluate
from training.trainer import LongLivedTrainer

log = logging.getLogger(__name__)

MIN_TRAIN_EXAMPLES = 64


@dataclass
class RoundResult:
    round: int
    outcome: str  # published | rejected | skipped | failed
    reason: str
    version: int | None
    serving_version: int
    train_examples: int
    val_examples: int
    loss: float | None
    candidate_ndcg10: float | None
    serving_ndcg10: float | None
    candidate_hr10: float | None
    serving_hr10: float | None
    fit_seconds: float  # posting the round -> candidate back (includes any run start-up)
    train_seconds: float  # of which in training steps
    started_run: bool  # this round started the Ray Train run (pays its start-up)
    seconds: float

    @property
    def overhead_share(self) -> float | None:
        """Share of the round not spent in training steps (start-up, data, gate)."""
        return None if not self.seconds else 1 - self.train_seconds / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "overhead_share": self.overhead_share}


class RoundRunner:
    """Runs training rounds against the registry; keeps the gate's model loaded."""

    def __init__(self, settings: Settings, catalog: Catalog, registry):
        self.settings = settings
        self.catalog = catalog
        self.registry = registry
        self.round = 0
        self.last_ingest_ts = 0.0
        self._backbone_path = str(resolve_backbone_path(settings.model.backbone_path))
        self._gate_model: PromptRecModel | None = None
        self.trainer = LongLivedTrainer(settings, self._backbone_path)

    def _evaluate(self, blob: bytes, examples: Examples) -> dict[str, float]:
        state = prompt_from_bytes(blob)
        if self._gate_model is None:
            _, encoder = load_backbone(self._backbone_path)
            self._gate_model = PromptRecModel(encoder, state)
        elif prompt_structure(state) != self._gate_model.structure():
            self._gate_model = PromptRecModel(self._gate_model.encoder, state)
        self._gate_model.load_prompt_state(state)
        return evaluate(self._gate_model, examples, self.catalog.vectors,
                        personal_alpha=self.settings.streaming.personal_alpha)

    def run(self, since_ingest_ts: float | None = None) -> RoundResult:
        """One round; never raises for a bad round (it is counted and reported)."""
        self.round += 1
        started = time.monotonic()
        since = self.last_ingest_ts if since_ingest_ts is None else since_ingest_ts
        s = self.settings
        serving = ray.get(self.registry.serving.remote())
        log_table = read_event_log(str(s.infra.root / "eventlog"))
        train, val = build_examples(log_table, self.catalog.index, s.streaming.history_len,
                                    since_ingest_ts=since, val_users=s.training.val_users)
        result = RoundResult(round=self.round, outcome="skipped", reason="", version=None,
                             serving_version=serving.get("version", 0),
                             train_examples=len(train), val_examples=len(val), loss=None,
                             candidate_ndcg10=None, serving_ndcg10=None, candidate_hr10=None,
                             serving_hr10=None, fit_seconds=0.0, train_seconds=0.0,
                             started_run=False, seconds=0.0)
        try:
            if len(train) < MIN_TRAIN_EXAMPLES or not serving:
                result.reason = (f"{len(train)} training examples < {MIN_TRAIN_EXAMPLES}"
                                 if serving else "no serving version to warm-start from")
                return result
            newest_ingest = float(np.max(log_table["ingest_ts"].to_numpy()))
            fit_started = time.monotonic()
            out = self.trainer.train(train, self.catalog.vectors.numpy(), serving["blob"],
                                     seed=self.round)
            result.fit_seconds = time.monotonic() - fit_started
            result.train_seconds, result.started_run = out.train_seconds, out.started_run
            result.loss = out.loss
            candidate_blob = self._unseen_items_fall_back_to_text(out.blob, log_table)
            metrics.training_loss().set(out.loss)
            self._gate(result, candidate_blob, serving, val)
            self.last_ingest_ts = newest_ingest
        except Exception as err:  # noqa: BLE001 - a failed round must not stop the service
            log.exception("training round %d failed", self.round)
            result.outcome, result.reason = "failed", f"{type(err).__name__}: {err}"
        finally:
            result.seconds = time.monotonic() - started
            metrics.training_rounds().inc(1, tags={"outcome": result.outcome})
            log.info("training round %d: %s %s", self.round, result.outcome, result.reason)
        return result

    def _unseen_items_fall_back_to_text(self, blob: bytes, log_table) -> bytes:
        """Items with no event in the log yet take the weights of their nearest logged items
        by text (the rule offline evaluation picked on ML-1M validation); without per-item
        weights the blob is returned as it is."""
        state = prompt_from_bytes(blob)
        if not has_item_weights(state):
            return blob
        seen = np.zeros(len(self.catalog), bool)
        logged = pc.unique(log_table["item_id"]).to_pylist()
        seen[[self.catalog.index[i] for i in logged if i in self.catalog.index]] = True
        return prompt_to_bytes(unseen_items_fall_back_to_text(state, seen, self.catalog.vectors))

    def close(self) -> None:
        """End the long-lived training run (its workers exit after their round)."""
        self.trainer.stop()

    def _gate(self, result: RoundResult, candidate: bytes, serving: dict, val: Examples) -> None:
        try:
            prompt_from_bytes(candidate, self.catalog.vectors.shape[1])
        except BadPromptWeights as err:
            result.outcome, result.reason = "rejected", f"weights refused: {err}"
            return
        cand = self._evaluate(candidate, val)
        base = self._evaluate(serving["blob"], val)
        result.candidate_ndcg10, result.candidate_hr10 = cand["ndcg10"], cand["hr10"]
        result.serving_ndcg10, result.serving_hr10 = base["ndcg10"], base["hr10"]
        if len(val) and cand["ndcg10"] < base["ndcg10"] - self.settings.training.gate_margin:
            result.outcome = "rejected"
            result.reason = (f"held-out NDCG@10 {cand['ndcg10']:.4f} < serving "
                             f"{base['ndcg10']:.4f} - margin {self.settings.training.gate_margin}")
            return
        meta = {"round": result.round, "loss": result.loss, "val_ndcg10": cand["ndcg10"],
                "val_hr10": cand["hr10"], "parent": serving.get("version"),
                "train_examples": result.train_examples}
        result.version = ray.get(self.registry.publish.remote(candidate, meta))
        result.outcome = "published"
        result.reason = (f"held-out NDCG@10 {cand['ndcg10']:.4f} vs serving "
                         f"{base['ndcg10']:.4f} on {len(val)} users")
