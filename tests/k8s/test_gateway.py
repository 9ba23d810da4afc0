"""The public gRPC gateway routes an explicit allow-list of services; the rest stays in the cluster.

The gateway is rendered here with the pinned kustomize (``k8s/render.py``), each Envoy listener is
mapped to the Services that reach it, and every route of a listener that something outside the
cluster reaches must be one of ``PUBLIC_SERVICES``. A new public service (or HTTP route) is added to
this list on purpose, in the same change as its route.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.k8s.conftest import render

# What the internet-facing listener may route to: full gRPC service names (docs/DEPLOY.md, 'Gateway').
PUBLIC_SERVICES = ("illume.v1.RationaleService", "illume.v1.FeedbackService")
# What only in-cluster callers reach (the round trigger, through the internal listener).
INTERNAL_ONLY = ("illume.v1.AdminService",)
REFLECTION = "grpc.reflection."
GATEWAY = "illume-grpc-gateway"
# Service types that make a port reachable from outside the cluster.
EXTERNAL_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
HCM = "envoy.filters.network.http_connection_manager"


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    """Every overlay as kustomize builds it from the files on disk now (not the committed render)."""
    return {
        path.stem: [d for d in yaml.safe_load_all(text) if d]
        for path, text in render.rendered_files().items()
    }


# -- reading the gateway ----------------------------------------------------------------------------


def envoy_config(docs) -> dict[str, Any]:
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == GATEWAY)
    return yaml.safe_load(config["data"]["envoy.yaml"])


def connection_managers(listener) -> list[dict[str, Any]]:
    """The HTTP connection managers of a listener (every filter chain)."""
    out = []
    for chain in listener.get("filter_chains", []):
        for f in chain.get("filters", []):
            assert f["name"] == HCM, f"listener {listener['name']}: unexpected network filter {f['name']}"
            out.append(f["typed_config"])
    return out


def routes(listener) -> list[dict[str, Any]]:
    out = []
    for hcm in connection_managers(listener):
        assert "rds" not in hcm and "scoped_routes" not in hcm, "routes must be static to be checked"
        for vhost in hcm["route_config"]["virtual_hosts"]:
            assert "vhds" not in hcm["route_config"], "virtual hosts must be static to be checked"
            out.extend(vhost.get("routes", []))
    return out


def routed_service(route) -> str | None:
    """The one gRPC service a route forwards, or None when the route is not of the form
    ``{prefix: "/<package>.<Service>/"}`` (a catch-all, a regex, a bare path, ...)."""
    match = route["match"]
    prefix = match.get("prefix")
    if set(match) - {"prefix", "grpc"} or not prefix:
        return None
    name = prefix.strip("/")
    if prefix != f"/{name}/" or "/" in name or "." not in name:
        return None
    return name


def unlisted_routes(listener, allowed) -> list[str]:
    """The routes of ``listener`` that forward something other than the ``allowed`` services."""
    bad = []
    for route in routes(listener):
        if "direct_response" in route:
            continue  # answers in Envoy, forwards nothing
        service = routed_service(route)
        if service not in allowed:
            bad.append(f"{listener['name']}: {route['match']} -> {service or 'not one service'}")
    return bad


def externally_reached_ports(docs) -> set[int]:
    """Container ports of the gateway pods that a Service of an external type (or a hostPort) exposes."""
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == GATEWAY)
    spec = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert not spec.get("hostNetwork"), "the gateway must not share the node's network"
    by_name = {}
    exposed = set()
    for c in spec["containers"]:
        for p in c.get("ports", []):
            by_name[p.get("name")] = p["containerPort"]
            if p.get("hostPort"):
                exposed.add(p["containerPort"])
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"].get("selector") or {}
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            continue
        external = svc["spec"].get("type", "ClusterIP") in EXTERNAL_SERVICE_TYPES or svc["spec"].get(
            "externalIPs"
        )
        if external:
            for p in svc["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                exposed.add(by_name[target] if isinstance(target, str) else target)
    return exposed


def listeners_by_exposure(docs) -> tuple[list[dict], list[dict]]:
    """(public, internal) Envoy listeners of the gateway."""
    external = externally_reached_ports(docs)
    public, internal = [], []
    for listener in envoy_config(docs)["static_resources"]["listeners"]:
        port = listener["address"]["socket_address"]["port_value"]
        (public if port in external else internal).append(listener)
    return public, internal


# -- the checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_public_listener_routes_only_the_allow_list(built, overlay):
    public, _ = listeners_by_exposure(built[overlay])
    assert [x["name"] for x in public] == ["grpc_tls"], "exactly the TLS listener is public"
    (listener,) = public
    assert unlisted_routes(listener, PUBLIC_SERVICES) == []
    # Every allowed service stays routed (clients depend on them).
    assert sorted(filter(None, map(routed_service, routes(listener)))) == sorted(PUBLIC_SERVICES)


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_paths_are_normalized_before_routing(built, overlay):
    """A prefix match is only an allow-list when ``/A/../B`` or ``//B`` cannot slip past it."""
    for listener in envoy_config(built[overlay])["static_resources"]["listeners"]:
        for hcm in connection_managers(listener):
            assert hcm.get("normalize_path") is True, listener["name"]
            assert hcm.get("merge_slashes") is True, listener["name"]
            assert hcm.get("path_with_escaped_slashes_action") == "REJECT_REQUEST", listener["name"]


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_admin_service_and_reflection_stay_inside_the_cluster(built, overlay):
    docs = built[overlay]
    public, internal = listeners_by_exposure(docs)
    for listener in public:
        routed = {routed_service(r) for r in routes(listener)}
        assert not routed & set(INTERNAL_ONLY)
        assert not any(s and s.startswith(REFLECTION) for s in routed)
    # The round trigger still reaches AdminService through the internal listener, and only it.
    (inner,) = internal
    assert unlisted_routes(inner, INTERNAL_ONLY) == []
    # Serve's proxy answers reflection itself, before the Ingress checks the API key: off.
    rayservice = next(d for d in docs if d["kind"] == "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve["grpc_options"]["enable_reflection"] is False
    # Serve's gRPC port itself is ClusterIP only (its NetworkPolicy admits only the gateway).
    serve_svc = rayservice["spec"]["serveService"]
    assert serve_svc["spec"].get("type", "ClusterIP") == "ClusterIP"


# -- the checker itself -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"prefix": "/"},
        {"prefix": "/illume.v1.AdminService/"},
        {"prefix": "/grpc.reflection.v1alpha.ServerReflection/"},
        {"prefix": "/ray.serve.RayServeAPIService/"},
        {"safe_regex": {"regex": "/illume\\.v1\\..*"}},
        {"path": "/illume.v1.AdminService/ListAdapters"},
        {"prefix": "/illume.v1.Rationale"},
        {"prefix": "/annotate"},
    ],
)
def test_a_route_not_on_the_list_is_reported(built, extra):
    public, _ = listeners_by_exposure(built["dev"])
    listener = copy.deepcopy(public[0])
    connection_managers(listener)[0]["route_config"]["virtual_hosts"][0]["routes"].append(
        {"match": extra, "route": {"cluster": "ray_serve_grpc"}}
    )
    assert len(unlisted_routes(listener, PUBLIC_SERVICES)) == 1


