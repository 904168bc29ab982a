import pytest

from bench.miss_throughput import VARIANTS, main
from services.config_sources import load_settings


def test_the_variants_are_valid_settings_and_before_is_the_whole_backbone():
    base = load_settings(env={})
    for changes in VARIANTS.values():
        base.replace(**changes)  # validated: a typo fails here
    assert base.replace(**VARIANTS["before"]).model.user_layers == 0
    assert base.replace(**VARIANTS["after"]).model.user_layers == base.model.user_layers > 0


@pytest.mark.parametrize("argv", [["--throughput-seconds", "0"], ["--concurrency", "0"],
                                  ["--only", "sideways"]])
def test_bad_arguments_exit_2_before_any_stack_starts(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
