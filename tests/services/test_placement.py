import pytest
from ray._common.ray_option_utils import validate_actor_options

from services.config import Settings
from services.placement import KINDS, actor_options, node_label, train_label_selector


def test_off_by_default_ray_places_every_actor():
    settings = Settings()
    assert all(actor_options(settings, kind) == {} for kind in KINDS)
    assert train_label_selector(settings) is None


@pytest.mark.parametrize("kind", KINDS)
def test_on_each_kind_asks_for_its_label_then_any_node(kind):
    options = actor_options(Settings().replace(prefer_labelled_nodes=True), kind)
    assert options == {"label_selector": {f"promptrec-{kind}": "yes"},
                       "fallback_strategy": [{"label_selector": {}}]}
    validate_actor_options(options, in_options=True)  # Ray's own check accepts them


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown actor kind"):
        node_label("workers")
