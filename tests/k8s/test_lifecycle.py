"""Stopping a serving pod loses no call: preStop, Serve's grace and the pod's grace period agree.

A serving pod that is deleted (upgrade, node drain, scale-down) leaves the gateway's endpoints at
once, but Envoy learns it only when it re-resolves the headless Service (``dns_refresh_rate``, plus
the DNS record's TTL). So its preStop first keeps serving that long, then asks Ray to drain the
node with a deadline of ``ingress.shutdown_grace_s`` (Serve then stops the node's replicas at
once: routers stop sending to them, calls in flight get that grace), waits that long, and only
then does the kubelet send SIGTERM, which stops the raylet and every replica on it at once.
``terminationGracePeriodSeconds`` must cover the whole preStop, or the kubelet kills the pod with
calls still running.
"""

from __future__ import annotations

import re

import pytest
import yaml

from services.config import AppConfig
from tests.k8s.conftest import render
from tests.k8s.test_consistency import SERVING_ROLE, _envoy, _serve_config, _worker_groups

# CoreDNS's default TTL for Service records (its kubernetes plugin, `ttl 5`).
DNS_TTL_S = 5
# What `ray drain-node` and finding the node's id took at most (about 4 s measured on one machine).
DRAIN_COMMAND_S = 10
# Serve polls a stopping replica for calls left every graceful_shutdown_wait_loop_s (2 s).
SERVE_WAIT_LOOP_S = 2


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", text)
    assert match, text
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def pre_stop(container) -> tuple[list[int], int | None]:
    """(the sleeps of a preStop script in order, the drain deadline it gives Ray, if any)."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    script = " ".join(command)
    sleeps = [int(s) for s in re.findall(r"\bsleep (\d+)\b", script)]
    deadline = re.search(r"--deadline-remaining-seconds (\d+)", script)
    return sleeps, int(deadline.group(1)) if deadline else None


def serving_groups(docs):
    return [
        g for g in _worker_groups(docs) if SERVING_ROLE.items() <= g["template"]["metadata"]["labels"].items()
    ]


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_serving_pods_outlast_their_pre_stop_and_serves_grace(rendered, overlay):
    docs = rendered[overlay]
    grace = AppConfig.model_validate(_serve_config(docs)["applications"][0]["args"]).ingress.shutdown_grace_s
    # Every upstream cluster of the gateway (gRPC and the web app's HTTP) must have let go of the pod.
    dns_refresh = max(
        _duration_s(cluster.get("dns_refresh_rate", "5s"))
        for cluster in _envoy(docs)["static_resources"]["clusters"]
    )
    groups = serving_groups(docs)
    assert groups
    for group in groups:
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        sleeps, deadline = pre_stop(container)
        assert len(sleeps) == 2 and deadline is not None, f"{group['groupName']}: sleep, drain, sleep"
        endpoint_wait, drain_wait = sleeps
        # The gateway stops sending before the drain starts.
        assert endpoint_wait >= dns_refresh + DNS_TTL_S, group["groupName"]
        # Ray's drain deadline and the wait after it are Serve's grace for calls in flight.
        assert deadline == drain_wait == grace, group["groupName"]
        termination = spec["terminationGracePeriodSeconds"]
        assert termination > endpoint_wait + grace, group["groupName"]
        assert termination >= endpoint_wait + DRAIN_COMMAND_S + drain_wait + SERVE_WAIT_LOOP_S, group[
            "groupName"
        ]


def test_the_check_fails_when_serves_grace_outgrows_the_pod(rendered):
    docs = [dict(d) for d in rendered["gpu"]]
    rayservice = next(d for d in docs if d["kind"] == "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    serve["applications"][0]["args"]["ingress"]["shutdown_grace_s"] = 60
    broken = {**rayservice, "spec": {**rayservice["spec"], "serveConfigV2": yaml.safe_dump(serve)}}
    docs[docs.index(rayservice)] = broken
    with pytest.raises(AssertionError):
        test_serving_pods_outlast_their_pre_stop_and_serves_grace({"gpu": docs}, "gpu")
