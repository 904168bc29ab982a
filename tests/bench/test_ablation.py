import json

import pytest

from bench.ablation import VARIANTS, main, markdown, merged
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


def test_a_partial_run_keeps_the_other_variants_rows_in_order(tmp_path):
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps({"variants": [{"variant": "lora", "val_ndcg10": 0.2},
                                             {"variant": "earlier", "val_ndcg10": 0.1}]}))
    rows = merged(path, [{"variant": "lora", "val_ndcg10": 0.3},
                         {"variant": "dropout", "val_ndcg10": 0.4}])
    assert [(r["variant"], r["val_ndcg10"]) for r in rows] == [
        ("earlier", 0.1), ("dropout", 0.4), ("lora", 0.3)]
    assert merged(tmp_path / "missing.json", rows[:1]) == rows[:1]
