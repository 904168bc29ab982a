from services import metrics


class _Record:
    def __init__(self):
        self.calls = []

    def record(self, value, tags=None):
        self.calls.append((value, tags))


class _Histogram:
    """Shaped like ray.util.metrics.Histogram (Ray 2.60)."""

    def __init__(self, private: bool):
        self.observed = []
        if private:
            self._metric = _Record()
            self._discard_metric = False
            self._default_tags = {"shard": "0"}

    def observe(self, value, tags=None):
        self.observed.append(value)

    def _get_final_tags(self, tags):
        return self._default_tags

    def _validate_tags(self, tags):
        pass


def test_observe_all_records_every_value_once():
    values = [0.5, 0.001, 0.0, 7.0, 0.5]
    fast = _Histogram(private=True)
    metrics.observe_all(fast, values)
    assert fast._metric.calls == [(v, {"shard": "0"}) for v in values] and not fast.observed
    plain = _Histogram(private=False)  # another Ray version: the public observe()
    metrics.observe_all(plain, values)
    assert plain.observed == values


def test_observe_all_on_the_real_histogram_does_not_raise():
    metrics.observe_all(metrics.event_to_state_seconds(), [0.01, 0.2])
