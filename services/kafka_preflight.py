"""The start-up check of a secured Kafka connection: each way it can fail, named by the
setting to fix, in seconds rather than after a client's 30 s bootstrap timeout.

Kafka clients report a refused certificate, an untrusted broker or wrong SASL
credentials alike as "Unable to bootstrap" (kafka-python) or a log line per retry
(librdkafka). `check_security` opens the connection the way both clients will:

1. TLS (`SSL`, `SASL_SSL`): a handshake with the configured CA and client certificate,
   then an ApiVersions round trip, since under TLS 1.3 a broker refuses a client
   certificate only after the handshake, on the first read;
2. SASL: a SaslHandshake naming the mechanism (the broker answers with the ones it
   enables), then a real login through kafka-python's admin client.
"""

from __future__ import annotations

import socket
import ssl
import struct

from services.config_sections import PASSWORD_ENV, KafkaSecurity
from services.embedded import InfrastructureError

API_VERSIONS, SASL_HANDSHAKE = 18, 17
UNSUPPORTED_SASL_MECHANISM = 33
LOGIN_TIMEOUT_MS = 10_000


class KafkaSecurityError(InfrastructureError):
    """The broker refused the connection the `kafka` settings describe."""


def check_security(host: str, port: int, security: KafkaSecurity,
                   timeout_s: float = 10.0) -> None:
    """Raise KafkaSecurityError, naming the setting, unless a client connecting to
    host:port as `security` says would get in. Plaintext without SASL: nothing to check."""
    if security.kafka_security_protocol == "PLAINTEXT":
        return
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            if security.tls:
                sock = _tls(sock, host, security)
            _request(sock, API_VERSIONS, 0, b"", security, "an ApiVersions request")
            if security.sasl:
                _sasl_mechanism(sock, security)
        finally:
            sock.close()
        if security.sasl:
            _login(f"{host}:{port}", security)
    except KafkaSecurityError as err:
        raise KafkaSecurityError(f"Kafka at {host}:{port}: {err}") from None


def _tls(sock: socket.socket, host: str, security: KafkaSecurity) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=security.kafka_ssl_cafile or None)
    if security.kafka_ssl_certfile:
        try:
            context.load_cert_chain(security.kafka_ssl_certfile, security.kafka_ssl_keyfile)
        except (ssl.SSLError, OSError) as err:
            raise KafkaSecurityError(
                f"cannot load the client certificate kafka_ssl_certfile="
                f"{security.kafka_ssl_certfile} with kafka_ssl_keyfile="
                f"{security.kafka_ssl_keyfile}: {err}") from None
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as err:
        raise KafkaSecurityError(
            f"the broker's TLS certificate is not trusted ({err.verify_message}): set "
            f"kafka_ssl_cafile to the CA that signed it (now "
            f"{security.kafka_ssl_cafile or 'the system CAs'})") from None
    except ssl.SSLError as err:
        if "WRONG_VERSION_NUMBER" in str(err) or "RECORD_LAYER" in str(err):
            raise KafkaSecurityError(
                f"the broker does not speak TLS on this port: check "
                f"kafka_security_protocol ({security.kafka_security_protocol}) and the "
                f"port of kafka_bootstrap") from None
        raise _refused_certificate(security, err) from None
    except (ConnectionError, TimeoutError) as err:
        raise KafkaSecurityError(
            f"the broker closed the TLS handshake ({err}): check kafka_security_protocol "
            f"({security.kafka_security_protocol}) and the port of kafka_bootstrap") from None


def _refused_certificate(security: KafkaSecurity, err: Exception) -> KafkaSecurityError:
    given = security.kafka_ssl_certfile or "none"
    return KafkaSecurityError(
        f"the broker refused our client certificate (kafka_ssl_certfile: {given}): {err}; "
        f"give one signed by a CA the broker trusts, with kafka_ssl_keyfile")


def _request(sock: socket.socket, api_key: int, version: int, body: bytes,
             security: KafkaSecurity, what: str) -> bytes:
    """Send one request (header v1, client id "promptrec-preflight") -> the response body."""
    client_id = b"promptrec-preflight"
    header = struct.pack(">hhih", api_key, version, 1, len(client_id)) + client_id
    message = header + body
    try:
        sock.sendall(struct.pack(">i", len(message)) + message)
        size = struct.unpack(">i", _read(sock, 4))[0]
        response = _read(sock, size)
    except ssl.SSLError as err:  # TLS 1.3: a refused client certificate shows here
        raise _refused_certificate(security, err) from None
    except (ConnectionError, TimeoutError, EOFError) as err:
        if security.tls and api_key == API_VERSIONS:  # the first read after the handshake
            raise _refused_certificate(security, err) from None
        if api_key == SASL_HANDSHAKE:  # Tansu closes rather than answer error 33
            raise KafkaSecurityError(
                f"the broker closed the connection at the SASL handshake ({err}): check "
                f"kafka_sasl_mechanism ({security.kafka_sasl_mechanism}) against the "
                f"mechanisms it enables") from None
        raise KafkaSecurityError(f"the broker closed the connection at {what} ({err}): check "
                                 f"kafka_security_protocol ({security.kafka_security_protocol})"
                                 ) from None
    return response[4:]  # after the correlation id


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def _sasl_mechanism(sock: socket.socket, security: KafkaSecurity) -> None:
    mechanism = security.kafka_sasl_mechanism.encode()
    body = _request(sock, SASL_HANDSHAKE, 1, struct.pack(">h", len(mechanism)) + mechanism,
                    security, "the SASL handshake")
    error, count = struct.unpack(">hi", body[:6])
    if error == UNSUPPORTED_SASL_MECHANISM:
        offered, at = [], 6
        for _ in range(max(0, count)):
            (size,) = struct.unpack(">h", body[at:at + 2])
            offered.append(body[at + 2:at + 2 + size].decode(errors="replace"))
            at += 2 + size
        raise KafkaSecurityError(
            f"the broker does not enable kafka_sasl_mechanism="
            f"{security.kafka_sasl_mechanism}; it offers {', '.join(offered) or 'none'}")


def _login(bootstrap: str, security: KafkaSecurity) -> None:
    from kafka.admin import KafkaAdminClient

    try:
        KafkaAdminClient(bootstrap_servers=bootstrap, client_id="promptrec-preflight",
                         bootstrap_timeout_ms=LOGIN_TIMEOUT_MS, request_timeout_ms=LOGIN_TIMEOUT_MS,
                         **security.kafka_python()).close()
    except Exception as err:  # noqa: BLE001 - every failure here is the login's
        source = (f"kafka_sasl_password_file={security.kafka_sasl_password_file}"
                  if security.kafka_sasl_password_file else PASSWORD_ENV)
        raise KafkaSecurityError(
            f"SASL {security.kafka_sasl_mechanism} login as kafka_sasl_username="
            f"{security.kafka_sasl_username!r} failed ({type(err).__name__}): check the user "
            f"name and the password ({source})") from None
