"""What deploy/ hands an operator parses, validates against Ray's own schemas, and names
only the images, ports, resources, settings and names that the project defines."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from dataclasses import fields

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from services import metrics
from services.cli import _parser as cli_parser
from services.config import ENV_PREFIX, Settings
from services.config_sources import load_settings, settings_from_flags
from services.naming import SERVE_APP
from tests.deploy.files import (
    ALERTS,
    DASHBOARD,
    DOCKERFILE,
    DRIVER,
    MONITORING,
    OPERATIONS,
    PROMETHEUS,
    RAY_CLUSTER,
    RAYSERVICE,
    ROOT,
    SERVE_YAML,
    dashboard_exprs,
    kafka_topics_module,
    load_all,
    load_yaml,
    metric_names_in,
    project_image,
    ray_pin,
)

DEFAULTS = Settings()
SERVICE_METRICS = sorted(set(re.findall(r'"(promptrec_[a-z_]+)"',
                                        open(metrics.__file__).read())))
# Settings that the driver and the replicas must share: actor names, shard routing, the
# catalog and the shared storage.
SHARED_SETTINGS = ("namespace", "data_dir", "dataset", "num_shards")


def rayservice():
    return load_yaml(RAYSERVICE)


def groups():
    """{group name: group spec}, the head as "head"."""
    cluster = rayservice()["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]} | {
        g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def container(group: dict) -> dict:
    (only,) = group["template"]["spec"]["containers"]
    return only


def ports(group: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(group).get("ports", [])}


def configmap() -> dict[str, str]:
    return load_all(DRIVER)["ConfigMap/promptrec-settings"]["data"]


# --- Serve config ---------------------------------------------------------------------

def test_serve_config_validates_against_rays_schema():
    config = ServeDeploySchema.model_validate(load_yaml(SERVE_YAML))
    (app,) = config.applications
    assert app.name == SERVE_APP
    assert app.import_path == "serving.app:app_builder"
    assert config.http_options.port == DEFAULTS.serving.http_port
    (deployment,) = app.deployments
    assert deployment.name == "Recommender"
    assert deployment.num_replicas >= 1


def test_serve_config_rejects_what_ray_would_reject():
    # The schema check above can fail (the schema ignores unknown keys, not bad values).
    broken = load_yaml(SERVE_YAML)
    broken["applications"][0]["deployments"][0]["num_replicas"] = "two"
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate(broken)


def test_serve_config_names_what_the_code_defines():
    from serving import app as serving_app

    config = load_yaml(SERVE_YAML)
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert module == serving_app.__name__ and callable(getattr(serving_app, attr))
    assert app["deployments"][0]["name"] == serving_app.Recommender.name
    settings = load_settings(env={}, overrides={k: str(v) for k, v in app["args"].items()})
    assert settings.serving.admin_token == ""  # the token comes from the nodes' environment only
    assert "admin_token" not in app["args"]


def test_rayservice_embeds_the_same_serve_config():
    assert load_yaml(SERVE_YAML) == yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


# --- KubeRay ----------------------------------------------------------------------------

def test_rayservice_images_and_ray_version_are_the_projects():
    spec = rayservice()
    assert spec["kind"] == "RayService" and spec["apiVersion"] == "ray.io/v1"
    assert spec["spec"]["rayClusterConfig"]["rayVersion"] == ray_pin() == ray.__version__
    images = {container(g)["image"] for g in groups().values()}
    images |= {c["image"] for d in load_all(DRIVER).values()
               for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])}
    assert images == {project_image()}
    base = re.search(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M)[1]
    assert base.startswith(f"rayproject/ray:{ray_pin()}-py311"), base


def test_rayservice_ports_are_the_settings_defaults():
    for name, group in groups().items():
        assert ports(group)["metrics"] == DEFAULTS.infra.metrics_port, name
        assert group["rayStartParams"]["metrics-export-port"] == str(DEFAULTS.infra.metrics_port), name
    head = groups()["head"]
    assert ports(head)["serve"] == DEFAULTS.serving.http_port
    assert ports(head)["client"] == 10001 and ports(head)["gcs-server"] == 6379
    assert ports(groups()["cpu"])["serve"] == DEFAULTS.serving.http_port


def test_gpu_group_requests_gpus_and_cpu_group_does_not():
    gpu, cpu = groups()["gpu"], groups()["cpu"]
    resources = container(gpu)["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) >= 1
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in json.dumps(container(cpu)["resources"])
    assert "nvidia.com/gpu" not in json.dumps(container(groups()["head"])["resources"])
    settings = load_settings(env=configmap())
    assert settings.training.use_gpu
    gpus = gpu["maxReplicas"] * int(resources["limits"]["nvidia.com/gpu"])
    assert gpus >= settings.training.train_workers, "not enough GPUs for one round's Train workers"


def test_ray_pods_share_settings_storage_and_secrets():
    objects = load_all(DRIVER)
    claim = objects["PersistentVolumeClaim/promptrec-data"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    settings = load_settings(env=configmap())
    for name, group in groups().items():
        c = container(group)
        assert {"configMapRef": {"name": "promptrec-settings"}} in c["envFrom"], name
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                   for v in group["template"]["spec"]["volumes"]}
        assert volumes[next(iter(mounts))] == "promptrec-data", name
        assert settings.infra.data_dir in mounts.values(), name
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        secret = env["PROMPTREC_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert secret["name"] == "promptrec-admin"


def test_configmap_is_valid_settings_that_agree_with_the_serve_config():
    env = configmap()
    names = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    assert set(env) <= names, set(env) - names
    settings = load_settings(env=env)  # validates, like the driver at start-up
    args = load_yaml(SERVE_YAML)["applications"][0]["args"]
    for name in SHARED_SETTINGS:
        assert str(getattr(settings, name)) == str(args[name]), name
    assert settings.serving.http_port == load_yaml(SERVE_YAML)["http_options"]["port"]
    assert settings.infra.metrics_port == DEFAULTS.infra.metrics_port


def test_driver_runs_the_real_cli_against_the_cluster():
    deployment = load_all(DRIVER)["Deployment/promptrec-driver"]
    assert deployment["spec"]["replicas"] == 1
    (submitter,) = deployment["spec"]["template"]["spec"]["containers"]
    # The job gets its settings from this pod's environment (the ConfigMap).
    assert {"configMapRef": {"name": "promptrec-settings"}} in submitter["envFrom"]
    script = submitter["args"][0]
    syntax = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    submit = re.search(r"ray job submit (.*?) \\\n\s+-- (.*?) ;;", script, re.S)
    assert submit, script
    argv = shlex.split(submit[2])
    assert argv[0] == "promptrec"
    args = cli_parser().parse_args(argv[1:])
    settings = settings_from_flags(args, env=configmap())
    assert args.command == "serve" and settings.infra.ray_address == "auto"
    assert settings.infra.deploy_serve is False  # Serve belongs to the RayService


def test_kafka_topics_job_runs_the_script_with_flags_it_has():
    job = load_all(DRIVER)["Job/promptrec-kafka-topics"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    workdir = re.search(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M)[1]
    assert command[1] == f"{workdir}/deploy/kafka_topics.py"
    args = kafka_topics_module().build_parser().parse_args(command[2:])
    assert args.replication_factor >= 1 and args.retention_hours > 0


def test_podmonitor_scrapes_the_metrics_port_with_the_same_relabelling():
    objects = load_all(MONITORING)
    endpoint, = objects["PodMonitor/promptrec-ray"]["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    selector = objects["PodMonitor/promptrec-ray"]["spec"]["selector"]["matchLabels"]
    for name, group in groups().items():
        labels = group["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == selector["app.kubernetes.io/part-of"], name
    (ours,) = load_yaml(PROMETHEUS)["scrape_configs"][0]["metric_relabel_configs"]
    (theirs,) = endpoint["metricRelabelings"]
    assert (theirs["regex"], theirs["replacement"], theirs["targetLabel"]) == (
        ours["regex"], ours["replacement"], ours["target_label"])
    assert objects["PrometheusRule/promptrec"]["spec"]["groups"] == load_yaml(ALERTS)["groups"]


# --- ray up -----------------------------------------------------------------------------

def test_ray_up_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(RAY_CLUSTER)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 1}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(broken))


def test_ray_up_config_names_the_projects_image_ports_and_gpus():
    config = load_yaml(RAY_CLUSTER)
    assert config["docker"]["image"] == project_image()
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2
    assert all(f"--metrics-export-port={DEFAULTS.infra.metrics_port}" in c for c in starts)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1
    assert "GPU" not in config["available_node_types"]["cpu_worker"]["resources"]
    env = dict(o.split(" ", 1)[1].split("=", 1) for o in config["docker"]["run_options"]
               if o.startswith("--env "))
    settings = load_settings(env=env)
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= settings.training.train_workers
    assert settings.infra.metrics_port == DEFAULTS.infra.metrics_port
    assert settings.infra.data_dir == load_yaml(SERVE_YAML)["applications"][0]["args"]["data_dir"]


# --- Prometheus and Grafana ------------------------------------------------------------

def test_prometheus_config_keeps_the_ray_prefix_relabelling():
    config = load_yaml(PROMETHEUS)
    (job,) = config["scrape_configs"]
    (relabel,) = job["metric_relabel_configs"]
    assert re.fullmatch(relabel["regex"], "ray_promptrec_requests_total")
    assert not re.fullmatch(relabel["regex"], "ray_serve_num_http_requests_total")
    assert re.sub(relabel["regex"], relabel["replacement"].replace("$1", r"\1"),
                  "ray_promptrec_requests_total") == "promptrec_requests_total"
    (targets,) = job["static_configs"]
    assert targets["targets"] == [f"127.0.0.1:{DEFAULTS.infra.metrics_port}"]
    assert config["rule_files"] == [ALERTS.name]


def test_dashboard_covers_every_service_metric_and_key_serve_metrics():
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    used = set().union(*(metric_names_in(e) for e in dashboard_exprs()))
    # Histograms are read through their _bucket series.
    read = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    missing = [m for m in SERVICE_METRICS if m not in read]
    assert len(SERVICE_METRICS) >= 10 and not missing, missing
    assert {"ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
            "ray_serve_deployment_replica_healthy"} <= used
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# --- docs -------------------------------------------------------------------------------

def test_operations_guide_is_linked_and_explains_every_alert_and_metric():
    guide = OPERATIONS.read_text()
    assert "docs/operations.md" in (ROOT / "README.md").read_text()
    alerts = [r["alert"] for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]
    missing = [a for a in alerts if a not in guide]
    assert not missing, missing
    missing = [m for m in SERVICE_METRICS if f"`{m}`" not in guide]
    assert not missing, missing
    for secret in ("promptrec-ray-auth", "promptrec-admin"):
        assert secret in guide
    assert "/admin/rollback" in guide
