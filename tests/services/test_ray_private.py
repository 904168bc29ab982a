"""The private-Ray adapter (services/ray_private.py) against the installed Ray.

These fail when a Ray upgrade changes what the adapter relies on, before any stack
starts; the start-up check itself (check_metrics_port) runs in every slow test that
starts a local Ray.
"""

import inspect

import pytest
import ray

from services import ray_private


def test_ray_init_still_takes_the_hidden_keywords_and_refuses_unknown_ones():
    source = inspect.getsource(ray.init)
    for keyword in (ray_private.METRICS_PORT_KEYWORD, ray_private.SYSTEM_CONFIG_KEYWORD):
        assert f'"{keyword}"' in source, (
            f"ray {ray.__version__}: ray.init no longer takes {keyword}; "
            "update services/ray_private.py")
    # A dropped keyword must fail at start, not be ignored.
    assert "Unknown keyword argument" in source


def test_worker_niceness_is_still_a_ray_config_entry():
    # Ray's config entries live in C++; its job manager sets this one by its env name
    # (RAY_<entry>). The slow serving test reads every actor's niceness back.
    from ray._private import ray_constants

    assert ray_constants.RAY_WORKER_NICENESS == "RAY_worker_niceness", (
        f"ray {ray.__version__}: worker_niceness renamed; update services/ray_private.py")


def test_the_nodes_table_still_reports_the_metrics_export_port():
    # ray.nodes() is filled in Cython; Ray's own metrics agent reads the same key.
    from ray._private import metrics_agent

    assert f'node["{ray_private.NODE_METRICS_PORT}"]' in inspect.getsource(metrics_agent)


def test_a_port_the_nodes_do_not_report_fails_by_name():
    node = {"Alive": True, ray_private.NODE_METRICS_PORT: 8090}
    ray_private.check_metrics_port([node, {"Alive": False}], 8090)  # a dead node: ignored
    with pytest.raises(ray_private.MetricsPortIgnored, match="_metrics_export_port=9100"):
        ray_private.check_metrics_port([node], 9100)
    with pytest.raises(ray_private.MetricsPortIgnored):
        ray_private.check_metrics_port([], 8090)
