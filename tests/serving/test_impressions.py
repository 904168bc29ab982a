"""The impression writer never holds up a request: a full queue drops and counts."""

from serving.impressions import ImpressionLog


def test_a_full_queue_drops_and_counts_instead_of_blocking():
    # Nothing listens on port 9: the writer thread is stuck reaching the broker, so the
    # queue (2 places) fills and the rest is dropped at once.
    log = ImpressionLog("127.0.0.1:9", "promptrec.impressions", 2, "test")
    try:
        for i in range(10):
            log.write({"request_id": str(i), "user_id": "u", "items": [], "ts": 0.0})
        assert 7 <= log.counts["dropped"] <= 8, log.counts
        assert log.counts["sent"] == 0
    finally:
        log.stop()
