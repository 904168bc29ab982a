"""A long-lived Ray Train run that trains one round after another.

`TorchTrainer.fit()` costs ~18 s here before its first step (worker actors, the DDP
process group, loading the backbone in every worker). Paid every round, it would be most
of a round. So one `fit()` stays up in a background thread: its workers load the
backbone and join the process group once, then loop

    wait for the next round on the RoundBoard actor
    -> warm-start from that round's weights (a fresh optimizer: each round starts from
       the serving version, not from the last candidate)
    -> train `steps` steps on a disjoint slice each (DDP: gloo on CPU, NCCL on GPU)
    -> rank 0 posts the candidate weights back; every rank reports to Ray Train.

If the run dies (a worker crashed, a node left), the round in progress fails and the
next round starts a new run.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from services.backbone import load_backbone, resolve_backbone_path
from services.config import Settings
from services.decoded import decode_version
from services.prompt_model import PromptRecModel
from training.examples import Examples, round_steps
from training.step import make_optimizer, make_schedule, train_step

log = logging.getLogger(__name__)

ROUND_TIMEOUT_S = 1800.0


@dataclass
class RoundOutput:
    blob: bytes  # candidate weights (safetensors)
    loss: float  # mean of the last 10 steps on rank 0
    train_seconds: float  # rank 0's time in training steps
    started_run: bool  # this round paid for starting the Ray Train run


@ray.remote(num_cpus=0)
class RoundBoard:
    """Hands each round's inputs to the workers and takes the candidate back."""

    def __init__(self):
        self.round = 0
        self.payload: dict | None = None
        self.results: dict[int, tuple | None] = {}  # round -> result (None: abandoned)
        self.stopped = False
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def post(self, payload: dict) -> int:
        self.round += 1
        for old in [r for r in self.results if r < self.round - 10]:
            del self.results[old]  # the driver took them long ago
        self.payload = payload
        await self._notify()
        return self.round

    async def next_round(self, after: int, timeout_s: float = 30.0) -> tuple[int, dict | None]:
        """(round, payload) of an open round newer than `after`; payload None = stop.
        Returns (after, {}) when nothing came within timeout_s (the worker asks again)."""
        def ready() -> bool:
            return self.stopped or (self.round > after and self.round not in self.results)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)
            except TimeoutError:
                return after, {}
        if self.stopped:
            return after, None
        return self.round, self.payload

    async def finish(self, round_no: int, blob: bytes, loss: float,
                     train_seconds: float) -> None:
        self.results.setdefault(round_no, (blob, loss, train_seconds))
        await self._notify()

    async def abandon(self, round_no: int) -> None:
        self.results.setdefault(round_no, None)
        await self._notify()

    async def result(self, round_no: int, timeout_s: float) -> tuple | None:
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: round_no in self.results), timeout_s)
            except TimeoutError:
                return None
        return self.results[round_no]

    async def stop(self) -> None:
        self.stopped = True
        await self._notify()


