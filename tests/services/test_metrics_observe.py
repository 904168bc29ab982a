from services import metrics


class _Histogram:
    """Records what the public `observe` of a ray.util.metrics.Histogram is given."""

    def __init__(self):
        self.observed = []

    def observe(self, value, tags=None):
        self.observed.append((value, tags))


def test_observe_all_records_every_value_once_through_the_public_observe():
    values = [0.5, 0.001, 0.0, 7.0, 0.5]
    histogram = _Histogram()
    metrics.observe_all(histogram, values)
    assert histogram.observed == [(v, None) for v in values]


def test_observe_all_on_the_real_histogram_does_not_raise():
    metrics.observe_all(metrics.event_to_state_seconds(), [0.01, 0.2])
