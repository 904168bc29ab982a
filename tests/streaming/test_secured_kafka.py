"""The streaming plane over TLS with client certificates, and the start-up check of a
secured connection, against the real broker.

TLS comes from a terminator in front of the embedded Tansu (tests/tls_terminator.py
says why); SASL refusals from Tansu itself with `--authentication`, which in its 0.6.0
build knows no users, so that every login is refused as a wrong password would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from kafka import KafkaConsumer

from services.backbone import default_backbone_path
from services.catalog import load_catalog
from services.config_sections import PASSWORD_ENV, KafkaSecurity
from services.config_sources import load_settings
from services.data import load_interactions
from services.embedded import (
    EmbeddedBroker,
    InfrastructureError,
    check_kafka,
    ensure_topics,
    free_port,
    stop_process,
    tansu_binary,
    wait_for_port,
)
from streaming.kafka_client import CLIENTS
from streaming.plane import start_streaming
from tests.conftest import TEST_CACHE
from tests.streaming.plane_checks import (
    assert_same_state,
    produce,
    same_state_reference,
    wait_applied,
)
from tests.tls_terminator import Pki, TlsTerminator, make_pki

N_EVENTS = 1500
BAD_RECORDS = [b"not json", b'{"user_id": "1"}', json.dumps({"user_id": "1", "item_id": "1",
                                                              "ts": "soon"}).encode()]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki, tmp_path_factory):
    """(the plaintext broker, the TLS terminator its clients are sent to)."""
    front = free_port()
    broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp("tls") / "broker.log",
                            advertised_port=front).start()
    terminator = TlsTerminator(front, broker.port, pki).start()
    yield broker, terminator
    terminator.stop()
    broker.stop()


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    """host:port of a Tansu that requires SASL (and accepts no login)."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("sasl") / "broker.log").open("ab")
    process = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url,
                                "--advertised-listener-url", url, "--authentication"],
                               stdout=log, stderr=subprocess.STDOUT)
    assert wait_for_port("127.0.0.1", port, 15)
    yield f"127.0.0.1:{port}"
    stop_process(process, 10)


def _mtls(pki: Pki, **changes) -> KafkaSecurity:
    fields = {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": str(pki.ca),
              "kafka_ssl_certfile": str(pki.client_cert),
              "kafka_ssl_keyfile": str(pki.client_key)} | changes
    return KafkaSecurity(**fields)


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_events_and_dead_letters_flow_over_mutual_tls(tmp_path, ray_session, pki, tls_broker,
                                                     client):
    broker, terminator = tls_broker
    run = uuid.uuid4().hex[:8]
    security = _mtls(pki)
    settings = load_settings(env={}, overrides={
        "data_dir": str(tmp_path), "topic_clicks": f"clicks-{run}", "topic_dlq": f"dlq-{run}",
        "consumer_group": f"group-{run}", "namespace": f"tls-{run}", "partitions": 2,
        "num_consumers": 1, "num_shards": 2,
        "cache_dir": str(TEST_CACHE), "kafka_client": client,
        **{name: getattr(security, name) for name in KafkaSecurity.__dataclass_fields__}})
    options = security.kafka_python()
    check_kafka(broker.bootstrap, security=settings.kafka)
    ensure_topics(broker.bootstrap, {settings.streaming.topic_clicks: 2,
                                     settings.streaming.topic_dlq: 1}, security=options)
    catalog = load_catalog("ml-100k", default_backbone_path(), TEST_CACHE)
    interactions = load_interactions("ml-100k", N_EVENTS)
    events = [interactions.event(i) for i in range(len(interactions))]
    verified_before = terminator.verified_clients
    plane = start_streaming(settings, broker.bootstrap, list(catalog.index),
                            catalog.vectors.numpy())
    try:
        produce(broker.bootstrap, settings.streaming.topic_clicks, events, options)
        from streaming.replay import make_producer

        producer = make_producer(broker.bootstrap, options)
        for value in BAD_RECORDS:
            producer.send(settings.streaming.topic_clicks, key=b"1", value=value)
        producer.close()
        wait_applied(plane, len(events))
        assert_same_state(plane, same_state_reference(settings, catalog, events))
        dlq = KafkaConsumer(settings.streaming.topic_dlq, bootstrap_servers=broker.bootstrap,
                            auto_offset_reset="earliest", consumer_timeout_ms=20_000, **options)
        dead = [record for record, _ in zip(dlq, BAD_RECORDS, strict=False)]
        dlq.close()
        assert sorted(r.value for r in dead) == sorted(BAD_RECORDS)
        assert all(dict(r.headers).get("reason") for r in dead)
        # the consumers, their dead-letter producers and ours all came through TLS
        assert terminator.verified_clients - verified_before >= 3
    finally:
        plane.stop()


