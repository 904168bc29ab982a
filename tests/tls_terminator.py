"""Test infrastructure for the secured-Kafka tests: a throw-away PKI made with the
`openssl` command, and a TLS terminator in front of the plaintext embedded broker.

Why a terminator: the shipped Tansu 0.6.0 cannot serve TLS itself (its `--cert` and
`--key` flags sit in one exclusive clap group, so it refuses both together), so the
tests put TLS where a managed Kafka's load balancer would: a real TLS 1.3 listener
(Python's `ssl`) that requires a client certificate signed by the test CA and forwards
the bytes to the broker, which advertises the terminator's port. The Kafka clients
under test do the real handshake, certificate checks and all traffic over TLS.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # signs the broker's and the client's certificates
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA nobody trusts, and a client certificate it signed
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             f"/CN={name}", "-keyout", str(key), "-out", str(cert))
    return cert, key


def _signed(folder: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
             str(key), "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, rogue = _ca(folder, "ca"), _ca(folder, "rogue-ca")
    server = _signed(folder, "broker", ca, "IP:127.0.0.1,DNS:localhost")
    client = _signed(folder, "client", ca, "DNS:promptrec")
    rogue_client = _signed(folder, "rogue-client", rogue, "DNS:promptrec")
    return Pki(ca[0], *server, *client, rogue[0], *rogue_client)


class TlsTerminator:
    """TLS on `port`, requiring a client certificate signed by `client_ca`, forwarded as
    plaintext to 127.0.0.1:`upstream_port`. `verified_clients` counts the connections
    whose certificate checked out (every one that got through)."""

    def __init__(self, port: int, upstream_port: int, pki: Pki):
        self.port, self.upstream_port = port, upstream_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        self.context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.verified_clients = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tls-terminator")

    def start(self) -> TlsTerminator:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the TLS terminator did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self.context))
        self._started.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if writer.get_extra_info("peercert"):
            self.verified_clients += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
