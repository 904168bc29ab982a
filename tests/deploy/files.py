"""Paths and loaders shared by the deployment tests."""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVE_YAML = DEPLOY / "serve.yaml"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
DRIVER = DEPLOY / "kuberay" / "driver.yaml"
MONITORING = DEPLOY / "kuberay" / "monitoring.yaml"
RAY_CLUSTER = DEPLOY / "ray-cluster.yaml"
PROMETHEUS = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "promptrec.json"
DOCKERFILE = DEPLOY / "Dockerfile"
OPERATIONS = ROOT / "docs" / "operations.md"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> dict[str, dict]:
    """Multi-document manifest -> {"Kind/name": document}."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_image() -> str:
    return f"promptrec:{pyproject()['project']['version']}"


def ray_pin() -> str:
    pins = [d for d in pyproject()["project"]["dependencies"] if d.startswith("ray[")]
    return pins[0].split("==")[1]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def metric_names_in(expr: str) -> set[str]:
    """The promptrec_* and ray_serve_* metric names a PromQL expression reads."""
    return set(re.findall(r"\b(promptrec_[a-z_]+|ray_serve_[a-z_]+)\b", expr))


def kafka_topics_module():
    spec = importlib.util.spec_from_file_location("kafka_topics", DEPLOY / "kafka_topics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
