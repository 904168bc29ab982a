"""One training round: event log -> Ray Train (DDP) -> validation gate -> registry.

    examples from the log  ──►  TorchTrainer(num_workers, use_gpu)  ──►  candidate prompt
    warm start: serving version       each worker: train_step on its slice     │
                                                                              ▼
    publish if finite and held-out NDCG@10 >= serving's - gate_margin, else reject
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from services import metrics
from services.catalog import Catalog
from services.config import Settings
from services.eventlog import read_event_log
from services.model import (
    BadPromptWeights,
    PromptRecModel,
    load_backbone,
    prompt_from_bytes,
    prompt_to_bytes,
    resolve_backbone_path,
)
from training.examples import Examples, build_examples
from training.step import evaluate, train_step

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
    fit_seconds: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def train_loop_per_worker(config: dict) -> None:
    """Runs in each Ray Train worker. Data and warm-start weights arrive via an object ref."""
    import ray.train
    import ray.train.torch

    inputs = ray.get(config["inputs_ref"])
    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    _, encoder = load_backbone(config["backbone_path"])
    model = PromptRecModel(encoder, prompt_from_bytes(inputs["prompt_blob"]))
    model = ray.train.torch.prepare_model(model)  # DDP: gloo on CPU, NCCL on GPU
    items = torch.as_tensor(inputs["item_vectors"]).to(device)
    train = Examples(inputs["history"], inputs["target"])
    mine = np.arange(rank, len(train), world)  # disjoint slice per worker
    rng = np.random.default_rng(config["seed"] + rank)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=config["learning_rate"])
    losses = []
    for step in range(config["steps"]):
        batch = train.subset(rng.choice(mine, size=min(config["batch_size"], len(mine)),
                                        replace=False))
        losses.append(train_step(model, optimizer, batch, items, config["personal_alpha"]))
        if rank == 0 and (step + 1) % max(1, config["steps"] // 4) == 0:
            print(f"[train round {config['round']}] step {step + 1}/{config['steps']} "
                  f"loss {np.mean(losses[-10:]):.3f}", flush=True)
    report = {"loss": float(np.mean(losses[-10:])), "steps": config["steps"]}
    if rank == 0:
        core = model.module if hasattr(model, "module") else model
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "prompt.safetensors").write_bytes(prompt_to_bytes(core.prompt_state()))
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(report)


class RoundRunner:
    """Runs training rounds against the registry; keeps the gate's model loaded."""

    def __init__(self, settings: Settings, catalog: Catalog, registry):
        self.settings = settings
        self.catalog = catalog
        self.registry = registry
        self.round = 0
        self.last_ingest_ts = 0.0
        self._backbone_path = str(resolve_backbone_path(settings.backbone_path))
        self._gate_model: PromptRecModel | None = None

    def _evaluate(self, blob: bytes, examples: Examples) -> dict[str, float]:
        state = prompt_from_bytes(blob)
        if self._gate_model is None:
            _, encoder = load_backbone(self._backbone_path)
            self._gate_model = PromptRecModel(encoder, state)
        elif ("item_bias" in state) != (self._gate_model.item_bias is not None):
            self._gate_model = PromptRecModel(self._gate_model.encoder, state)
        self._gate_model.load_prompt_state(state)
        return evaluate(self._gate_model, examples, self.catalog.vectors,
                        personal_alpha=self.settings.personal_alpha)

    def run(self, since_ingest_ts: float | None = None) -> RoundResult:
        """One round; never raises for a bad round (it is counted and reported)."""
        self.round += 1
        started = time.monotonic()
        since = self.last_ingest_ts if since_ingest_ts is None else since_ingest_ts
        s = self.settings
        serving = ray.get(self.registry.serving.remote())
        log_table = read_event_log(str(s.root / "eventlog"))
        train, val = build_examples(log_table, self.catalog.index, s.history_len,
                                    since_ingest_ts=since, val_users=s.val_users)
        result = RoundResult(round=self.round, outcome="skipped", reason="", version=None,
                             serving_version=serving.get("version", 0),
                             train_examples=len(train), val_examples=len(val), loss=None,
                             candidate_ndcg10=None, serving_ndcg10=None, candidate_hr10=None,
                             serving_hr10=None, fit_seconds=0.0, seconds=0.0)
        try:
            if len(train) < MIN_TRAIN_EXAMPLES or not serving:
                result.reason = (f"{len(train)} training examples < {MIN_TRAIN_EXAMPLES}"
                                 if serving else "no serving version to warm-start from")
                return result
            newest_ingest = float(np.max(log_table["ingest_ts"].to_numpy()))
            fit_started = time.monotonic()
            candidate_blob, loss = self._fit(train, serving["blob"])
            result.fit_seconds = time.monotonic() - fit_started
            result.loss = loss
            metrics.training_loss().set(loss)
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

    def _fit(self, train: Examples, warm_blob: bytes) -> tuple[bytes, float]:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        s = self.settings
        inputs_ref = ray.put({"history": train.history, "target": train.target,
                              "item_vectors": self.catalog.vectors.numpy(),
                              "prompt_blob": warm_blob})
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"inputs_ref": inputs_ref, "backbone_path": self._backbone_path,
                               "steps": s.train_steps, "batch_size": s.batch_size,
                               "learning_rate": s.learning_rate, "seed": self.round,
                               "round": self.round, "threads": 1,
                               "personal_alpha": s.personal_alpha},
            scaling_config=ScalingConfig(num_workers=s.train_workers, use_gpu=s.use_gpu,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"round-{self.round}-{int(time.time())}",
                                 storage_path=str(s.root / "train")),
        )
        fit = trainer.fit()
        if fit.checkpoint is None:
            raise RuntimeError(f"training produced no checkpoint: {fit.error}")
        with fit.checkpoint.as_directory() as directory:
            blob = (Path(directory) / "prompt.safetensors").read_bytes()
        return blob, float(fit.metrics.get("loss", float("nan")))

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
        if len(val) and cand["ndcg10"] < base["ndcg10"] - self.settings.gate_margin:
            result.outcome = "rejected"
            result.reason = (f"held-out NDCG@10 {cand['ndcg10']:.4f} < serving "
                             f"{base['ndcg10']:.4f} - margin {self.settings.gate_margin}")
            return
        meta = {"round": result.round, "loss": result.loss, "val_ndcg10": cand["ndcg10"],
                "val_hr10": cand["hr10"], "parent": serving.get("version"),
                "train_examples": result.train_examples}
        result.version = ray.get(self.registry.publish.remote(candidate, meta))
        result.outcome = "published"
        result.reason = (f"held-out NDCG@10 {cand['ndcg10']:.4f} vs serving "
                         f"{base['ndcg10']:.4f} on {len(val)} users")