@pytest.mark.parametrize("case, named", [
    ("rogue client certificate", "kafka_ssl_certfile"),
    ("no client certificate", "kafka_ssl_certfile"),
    ("untrusted broker", "kafka_ssl_cafile"),
    ("key of another certificate", "kafka_ssl_keyfile"),
])
def test_a_refused_tls_connection_fails_at_start_up_naming_the_setting(pki, tls_broker, case,
                                                                      named):
    security = {
        "rogue client certificate": _mtls(pki, kafka_ssl_certfile=str(pki.rogue_client_cert),
                                          kafka_ssl_keyfile=str(pki.rogue_client_key)),
        "no client certificate": _mtls(pki, kafka_ssl_certfile="", kafka_ssl_keyfile=""),
        "untrusted broker": _mtls(pki, kafka_ssl_cafile=str(pki.rogue_ca)),
        "key of another certificate": _mtls(pki, kafka_ssl_keyfile=str(pki.rogue_client_key)),
    }[case]
    with pytest.raises(InfrastructureError, match=named):
        check_kafka(tls_broker[0].bootstrap, security=security)


@pytest.mark.slow  # the broker never answers a TLS hello: waits out the 3 s timeout
def test_tls_to_a_plaintext_port_names_the_protocol(pki, tls_broker):
    with pytest.raises(InfrastructureError, match="kafka_security_protocol"):
        check_kafka(f"127.0.0.1:{tls_broker[0].port}", timeout_s=3, security=_mtls(pki))


def test_a_mechanism_the_broker_lacks_is_named(sasl_broker, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "secret")
    security = KafkaSecurity("SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                             kafka_sasl_username="promptrec")
    with pytest.raises(InfrastructureError, match="kafka_sasl_mechanism"):
        check_kafka(sasl_broker, security=security)


@pytest.mark.slow  # a refused login shows as kafka-python's 10 s bootstrap timeout
def test_promptrec_replay_with_a_refused_login_exits_3_naming_the_credentials(sasl_broker,
                                                                             tmp_path):
    env = {"PATH": "/usr/bin:/bin", PASSWORD_ENV: "wrong", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "services.launch.cli", "replay", "--kafka-bootstrap",
         sasl_broker, "--kafka-security-protocol", "SASL_PLAINTEXT",
         "--kafka-sasl-mechanism", "SCRAM-SHA-256", "--kafka-sasl-username", "promptrec",
         "--data-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "kafka_sasl_username='promptrec'" in done.stderr
    assert PASSWORD_ENV in done.stderr


def test_the_topic_set_up_script_connects_over_mutual_tls(pki, tls_broker):
    from tests.deploy.files import kafka_topics_module

    run = uuid.uuid4().hex[:8]
    security = _mtls(pki)
    flags = [f"--kafka-bootstrap={tls_broker[0].bootstrap}", "--replication-factor=1",
             f"--topic-clicks=clicks-{run}", f"--topic-dlq=dlq-{run}",
             "--kafka-security-protocol=SSL", f"--kafka-ssl-cafile={security.kafka_ssl_cafile}",
             f"--kafka-ssl-certfile={security.kafka_ssl_certfile}",
             f"--kafka-ssl-keyfile={security.kafka_ssl_keyfile}"]
    assert kafka_topics_module().main(flags) == 0
    consumer = KafkaConsumer(bootstrap_servers=tls_broker[0].bootstrap,
                             **security.kafka_python())
    assert {f"clicks-{run}", f"dlq-{run}"} <= consumer.topics()
    consumer.close()
