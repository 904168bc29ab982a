"""The admin routes' work (bearer token): rollback and experiments.

The routes themselves are thin methods of `serving.app.Recommender` (Serve's ingress
binds only the deployment class's own methods); each calls one function here with the
replica, which supplies `settings`, `prompts` (the registry handle) and `live_metrics`.
The registry decides; these functions check the token, parse, and turn its refusals
into 4xx answers with a reason.
"""

from __future__ import annotations

import ray
from fastapi import Request

from services.experiments import BadExperiment, ExperimentRunning
from services.experiments import report as experiment_report
from serving.api import ApiError, check_admin_token
from serving.query import read_experiment_arms, read_rollback_version


async def rollback(replica, request: Request) -> dict:
    check_admin_token(request, replica.settings.serving.admin_token)
    version = await read_rollback_version(request)
    try:
        entry = await replica.prompts.registry.rollback.remote(version)
    except Exception as err:  # noqa: BLE001 - UnknownVersion arrives wrapped by Ray
        raise ApiError(404, str(err).splitlines()[-1][:300]) from None
    return {"prompt_version": entry["version"], "status": "rolled back"}


async def start_experiment(replica, request: Request) -> dict:
    check_admin_token(request, replica.settings.serving.admin_token)
    arms = await read_experiment_arms(request)
    return await _registry_call(replica.prompts.registry.start_experiment, arms)


async def list_experiments(replica, request: Request) -> dict:
    check_admin_token(request, replica.settings.serving.admin_token)
    return {"experiments": await replica.prompts.registry.experiments.remote()}


async def experiment(replica, request: Request, experiment_id: str, stop: bool) -> dict:
    """The experiment (stopped first with `stop`) and each arm's live HR and NDCG with
    their intervals."""
    check_admin_token(request, replica.settings.serving.admin_token)
    registry = replica.prompts.registry
    found = await _registry_call(registry.stop_experiment if stop else registry.experiment,
                                 experiment_id)
    return experiment_report(found, await replica.live_metrics("experiment_arms",
                                                               experiment_id))


async def _registry_call(method, *args):
    """A registry call whose refusals are the client's: 400 for a bad experiment, 409
    while another runs, 404 for an unknown one (Ray wraps them; the original is `cause`)."""
    try:
        return await method.remote(*args)
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if isinstance(cause, ExperimentRunning):
            raise ApiError(409, str(cause)[:300]) from None
        if isinstance(cause, BadExperiment):
            raise ApiError(400, str(cause)[:300]) from None
        if isinstance(cause, KeyError):
            raise ApiError(404, str(cause.args[0])[:300]) from None
        raise