def test_a_listener_made_public_is_checked(built):
    docs = copy.deepcopy(built["dev"])
    internal_svc = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "illume-grpc-internal"
    )
    internal_svc["spec"]["type"] = "LoadBalancer"
    public, _ = listeners_by_exposure(docs)
    assert {x["name"] for x in public} == {"grpc_tls", "grpc_internal"}
    inner = next(x for x in public if x["name"] == "grpc_internal")
    assert unlisted_routes(inner, PUBLIC_SERVICES), "AdminService on a public listener is reported"


# -- availability: retries, disruptions, per-pod stats ------------------------------------------------

# Retry conditions under which Envoy knows the call never reached a Serve replica.
NOT_DELIVERED = {"connect-failure", "refused-stream", "reset-before-request"}


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_retries_only_calls_that_reached_no_replica(built, overlay):
    for listener in envoy_config(built[overlay])["static_resources"]["listeners"]:
        for hcm in connection_managers(listener):
            for vhost in hcm["route_config"]["virtual_hosts"]:
                policies = [vhost.get("retry_policy")] + [
                    r["route"].get("retry_policy") for r in vhost["routes"]
                ]
                assert vhost.get("retry_policy"), f"{listener['name']}: no retry policy"
                for policy in filter(None, policies):
                    conditions = set(policy["retry_on"].split(","))
                    # Not unavailable / 5xx / reset / gateway-error: those replay delivered calls.
                    assert conditions <= NOT_DELIVERED, conditions
                    assert "retriable_status_codes" not in policy
                    assert 1 <= policy["num_retries"] <= 3
                    hosts = [p["name"] for p in policy.get("retry_host_predicate", [])]
                    assert "envoy.retry_host_predicates.previous_hosts" in hosts, "retry on another pod"


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_a_disruption_budget_and_anti_affinity_keep_a_gateway_up(built, overlay):
    docs = built[overlay]
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == GATEWAY)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = deployment["spec"]["replicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert 1 <= pdb["spec"]["minAvailable"] < max(replicas, 2)
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_envoy_admin_with_per_pod_stats_is_loopback_only(built, overlay):
    admin = envoy_config(built[overlay])["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1", "reachable through kubectl port-forward only"
    assert admin["port_value"] not in externally_reached_ports(built[overlay])


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_envoy_config_parses_as_envoys_bootstrap(built, overlay):
    """Every field (inside typed_config too) is one Envoy's API has: a misspelt field is an error.

    Needs Envoy's generated protos (the ``xds-protos`` package); skipped without them.
    """
    bootstrap_pb2 = pytest.importorskip("envoy.config.bootstrap.v3.bootstrap_pb2")
    import importlib
    import pkgutil

    import envoy
    from google.protobuf import json_format

    # typed_config is an Any: its message type must be imported to be resolved.
    for module in pkgutil.walk_packages(envoy.__path__, "envoy."):
        if module.name.endswith("_pb2"):
            try:
                importlib.import_module(module.name)
            except ImportError:
                continue
    config = envoy_config(built[overlay])
    json_format.ParseDict(config, bootstrap_pb2.Bootstrap())
    broken = copy.deepcopy(config)
    broken["static_resources"]["clusters"][0]["lb_polcy"] = "ROUND_ROBIN"
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(broken, bootstrap_pb2.Bootstrap())
