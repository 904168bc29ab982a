from pathlib import Path

import pytest

from bench import common


def test_steal_pct_is_the_stolen_share_of_the_ticks_since(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    stat.write_text("cpu  100 0 50 800 10 0 0 40\ncpu0 1 2 3\n")
    real_path = Path
    monkeypatch.setattr(common, "Path", lambda p: stat if p == "/proc/stat" else real_path(p))
    since = common.cpu_times()
    assert since == (1000, 40)
    stat.write_text("cpu  150 0 70 900 10 0 0 90\n")  # 220 more ticks, 50 of them stolen
    assert common.steal_pct(since) == pytest.approx(22.7)
    assert common.steal_pct(common.cpu_times()) is None  # no ticks since: no share


def test_cpu_times_without_proc_stat_is_zero(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "Path", lambda p: tmp_path / "missing")
    assert common.cpu_times() == (0, 0)
    assert common.steal_pct((0, 0)) is None
