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


def actor_options(config: AppConfig, num_cpus: float, **more: Any) -> dict[str, Any]:
    """A serving replica's Ray options: its CPUs, plus the resources that pin it to serving nodes."""
    options: dict[str, Any] = {"num_cpus": num_cpus, **more}
    if config.serve_resources:
        options["resources"] = dict(config.serve_resources)
    return options


def logging_config(config: AppConfig) -> dict[str, Any]:
    """Every deployment's Serve logging options (the access log is a config switch)."""
    return {"enable_access_log": config.access_log}


def generator_options(config: AppConfig) -> dict[str, Any]:
    g = config.generator
    options: dict[str, Any] = {
        "name": "Generator",
        "logging_config": logging_config(config),
        "max_ongoing_requests": g.max_ongoing_requests,
        "max_queued_requests": g.max_queued_requests,
        "ray_actor_options": actor_options(config, g.num_cpus, num_gpus=g.num_gpus),
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": config.ingress.shutdown_grace_s,
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
        logging_config=logging_config(config),
        ray_actor_options=actor_options(config, config.feedback_log.num_cpus),
        graceful_shutdown_timeout_s=config.ingress.shutdown_grace_s,
    ).bind(config.feedback_log, config.selection)
    loop_controller = None
    if config.tuning.enabled:
        loop_controller = LoopController.options(
            name="LoopController",
            num_replicas=1,
            ray_actor_options=actor_options(config, 0.1),
            logging_config=logging_config(config),
        ).bind(config)
    return Ingress.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        logging_config=logging_config(config),
        ray_actor_options=actor_options(config, config.ingress.num_cpus),
        graceful_shutdown_timeout_s=config.ingress.shutdown_grace_s,
    ).bind(config, generator, feedback_log, loop_controller)
