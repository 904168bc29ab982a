import pytest

from bench.ablation import VARIANTS, main, markdown
from services.config_sources import load_settings


def test_every_variant_is_a_valid_configuration_and_names_its_change():
    base = load_settings(env={})
    names = [v.name for v in VARIANTS]
    assert len(set(names)) == len(names)
    for variant in VARIANTS:
        settings = base.replace(**variant.overrides)  # validated: a typo fails here
        assert settings.training.train_rows in ("targets", "users") and variant.change


def test_unknown_variants_and_bad_budgets_exit_2(capsys):
    for argv in (["--only", "nope"], ["--epochs", "0"], ["--evals-per-epoch", "0"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err


def test_the_table_has_one_row_per_variant():
    rows = [{"variant": "a", "change": "x", "val_ndcg10": 0.1, "best_epoch": 2.0,
             "seconds_per_step": 1.5}]
    assert markdown(rows).splitlines()[-1] == "| a | x | 0.1000 | 2.0 | 1.5 |"
