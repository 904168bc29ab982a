from services.eventlog import EventLogWriter, read_event_log
from services.events import ClickEvent


def test_event_log_round_trip_partitioned_by_hour(tmp_path):
    assert read_event_log(str(tmp_path / "missing")).num_rows == 0
    writer = EventLogWriter(str(tmp_path), "w0")
    assert writer.flush() is None
    writer.append([ClickEvent("e1", "u1", "i1", 10.0, "click"),
                   ClickEvent("e2", "u2", "i2", 11.0, "rating", 4.0)], ingest_ts=3600 * 5)
    path = writer.flush()
    assert "hour=1970010105" in path and len(writer) == 0
    writer.append([ClickEvent("e3", "u1", "i3", 12.0, "view")], ingest_ts=3600 * 6)
    writer.flush()
    table = read_event_log("file://" + str(tmp_path))
    rows = sorted(table.to_pylist(), key=lambda r: r["event_id"])
    assert [r["event_id"] for r in rows] == ["e1", "e2", "e3"]
    assert rows[1]["value"] == 4.0 and rows[0]["value"] is None
    assert rows[2]["ingest_ts"] == 3600 * 6
