"""bench.ingest refuses a stream longer than its data set before starting anything."""

from __future__ import annotations

import pytest

from bench import ingest


def test_a_stream_longer_than_the_data_set_is_refused_naming_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ingest.main(["--dataset", "ml-100k", "--num-events", "90000"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--num-events + --latency-events" in err and "100,000 events" in err
