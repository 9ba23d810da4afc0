"""The Serve application builder (``import_path: services.app:build_app``).

Ingress -> (Generator, FeedbackLog, LoopController when tuning is enabled).

``serve run config.yaml``, KubeRay's ``serveConfigV2`` and ``illume serve`` all call ``build_app``
with the same ``AppConfig`` (``args`` of the Serve config), so the three cannot drift. Deployment
options come from the config: ``max_ongoing_requests`` of the Generator is at least
max_batch_size x max_concurrent_batches (Serve caps a batch at it), light deployments take
fractional CPUs, and the Generator asks for GPUs only when configured.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from services.config import AppConfig
from services.feedback_log import FeedbackLogDeployment
from services.generator import GeneratorDeployment
from services.ingress import Ingress
from services.loop_controller import LoopController

HEALTH_CHECK_PERIOD_S = 5


def generator_options(config: AppConfig) -> dict[str, Any]:
    g = config.generator
    options: dict[str, Any] = {
        "name": "Generator",
        "max_ongoing_requests": g.max_ongoing_requests,
        "max_queued_requests": g.max_queued_requests,
        "ray_actor_options": {"num_cpus": g.num_cpus, "num_gpus": g.num_gpus},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }
    if g.autoscaling:
        options["autoscaling_config"] = g.autoscaling.model_dump()
    else:
        options["num_replicas"] = g.num_replicas
    return options


def build_app(args: AppConfig | dict[str, Any]) -> Application:
    """The Serve application: Ingress -> (Generator, FeedbackLog)."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    generator = GeneratorDeployment.options(**generator_options(config)).bind(
        config.generator,
        config.feedback_log.store,
        config.artifact_uri,
        config.artifact_options,
        config.tuning.namespaces,
    )
    feedback_log = FeedbackLogDeployment.options(
        name="FeedbackLog",
        num_replicas=1,  # the single writer of generations and feedback
        max_ongoing_requests=config.feedback_log.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.feedback_log.num_cpus},
    ).bind(config.feedback_log)
    loop_controller = None
    if config.tuning.enabled:
        loop_controller = LoopController.options(
            name="LoopController", num_replicas=1, ray_actor_options={"num_cpus": 0.1}
        ).bind(config)
    return Ingress.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    ).bind(config, generator, feedback_log, loop_controller)
