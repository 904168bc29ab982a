"""The admin routes of a replica (bearer token): rollback and experiments.

A mixin of `serving.app.Recommender`, so Serve's ingress sees them as the deployment's
own routes; they use its `settings`, `prompts` (the registry handle) and live metrics.
The registry decides; these routes parse, check the token and turn its refusals into
4xx answers with a reason.
"""

# No `from __future__ import annotations`: see serving/app.py (Serve rebuilds the routes).
import ray
from fastapi import Request

from services.experiments import BadExperiment, ExperimentRunning
from services.experiments import report as experiment_report
from serving.api import ApiError, app, check_admin_token
from serving.query import read_experiment_arms, read_rollback_version


class AdminRoutes:
    @app.post("/admin/rollback")
    async def rollback(self, request: Request) -> dict:
        check_admin_token(request, self.settings.serving.admin_token)
        version = await read_rollback_version(request)
        try:
            entry = await self.prompts.registry.rollback.remote(version)
        except Exception as err:  # noqa: BLE001 - UnknownVersion arrives wrapped by Ray
            raise ApiError(404, str(err).splitlines()[-1][:300]) from None
        return {"prompt_version": entry["version"], "status": "rolled back"}

    @app.post("/admin/experiments")
    async def start_experiment(self, request: Request) -> dict:
        check_admin_token(request, self.settings.serving.admin_token)
        arms = await read_experiment_arms(request)
        return await self._registry_call(self.prompts.registry.start_experiment, arms)

    @app.get("/admin/experiments")
    async def list_experiments(self, request: Request) -> dict:
        check_admin_token(request, self.settings.serving.admin_token)
        return {"experiments": await self.prompts.registry.experiments.remote()}

    @app.get("/admin/experiments/{experiment_id}")
    async def get_experiment(self, experiment_id: str, request: Request) -> dict:
        """The experiment with each arm's live HR and NDCG and their intervals."""
        check_admin_token(request, self.settings.serving.admin_token)
        experiment = await self._registry_call(self.prompts.registry.experiment,
                                               experiment_id)
        return experiment_report(experiment, await self._live_metrics("experiment_arms",
                                                                      experiment_id))

    @app.post("/admin/experiments/{experiment_id}/stop")
    async def stop_experiment(self, experiment_id: str, request: Request) -> dict:
        check_admin_token(request, self.settings.serving.admin_token)
        experiment = await self._registry_call(self.prompts.registry.stop_experiment,
                                               experiment_id)
        return experiment_report(experiment, await self._live_metrics("experiment_arms",
                                                                      experiment_id))

    async def _registry_call(self, method, *args):
        """A registry call whose refusals are the client's: 400 for a bad experiment, 409
        while another runs, 404 for an unknown one (Ray wraps them; the original is
        `cause`)."""
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
