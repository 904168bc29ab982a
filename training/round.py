"""One training round: event log -> Ray Train (DDP) -> validation gate -> registry.

    examples from the log  ──►  long-lived TorchTrainer run  ──►  candidate prompt
    warm start: serving version   (training/trainer.py: workers     │
                                   stay up between rounds)          ▼
    publish if finite and held-out NDCG@10 >= serving's - gate_margin, else reject
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
import ray

from services import metrics
from services.backbone import embed_texts, load_backbone, resolve_backbone_path
from services.catalog import Catalog
from services.config import Settings
from services.decoded import decode_version
from services.eventlog import read_event_log
from services.item_weights import aligned_to, unseen_items_fall_back_to_text
from services.naming import LIVE_METRICS_ACTOR, shard_actor
from services.prompt_model import PromptRecModel
from services.user_text import UserTextTokens, query_vectors
from services.weights import BadPromptWeights, PromptWeights, decode_weights
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
    query_rows: int = 0  # training rows that read the query their click followed

    @property
    def overhead_share(self) -> float | None:
        """Share of the round not spent in training steps (start-up, data, gate)."""
        return None if not self.seconds else 1 - self.train_seconds / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "overhead_share": self.overhead_share}


class RoundRunner:
    """Runs training rounds against the registry; keeps the gate's model loaded."""

    def __init__(self, settings: Settings, catalog: Catalog | Callable[[], Catalog], registry):
        """`catalog`: a fixed one, or the live one's current version (each round trains on
        the catalog as it is then, new items included)."""
        self.settings = settings
        self._catalog_now = catalog if callable(catalog) else (lambda: catalog)
        self.catalog = self._catalog_now()
        self.registry = registry
        self.round = 0
        self.last_ingest_ts = 0.0
        self._backbone_path = str(resolve_backbone_path(settings.model.backbone_path))
        self._gate_model: PromptRecModel | None = None
        self._backbone: tuple | None = None  # (tokenizer, encoder), loaded when first needed
        self._tokens: UserTextTokens | None = None
        self.trainer = LongLivedTrainer(settings)

    def _loaded_backbone(self) -> tuple:
        if self._backbone is None:
            self._backbone = load_backbone(self._backbone_path)
        return self._backbone

    def _user_text(self) -> Callable[[list[str], list[str]], tuple]:
        """(row users, their target event ids) -> (text ids [E, U], query vectors [E, H] or
        None when no row has one):
        each user's profile as the shards have it now, and the query the row's click
        followed, as the live metrics credited it (none when they do not answer)."""
        tokenizer, encoder = self._loaded_backbone()
        if self._tokens is None:
            self._tokens = UserTextTokens(tokenizer, self.settings.model.user_text_tokens)
        namespace = self.settings.infra.namespace
        profiles: dict[str, str] = {}
        for index in range(self.settings.streaming.num_shards):
            try:
                shard = ray.get_actor(shard_actor(index), namespace=namespace)
                profiles.update(ray.get(shard.profiles.remote()))
            except (ValueError, ray.exceptions.RayActorError):
                log.warning("shard %d unavailable: its users train without profiles", index)
        asked: dict[str, str] = {}  # event_id -> query
        try:
            live = ray.get_actor(LIVE_METRICS_ACTOR, namespace=namespace)
            asked = ray.get(live.asked_queries.remote(), timeout=60)
        except (ValueError, ray.exceptions.RayError, TimeoutError):
            log.warning("live metrics unavailable: rows train without their queries")
        tokens, hidden = self._tokens, self.catalog.vectors.shape[1]

        def rows(users: list[str], event_ids: list[str]) -> tuple[np.ndarray,
                                                                  np.ndarray | None]:
            queries = [asked.get(e) for e in event_ids]
            vectors = query_vectors(queries, lambda texts: embed_texts(
                tokenizer, encoder, texts), hidden) if any(queries) else None  # [E, H]
            return tokens.encode([profiles.get(u) for u in users], queries), vectors
        return rows

    def _evaluate(self, weights: PromptWeights, examples: Examples) -> dict[str, float]:
        if self._gate_model is None:
            _, encoder = self._loaded_backbone()
            self._gate_model = PromptRecModel(encoder, weights)
        elif weights.structure != self._gate_model.structure:
            self._gate_model = PromptRecModel(self._gate_model.encoder, weights)
        else:
            self._gate_model.load_weights(weights)
        return evaluate(self._gate_model, examples, self.catalog.vectors,
                        personal_alpha=self.settings.streaming.personal_alpha)

    def run(self, since_ingest_ts: float | None = None) -> RoundResult:
        """One round; never raises for a bad round (it is counted and reported)."""
        self.round += 1
        started = time.monotonic()
        since = self.last_ingest_ts if since_ingest_ts is None else since_ingest_ts
        s = self.settings
        self.catalog = self._catalog_now()
        serving = ray.get(self.registry.serving.remote())
        log_table = read_event_log(str(s.infra.root / "eventlog"))
        train, val = build_examples(log_table, self.catalog.index, s.streaming.history_len,
                                    since_ingest_ts=since, val_users=s.training.val_users,
                                    rows=s.training.train_rows,
                                    prompt_alone_events=s.training.prompt_alone_events,
                                    user_text=self._user_text() if s.model.user_text else None,
                                    replay_share=s.training.replay_share, seed=self.round,
                                    val_events=s.training.val_events)
        result = RoundResult(round=self.round, outcome="skipped", reason="", version=None,
                             serving_version=serving.get("version", 0),
                             train_examples=len(train), val_examples=len(val), loss=None,
                             candidate_ndcg10=None, serving_ndcg10=None, candidate_hr10=None,
                             serving_hr10=None, fit_seconds=0.0, train_seconds=0.0,
                             started_run=False, seconds=0.0,
                             query_rows=0 if train.query is None else int(
                                 np.count_nonzero(train.query.any(axis=1))))
        try:
            if len(train) < MIN_TRAIN_EXAMPLES or not serving:
                result.reason = (f"{len(train)} training examples < {MIN_TRAIN_EXAMPLES}"
                                 if serving else "no serving version to warm-start from")
                return result
            newest_ingest = float(np.max(log_table["ingest_ts"].to_numpy()))
            fit_started = time.monotonic()
            out = self.trainer.train(train, self.catalog.vectors.numpy(),
                                     self._serving_on_catalog(serving).to_bytes(),
                                     seed=self.round, warm_version=serving["version"])
            result.fit_seconds = time.monotonic() - fit_started
            result.train_seconds, result.started_run = out.train_seconds, out.started_run
            result.loss = out.loss
            metrics.training_loss().set(out.loss)
            self._gate(result, out.blob, serving, val, self._logged_items(log_table))
            self.last_ingest_ts = newest_ingest
        except Exception as err:  # noqa: BLE001 - a failed round must not stop the service
            log.exception("training round %d failed", self.round)
            result.outcome, result.reason = "failed", f"{type(err).__name__}: {err}"
        finally:
            result.seconds = time.monotonic() - started
            metrics.training_rounds().inc(1, tags={"outcome": result.outcome})
            log.info("training round %d: %s %s", self.round, result.outcome, result.reason)
        return result

    def _serving_on_catalog(self, serving: dict) -> PromptWeights:
        """The serving version with its item rows on this round's catalog (by item id)."""
        weights = decode_version(serving["version"], serving["blob"])
        return aligned_to(weights, self.catalog.item_ids, self.catalog.vectors)

    def _logged_items(self, log_table) -> np.ndarray:
        """[N] bool: catalog items that some event in the log names."""
        seen = np.zeros(len(self.catalog), bool)
        logged = pc.unique(log_table["item_id"]).to_pylist()
        seen[[self.catalog.index[i] for i in logged if i in self.catalog.index]] = True
        return seen

    def close(self) -> None:
        """End the long-lived training run (its workers exit after their round)."""
        self.trainer.stop()

    def _gate(self, result: RoundResult, candidate: bytes, serving: dict, val: Examples,
              logged: np.ndarray | None = None) -> None:
        """Decode the candidate once, give unlogged items their text neighbours' weights
        (`logged` [N] bool; the rule offline evaluation picked on ML-1M validation), then
        publish it if it holds up against the serving version on `val`."""
        try:
            weights = decode_weights(candidate, self.catalog.vectors.shape[1])
        except BadPromptWeights as err:
            result.outcome, result.reason = "rejected", f"weights refused: {err}"
            return
        if weights.has_item_weights:
            # The rows are this round's catalog's: say so, so later catalogs can align them.
            weights = dataclasses.replace(weights, item_ids=tuple(self.catalog.item_ids))
            if logged is not None:
                weights = unseen_items_fall_back_to_text(weights, logged, self.catalog.vectors)
            candidate = weights.to_bytes()
        cand = self._evaluate(weights, val)
        # The serving version is the same for many rounds: decoded once per process.
        base = self._evaluate(self._serving_on_catalog(serving), val)
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
        # With a canary share the registry serves it to that share first (services.canary).
        result.version = ray.get(self.registry.publish.remote(
            candidate, meta, self.settings.live.canary_share))
        result.outcome = "published"
        result.reason = (f"held-out NDCG@10 {cand['ndcg10']:.4f} vs serving "
                         f"{base['ndcg10']:.4f} on {len(val)} held-out events")
