"""Shared by the experiments: the result files' home and the metadata each one records."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def result_path(name: str) -> Path:
    """The committed result file of an experiment, e.g. `quality_ml-1m.json`."""
    return RESULTS_DIR / name


def run_stamp(command: str, load: bool = False) -> dict:
    """What every result file records about its run: machine, command, time (and the
    1-minute load average at the end, where the figures are timings)."""
    stamp: dict = {"machine": f"{platform.machine()}, {os.cpu_count() or 0} cores"}
    if load:
        stamp["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    stamp["command"] = command
    stamp["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return stamp


def write_result(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
