"""Kafka security settings: each client library gets the same connection in its own
option names, and a setting that cannot work fails at start-up, naming itself."""

import pytest

from services.config import ConfigError, Settings
from services.config_sections import PASSWORD_ENV, KafkaSecurity


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol():
    security = Settings().kafka
    assert security.kafka_python() == {"security_protocol": "PLAINTEXT"}
    assert security.confluent() == {"security.protocol": "plaintext"}


def test_tls_with_a_client_certificate_in_both_libraries(tmp_path):
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    for path in (ca, cert, key):
        path.write_text("-----BEGIN-----")
    security = Settings().replace(kafka_security_protocol="SSL", kafka_ssl_cafile=str(ca),
                                  kafka_ssl_certfile=str(cert), kafka_ssl_keyfile=str(key)).kafka
    assert security.kafka_python() == {"security_protocol": "SSL", "ssl_cafile": str(ca),
                                       "ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    assert security.confluent() == {"security.protocol": "ssl", "ssl.ca.location": str(ca),
                                    "ssl.certificate.location": str(cert),
                                    "ssl.key.location": str(key)}


def test_sasl_reads_the_password_from_a_file_or_the_environment(tmp_path, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    security = Settings().replace(kafka_security_protocol="SASL_SSL",
                                  kafka_sasl_mechanism="SCRAM-SHA-512",
                                  kafka_sasl_username="svc",
                                  kafka_sasl_password_file=str(secret)).kafka
    assert security.kafka_python() == {
        "security_protocol": "SASL_SSL", "ssl_cafile": None, "ssl_certfile": None,
        "ssl_keyfile": None, "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc", "sasl_plain_password": "s3cret"}
    assert security.confluent()["sasl.password"] == "s3cret"
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert KafkaSecurity(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="svc"
                         ).kafka_python()["sasl_plain_password"] == "from-env"


@pytest.mark.parametrize("changes, setting", [
    ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
    ({"kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
    ({"kafka_ssl_cafile": "/no/such/ca.pem"}, "kafka_ssl_cafile"),
    ({"kafka_security_protocol": "SASL_SSL"}, "kafka_sasl_username"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "svc"},
     "kafka_sasl_password_file"),
])
def test_settings_that_cannot_connect_fail_at_start_up_naming_the_setting(changes, setting,
                                                                        monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(ConfigError, match=setting):
        Settings().replace(**changes)


def test_mutual_tls_needs_both_halves(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="kafka_ssl_keyfile"):
        Settings().replace(kafka_security_protocol="SSL", kafka_ssl_certfile=str(cert))
