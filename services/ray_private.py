"""The private Ray APIs the service uses, kept in this one adapter: two hidden keywords
of `ray.init()` for a local Ray, its Prometheus export port and its workers' niceness.

Metrics port: a cluster started from the command line takes it publicly (`ray start
--metrics-export-port=N`, as deploy/ does); `ray.init()` starting a local Ray takes it
only as the hidden keyword `_metrics_export_port` (Ray 2.60 lists it under "Hidden /
experimental options"), and without it Ray picks a random port that no scrape
config names. After the start the port is read back through the public `ray.nodes()`
(each node's "MetricsExportPort"), so a Ray that drops the keyword fails at start
(ray.init refuses unknown keywords) and one that ignores it fails here, by name,
instead of exporting where nothing scrapes. tests/services/test_ray_private.py pins
both sides to the installed Ray.

Worker niceness and start-up concurrency: Ray has no public option for them;
`_system_config` overrides Ray's internal config (`worker_niceness`, default 15;
`worker_maximum_startup_concurrency`, default the CPU count). tests/serving/test_serving_e2e.py
reads every actor's niceness back (test_every_actor_runs_at_normal_priority).
"""

from __future__ import annotations

from collections.abc import Iterable

# The raylet starts at most this many workers at once, and warns when more than 4x as
# many workers live (Ray's default is the CPU count: 2 here, so the stack's ~12 actors
# set off "N PYTHON worker processes have been started ... 6x the maximum expected
# startup concurrency" on every start, although they are one per actor by design).
STARTUP_CONCURRENCY = 8
METRICS_PORT_KEYWORD = "_metrics_export_port"
SYSTEM_CONFIG_KEYWORD = "_system_config"
NODE_METRICS_PORT = "MetricsExportPort"  # the key in each ray.nodes() entry


class MetricsPortIgnored(RuntimeError):
    """The local Ray does not export its metrics on the port it was given."""


def init_local_ray(metrics_port: int, worker_niceness: int, **init_kwargs) -> None:
    """`ray.init(**init_kwargs)` starting a local Ray that exports on `metrics_port` and
    starts its workers at `worker_niceness`."""
    import ray

    ray.init(**init_kwargs, **{METRICS_PORT_KEYWORD: metrics_port,
                               SYSTEM_CONFIG_KEYWORD: {
                                   "worker_niceness": worker_niceness,
                                   "worker_maximum_startup_concurrency": STARTUP_CONCURRENCY}})
    check_metrics_port(ray.nodes(), metrics_port)


def check_metrics_port(nodes: Iterable[dict], metrics_port: int) -> None:
    """Raise MetricsPortIgnored unless every live node of `ray.nodes()` exports on it."""
    ports = {node.get(NODE_METRICS_PORT) for node in nodes if node.get("Alive", True)}
    if ports != {metrics_port}:
        raise MetricsPortIgnored(
            f"asked Ray (ray.init {METRICS_PORT_KEYWORD}={metrics_port}) to export metrics on "
            f"port {metrics_port}, its nodes report {NODE_METRICS_PORT} {sorted(map(str, ports))}"
            f": this Ray version changed the private keyword (services/ray_private.py)")


def actor_nodes() -> list[tuple[str, str, str]]:
    """(class name, actor name, node id) of every live actor, from GCS's actor table
    (`ray._private.state.actors`; the public state API needs the dashboard, which a
    cluster may not run)."""
    from ray._private import state

    return [(a["ActorClassName"], a.get("Name") or "", a["Address"]["NodeID"])
            for a in state.actors().values() if a["State"] == "ALIVE"]
