"""Connecting to existing infrastructure: unreachable Kafka or Ray fails fast with an
error naming host and port; the topic script sets partitions and retention on a real
(Tansu) broker through Kafka's admin API.

"Unreachable" is a port on 127.0.0.1 that was just bound and released, so nothing listens.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from services.config_sources import load_settings
from services.embedded import (
    EmbeddedBroker,
    InfrastructureError,
    check_kafka,
    ray_endpoint,
    start_ray,
    topic_settings,
)
from services.launch.cli import main as cli_main
from tests.deploy.files import DEPLOY, ROOT


@pytest.fixture
def closed_port() -> int:
    from services.embedded import free_port

    return free_port()


@pytest.fixture
def broker():
    broker = EmbeddedBroker().start()
    yield broker
    broker.stop()


def test_unreachable_kafka_names_host_port_and_setting(closed_port):
    started = time.monotonic()
    with pytest.raises(InfrastructureError) as err:
        check_kafka(f"127.0.0.1:{closed_port}", timeout_s=1.0)
    message = str(err.value)
    assert f"127.0.0.1:{closed_port}" in message
    assert "PROMPTREC_KAFKA_BOOTSTRAP" in message and "port is open" in message
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("scheme", ["ray://", ""])
def test_unreachable_ray_names_host_port_and_setting(closed_port, scheme):
    import ray

    address = f"{scheme}127.0.0.1:{closed_port}"
    settings = load_settings(env={}, overrides={"ray_address": address})
    started = time.monotonic()
    with pytest.raises(InfrastructureError) as err:
        start_ray(settings, connect_timeout_s=1.0)
    message = str(err.value)
    assert f"host 127.0.0.1 port {closed_port}" in message
    assert address in message and "PROMPTREC_RAY_ADDRESS" in message
    assert time.monotonic() - started < 10
    assert not ray.is_initialized()


def test_ray_endpoint_defaults():
    assert ray_endpoint("ray://head") == ("head", 10001)
    assert ray_endpoint("ray://head:10002") == ("head", 10002)
    assert ray_endpoint("head.svc:6380") == ("head.svc", 6380)
    assert ray_endpoint("head") == ("head", 6379)
    assert ray_endpoint("auto") is None


@pytest.mark.slow
def test_cli_serve_reports_unreachable_ray(broker, closed_port, tmp_path, capsys):
    # Kafka is there (a real broker), Ray is not: the CLI stops with status 3 and says where.
    code = cli_main(["serve", "--kafka-bootstrap", broker.bootstrap,
                     "--ray-address", f"ray://127.0.0.1:{closed_port}",
                     "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"ray://127.0.0.1:{closed_port}" in err and f"port {closed_port}" in err


@pytest.mark.slow
def test_cli_replay_reports_unreachable_kafka(closed_port, capsys):
    code = cli_main(["replay", "--kafka-bootstrap", f"127.0.0.1:{closed_port}"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"127.0.0.1:{closed_port}" in err


def run_topics(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEPLOY / "kafka_topics.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_topic_script_creates_and_updates_topics(broker):
    clicks, dlq = "promptrec.clicks", "promptrec.clicks.dlq"
    done = run_topics("--kafka-bootstrap", broker.bootstrap, "--replication-factor", "1",
                      "--partitions", "3", "--retention-hours", "48",
                      "--dlq-retention-hours", "240")
    assert done.returncode == 0, done.stderr
    assert f"{clicks}: created, 3 partitions" in done.stdout
    found = topic_settings(broker.bootstrap, [clicks, dlq])
    assert found[clicks]["partitions"] == 3 and found[dlq]["partitions"] == 1
    assert found[clicks]["configs"]["retention.ms"] == str(48 * 3_600_000)
    assert found[dlq]["configs"]["retention.ms"] == str(240 * 3_600_000)
    assert found[clicks]["configs"]["cleanup.policy"] == "delete"
    users = topic_settings(broker.bootstrap, ["promptrec.users", "promptrec.users.dlq"])
    assert users["promptrec.users"]["partitions"] == 1
    assert users["promptrec.users"]["configs"]["cleanup.policy"] == "compact"
    assert users["promptrec.users.dlq"]["configs"]["retention.ms"] == str(240 * 3_600_000)

    # Again, with another retention: the topic is kept and its retention changed in place.
    done = run_topics("--kafka-bootstrap", broker.bootstrap, "--replication-factor", "1",
                      "--partitions", "3", "--retention-hours", "12")
    assert done.returncode == 0, done.stderr
    assert f"{clicks}: updated, 3 partitions, retention.ms={12 * 3_600_000}" in done.stdout
    assert topic_settings(broker.bootstrap, [clicks])[clicks]["configs"]["retention.ms"] == \
        str(12 * 3_600_000)

    # More partitions than the topic has: said, with status 1, and nothing half-done.
    done = run_topics("--kafka-bootstrap", broker.bootstrap, "--replication-factor", "1",
                      "--partitions", "6")
    assert done.returncode == 1
    assert "has 3 partitions, settings ask for 6" in done.stderr


@pytest.mark.slow
def test_topic_script_names_unreachable_kafka(closed_port):
    done = run_topics("--kafka-bootstrap", f"127.0.0.1:{closed_port}")
    assert done.returncode == 3
    assert f"cannot reach Kafka at 127.0.0.1:{closed_port}" in done.stderr


def test_topic_script_needs_a_bootstrap():
    done = run_topics()
    assert done.returncode == 2 and "kafka_bootstrap" in done.stderr