def rounds_loop_per_worker(config: dict) -> None:
    """Runs in each Ray Train worker for the life of the run, one round after another.

    config: "board" (the RoundBoard), "settings" (the whole Settings: the model section
    names the backbone, the training section the steps and rates), "threads".
    """
    import ray.train
    import ray.train.torch

    board, s = config["board"], config["settings"]
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    _, encoder = load_backbone(resolve_backbone_path(s.model.backbone_path))
    core: PromptRecModel | None = None
    model = None
    done = 0
    while True:
        round_no, payload = ray.get(board.next_round.remote(done))
        if payload is None:
            return
        if not payload:
            continue  # nothing yet
        inputs = ray.get(payload["inputs"])
        # Rounds warm-start from the serving version, often the same one: decoded once.
        warm = decode_version(inputs["prompt_version"], inputs["prompt_blob"])
        if core is None or warm.structure != core.structure:
            core = PromptRecModel(encoder, warm).to(device)
            model = ray.train.torch.prepare_model(core, move_to_device=False)
        else:
            core.load_weights(warm)  # every rank loads the same weights: in sync
        items = torch.as_tensor(inputs["item_vectors"]).to(device)
        train = Examples(inputs["history"], inputs["target"], inputs["weights"],
                         inputs["prompt_target"], inputs.get("text"), inputs.get("query"))
        mine = np.arange(rank, len(train), world)  # disjoint slice per worker
        rng = np.random.default_rng(payload["seed"] + rank)
        optimizer = make_optimizer(core, s.training)
        steps = round_steps(s.training.train_steps, s.training.round_max_epochs, len(train),
                            s.training.batch_size, world)
        schedule = make_schedule(optimizer, s.training, steps)
        losses = []
        started = time.perf_counter()
        for step in range(steps):
            batch = train.subset(rng.choice(mine, size=min(s.training.batch_size, len(mine)),
                                            replace=False))
            losses.append(train_step(model, optimizer, batch, items,
                                     s.streaming.personal_alpha, bf16=s.training.bf16,
                                     dropout=s.training.dropout,
                                     text_dropout=s.training.user_text_dropout, rng=rng))
            schedule.step()
            if rank == 0 and (step + 1) % max(1, steps // 4) == 0:
                print(f"[train round {round_no}] step {step + 1}/{steps} "
                      f"loss {np.mean(losses[-10:]):.3f}", flush=True)
        train_seconds = time.perf_counter() - started
        loss = float(np.mean(losses[-10:]))
        if rank == 0:
            ray.get(board.finish.remote(round_no, core.weights().to_bytes(), loss,
                                        train_seconds))
        ray.train.report({"round": round_no, "loss": loss, "train_seconds": train_seconds})
        done = round_no


class LongLivedTrainer:
    """The driver's side: starts the run when needed, posts rounds, waits for results."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.board = self._new_board()
        self.runs_started = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _new_board(self):
        from services.placement import actor_options

        return RoundBoard.options(**actor_options(self.settings, "train")).remote()

    def _post(self, payload: dict) -> tuple[int, bool]:
        """Post a round, starting the run when none is running -> (round, started a run).
        A board lost with its node takes the run with it (its workers wait on the board):
        then a new board and a new run."""
        started_run = not self.running
        if started_run:
            self._start_run()
        try:
            return ray.get(self.board.post.remote(payload)), started_run
        except ray.exceptions.RayActorError:
            log.warning("the round board was lost (its node died?): a new board and run")
        self.board = self._new_board()
        if self._thread is not None:
            self._thread.join(timeout=60)  # the old run's workers fail on the lost board
        self._start_run()
        return ray.get(self.board.post.remote(payload)), True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start_run(self) -> None:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from services.placement import train_label_selector

        s = self.settings
        self.runs_started += 1
        trainer = TorchTrainer(
            rounds_loop_per_worker,
            train_loop_config={"board": self.board, "settings": s, "threads": 1},
            scaling_config=ScalingConfig(num_workers=s.training.train_workers,
                                         use_gpu=s.training.use_gpu,
                                         resources_per_worker={"CPU": 1},
                                         label_selector=train_label_selector(s)),
            run_config=RunConfig(name=f"rounds-{self.runs_started}-{int(time.time())}",
                                 storage_path=str(s.infra.root / "train")),
        )
        self._error = None

        def fit() -> None:
            try:
                result = trainer.fit()
                if result.error:
                    self._error = result.error
            except BaseException as err:  # noqa: BLE001 - reported by the round that waits
                self._error = err
            log.info("training run %d ended%s", self.runs_started,
                     f": {self._error}" if self._error else "")

        self._thread = threading.Thread(target=fit, daemon=True, name="ray-train-run")
        self._thread.start()

    def train(self, train: Examples, item_vectors: np.ndarray, warm_blob: bytes,
              seed: int, warm_version: int = 0) -> RoundOutput:
        """One round from the weights `warm_blob` (registry version `warm_version`: the
        workers decode each version once) -> the candidate."""
        # The driver owns the inputs until the round is over.
        inputs = ray.put({"history": train.history, "target": train.target,
                          "weights": train.weights, "prompt_target": train.prompt_target,
                          "text": train.text, "query": train.query,
                          "item_vectors": item_vectors,
                          "prompt_blob": warm_blob, "prompt_version": warm_version})
        round_no, started_run = self._post({"inputs": inputs, "seed": seed})
        deadline = time.monotonic() + ROUND_TIMEOUT_S
        try:
            while True:
                result = ray.get(self.board.result.remote(round_no, 1.0))
                if result is not None:
                    blob, loss, train_seconds = result
                    return RoundOutput(blob, loss, train_seconds, started_run)
                if not self.running:
                    raise RuntimeError(f"the Ray Train run ended during the round: "
                                       f"{self._error}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no candidate after {ROUND_TIMEOUT_S:.0f} s")
        except BaseException:
            ray.get(self.board.abandon.remote(round_no))
            raise

    def stop(self, timeout_s: float = 60.0) -> None:
        try:
            ray.get(self.board.stop.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - Ray may be shutting down already
            return
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
