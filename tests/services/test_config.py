import argparse

import pytest

from services.config import ConfigError, Settings


def test_env_then_flags_override_defaults():
    env = {"PROMPTREC_NUM_SHARDS": "3", "PROMPTREC_USE_GPU": "true", "PROMPTREC_GATE_MARGIN": "0.1"}
    s = load_settings(env=env, overrides={"num_shards": "5"})
from services.config_sources import add_settings_flags, cli_settings, load_settings
    assert s.streaming.num_shards == 5  # flag beats env
    assert s.training.use_gpu is True
    assert s.training.gate_margin == 0.1
    assert s.streaming.partitions == Settings().partitions


def test_cli_flags_are_generated_for_every_setting():
    s = cli_settings(["--num-replicas", "4", "--kafka-bootstrap", "broker:9092", "--use-gpu"])
    assert (s.serving.num_replicas, s.infra.kafka_bootstrap, s.training.use_gpu) == (4, "broker:9092", True)


@pytest.mark.parametrize("env, setting", [
    ({"PROMPTREC_NUM_SHARDS": "0"}, "num_shards"),
    ({"PROMPTREC_NUM_SHARDS": "many"}, "num_shards"),
    ({"PROMPTREC_USE_GPU": "perhaps"}, "use_gpu"),
    ({"PROMPTREC_HTTP_PORT": "70000"}, "http_port"),
    ({"PROMPTREC_DATASET": "netflix"}, "dataset"),
    ({"PROMPTREC_KAFKA_BOOTSTRAP": "no-port"}, "kafka_bootstrap"),
    ({"PROMPTREC_NUM_CONSUMERS": "9", "PROMPTREC_PARTITIONS": "4"}, "num_consumers"),
    ({"PROMPTREC_LEARNING_RATE": "-1"}, "learning_rate"),
    ({"PROMPTREC_BACKBONE_PATH": "/nonexistent"}, "backbone_path"),
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
