"""bench.serve's own rules: its publish options, and the stress run's report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.load import Result
from bench.serve import _stress_report, main


@pytest.mark.parametrize("flags", [["--swaps", "0"], ["--stress-swaps", "-1"],
                                   ["--dwell", "0"], ["--stress-dwell", "-2"]])
def test_publish_options_out_of_range_exit_2_naming_them(flags, capsys):
    with pytest.raises(SystemExit) as exited:
        main(flags)
    assert exited.value.code == 2
    assert "--stress-swaps >= 0" in capsys.readouterr().err


def _result(index: int, status: int, ms: float, cache: str = "hit") -> Result:
    return Result(index, ("/recommend", {}), status, ms / 1000, 0.0, None, None, cache)


def test_stress_report_counts_failures_and_compares_p99_with_the_steady_state():
    results = [_result(i, 200, 10.0 + i) for i in range(99)] + [_result(99, 503, 5.0)]
    stress = {"results": results, "swap_ms": [12.0, 30.0], "cache_hit_rate": 0.5}
    out = _stress_report(stress, SimpleNamespace(stress_dwell=1.0), steady_p99_ms=54.0)
    assert out["failed_requests"] == 1 and out["swaps"] == 2 and out["dwell_s"] == 1.0
    assert out["p99_ms"] == 108.0  # the slowest of the 99 answers
    assert out["p99_over_steady_p99"] == 2.0
    assert out["publish_to_all_replicas_p99_ms"] == 30.0


def test_stress_report_with_no_answer_has_no_ratio():
    stress = {"results": [_result(0, 0, 1.0)], "swap_ms": [5.0], "cache_hit_rate": None}
    out = _stress_report(stress, SimpleNamespace(stress_dwell=1.0), steady_p99_ms=20.0)
    assert out["failed_requests"] == 1 and out["p99_over_steady_p99"] is None
