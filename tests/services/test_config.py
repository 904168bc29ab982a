import argparse
import dataclasses

import pytest

from services.config import SECTIONS, ConfigError, Settings, section_of, setting_fields
from services.config_sources import (
    add_settings_flags,
    cli_settings,
    load_settings,
    settings_from_flags,
)


def test_env_then_flags_override_defaults():
    env = {"PROMPTREC_NUM_SHARDS": "3", "PROMPTREC_USE_GPU": "true", "PROMPTREC_GATE_MARGIN": "0.1"}
    s = load_settings(env=env, overrides={"num_shards": "5"})
    assert s.streaming.num_shards == 5  # flag beats env
    assert s.training.use_gpu is True
    assert s.training.gate_margin == 0.1
    assert s.streaming.partitions == Settings().streaming.partitions


def test_cli_flags_are_generated_for_every_setting():
    s = cli_settings(["--num-replicas", "4", "--kafka-bootstrap", "broker:9092", "--use-gpu"])
    assert (s.serving.num_replicas, s.infra.kafka_bootstrap, s.training.use_gpu) == (
        4, "broker:9092", True)


@pytest.mark.parametrize("env, setting", [
    ({"PROMPTREC_NUM_SHARDS": "0"}, "num_shards"),
    ({"PROMPTREC_NUM_SHARDS": "many"}, "num_shards"),
    ({"PROMPTREC_USE_GPU": "perhaps"}, "use_gpu"),
    ({"PROMPTREC_HTTP_PORT": "70000"}, "http_port"),
    ({"PROMPTREC_DATASET": "netflix"}, "dataset"),
    ({"PROMPTREC_KAFKA_BOOTSTRAP": "no-port"}, "kafka_bootstrap"),
    ({"PROMPTREC_BROKER_STORAGE": "postgres://localhost/tansu"}, "broker_storage"),
    ({"PROMPTREC_BROKER_STORAGE": "s3://"}, "broker_storage"),
    ({"PROMPTREC_BROKER_STORAGE": "s3://bucket"}, "broker_storage"),
    ({"PROMPTREC_NUM_CONSUMERS": "9", "PROMPTREC_PARTITIONS": "4"}, "num_consumers"),
    ({"PROMPTREC_LEARNING_RATE": "-1"}, "learning_rate"),
    ({"PROMPTREC_BACKBONE_PATH": "/nonexistent"}, "backbone_path"),
    ({"PROMPTREC_READOUT": "first"}, "readout"),
    ({"PROMPTREC_USER_LAYERS": "-1"}, "user_layers"),
    ({"PROMPTREC_TRAIN_ROWS": "sessions"}, "train_rows"),
    ({"PROMPTREC_DROPOUT": "1.0"}, "dropout"),
])
def test_bad_config_fails_fast_naming_the_setting(env, setting):
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert err.value.setting == setting
    assert setting in str(err.value)


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError):
        load_settings(env={}, overrides={"num_shardz": 2})


def test_help_mentions_env_names():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    text = parser.format_help()
    assert "--kafka-bootstrap" in text and "PROMPTREC_<NAME>" in text


def test_an_unknown_kafka_client_fails_naming_the_setting():
    with pytest.raises(ConfigError, match="kafka_client"):
        load_settings(env={}, overrides={"kafka_client": "librdkafka"})


def test_every_setting_has_one_flat_name_in_one_section():
    names = [f.name for _, f in setting_fields()]
    assert len(names) == len(set(names)) > 40
    assert {section for section, _ in setting_fields()} == set(SECTIONS)
    assert section_of("history_len") == "streaming" and section_of("prompt_len") == "model"


def test_a_variant_is_validated_and_leaves_the_original_alone():
    base = Settings()
    variant = base.replace(num_shards=3, pin_version=2)
    assert (variant.streaming.num_shards, variant.serving.pin_version) == (3, 2)
    assert base.streaming.num_shards == 2 and variant.model is base.model
    with pytest.raises(ConfigError, match="num_shards"):
        base.replace(num_shards=0)
    with pytest.raises(ConfigError, match="num_shardz"):
        base.replace(num_shardz=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.streaming.num_shards = 9


def test_flat_settings_round_trip_through_the_sources():
    settings = load_settings(env={}, overrides={"num_replicas": 3, "causal": False})
    again = load_settings(env={}, overrides={k: str(v) for k, v in settings.flat().items()})
    assert again == settings


def test_a_tools_own_defaults_lose_to_flags_and_win_over_the_env():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    args = parser.parse_args(["--num-shards", "4"])
    env = {"PROMPTREC_NUM_SHARDS": "3", "PROMPTREC_NAMESPACE": "from-env"}
    settings = settings_from_flags(args, env=env, base={"num_shards": 1, "namespace": "tool"})
    assert (settings.streaming.num_shards, settings.infra.namespace) == (4, "tool")


def test_a_choice_rule_names_the_values_it_allows():
    with pytest.raises(ConfigError, match="must be one of last, mean, got 'first'"):
        load_settings(env={"PROMPTREC_READOUT": "first"})
