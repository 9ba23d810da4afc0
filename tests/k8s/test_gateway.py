"""The public gateway routes an explicit allow-list; the rest stays in the cluster.

The gateway is rendered here with the pinned kustomize (``k8s/render.py``), each Envoy listener is
mapped to the Services that reach it, and every route of a listener that something outside the
cluster reaches must be one of ``PUBLIC_SERVICES`` (gRPC) or ``PUBLIC_WEB_PATHS`` (the annotation
web app's annotator pages). The admin pages and AdminService are routed on the internal listener
only. A new public service or page is added to these lists on purpose, in the same change as its
route. Each route must also go to the right upstream: gRPC to Serve's gRPC proxy (HTTP/2, port
50051), pages to Serve's HTTP proxy (HTTP/1.1, the ``http_options`` port).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from services.config import DEFAULT_GRPC_PORT
from tests.k8s.conftest import render

# What the internet-facing listener may route to: full gRPC service names (docs/DEPLOY.md, 'Gateway').
PUBLIC_SERVICES = ("illume.v1.RationaleService", "illume.v1.FeedbackService")
# What only in-cluster callers reach (the round trigger, through the internal listener).
INTERNAL_ONLY = ("illume.v1.AdminService",)
# The web app's annotator pages, as (Envoy route match field, value): `/` exactly, sign-in and
# sign-out exactly, /judge and its sub-paths, image bytes and static assets.
PUBLIC_WEB_PATHS = (
    ("path", "/"),
    ("path", "/sign-in"),
    ("path", "/sign-out"),
    ("path_separated_prefix", "/judge"),
    ("prefix", "/images/"),
    ("prefix", "/assets/"),
)
# The admin pages and their POST actions: internal listener only (docs/DEPLOY.md).
ADMIN_WEB_PATHS = (("path_separated_prefix", "/admin"),)
WEB_MATCH_FIELDS = ("path", "path_separated_prefix", "prefix")
REFLECTION = "grpc.reflection."
GATEWAY = "illume-grpc-gateway"
# Service types that make a port reachable from outside the cluster.
EXTERNAL_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
HCM = "envoy.filters.network.http_connection_manager"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


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


def routed_web_path(route) -> tuple[str, str] | None:
    """(match field, value) of a route that matches on the path alone, else None (headers, a
    regex, case-insensitive matching: anything the allow-list cannot compare)."""
    match = route["match"]
    if len(match) != 1:
        return None
    ((field, value),) = match.items()
    return (field, value) if field in WEB_MATCH_FIELDS and isinstance(value, str) else None


def unlisted_routes(listener, services, web_paths=()) -> list[str]:
    """The routes of ``listener`` that forward something other than the allowed gRPC ``services``
    and ``web_paths``."""
    bad = []
    for route in routes(listener):
        if "direct_response" in route:
            continue  # answers in Envoy, forwards nothing
        service = routed_service(route)
        if service in services or (service is None and routed_web_path(route) in web_paths):
            continue
        bad.append(f"{listener['name']}: {route['match']} -> {service or 'not on the list'}")
    return bad


def path_matches(match: dict[str, Any], path: str) -> bool:
    """Whether Envoy's route ``match`` takes a request for ``path`` (query strings are ignored by
    ``path`` and ``path_separated_prefix``, so none is given here)."""
    (field,) = set(match) - {"grpc"}
    value = match[field]
    if field == "path":
        return path == value
    if field == "prefix":
        return path.startswith(value)
    if field == "path_separated_prefix":
        return path == value or path.startswith(value + "/")
    raise AssertionError(f"no model of Envoy's {field} match")


def route_for(listener, path: str) -> dict[str, Any] | None:
    """The route Envoy picks for ``path`` (the first that matches), or None: a 404."""
    return next((r for r in routes(listener) if path_matches(r["match"], path)), None)


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


def serve_http_port(docs) -> int:
    rayservice = next(d for d in docs if d["kind"] == "RayService")
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])["http_options"]["port"]


def upstream_ports(cluster) -> set[int]:
    return {
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    }


def upstream_protocol(cluster) -> str:
    """'http2' or 'http1': what Envoy speaks to the cluster's hosts."""
    options = cluster.get("typed_extension_protocol_options", {}).get(HTTP_OPTIONS, {})
    explicit = options.get("explicit_http_config", {})
    return "http2" if "http2_protocol_options" in explicit else "http1"


def misrouted(docs, listener) -> list[str]:
    """Routes of ``listener`` whose upstream is not the one their kind needs: a gRPC route must go
    to Serve's gRPC proxy (HTTP/2 on the gRPC port), a page to Serve's HTTP proxy (HTTP/1.1 on
    ``http_options.port``)."""
    clusters = {c["name"]: c for c in envoy_config(docs)["static_resources"]["clusters"]}
    grpc_upstream = ({DEFAULT_GRPC_PORT}, "http2")
    http_upstream = ({serve_http_port(docs)}, "http1")
    bad = []
    for route in routes(listener):
        if "direct_response" in route:
            continue
        cluster = clusters.get(route["route"].get("cluster"))
        found = (upstream_ports(cluster), upstream_protocol(cluster)) if cluster else None
        wanted = grpc_upstream if routed_service(route) else http_upstream
        if found != wanted:
            bad.append(f"{listener['name']}: {route['match']} -> {route['route']}")
    return bad


# -- the checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_public_listener_routes_only_the_allow_list(built, overlay):
    public, _ = listeners_by_exposure(built[overlay])
    assert [x["name"] for x in public] == ["grpc_tls"], "exactly the TLS listener is public"
    (listener,) = public
    assert unlisted_routes(listener, PUBLIC_SERVICES, PUBLIC_WEB_PATHS) == []
    # Every allowed service and page stays routed (clients and annotators depend on them).
    assert sorted(filter(None, map(routed_service, routes(listener)))) == sorted(PUBLIC_SERVICES)
    web = [routed_web_path(r) for r in routes(listener) if not routed_service(r)]
    assert sorted(web) == sorted(PUBLIC_WEB_PATHS)
    assert misrouted(built[overlay], listener) == []


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_internal_listener_routes_admin_service_and_the_admin_pages(built, overlay):
    _, internal = listeners_by_exposure(built[overlay])
    (inner,) = internal
    assert unlisted_routes(inner, INTERNAL_ONLY, PUBLIC_WEB_PATHS + ADMIN_WEB_PATHS) == []
    web = [routed_web_path(r) for r in routes(inner) if not routed_service(r)]
    assert set(ADMIN_WEB_PATHS) <= set(web), "the admin pages are reached here"
    assert misrouted(built[overlay], inner) == []


# Requests as the web app and the clients make them, and what the public listener does with them.
PUBLIC_REQUESTS = [
    "/",
    "/sign-in",
    "/sign-out",
    "/judge",
    "/judge/submit",
    "/judge/undo",
    "/images/" + "0" * 64,
    "/assets/app.css",
    "/illume.v1.RationaleService/Generate",
    "/illume.v1.FeedbackService/SubmitFeedback",
]
NOT_PUBLIC = [
    "/admin",
    "/admin/",
    "/admin/confirm",
    "/admin/act",
    "/illume.v1.AdminService/PromoteAdapter",
    "/-/routes",
    "/-/healthz",
    "/ray.serve.RayServeAPIService/ListApplications",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/judgement",
    "/sign-in/x",
    "/images",
    "/docs",
    "/openapi.json",
    "/favicon.ico",
]


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_what_a_request_for_each_path_reaches(built, overlay):
    public, internal = listeners_by_exposure(built[overlay])
    (listener,), (inner,) = public, internal
    for path in PUBLIC_REQUESTS:
        assert route_for(listener, path), f"{path}: no public route"
    for path in NOT_PUBLIC:
        assert route_for(listener, path) is None, f"{path}: routed on the public listener"
    for path in ("/admin", "/admin/confirm", "/admin/act", "/sign-in", "/assets/app.css"):
        assert route_for(inner, path), f"{path}: the internal listener must route it"


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_public_listener_speaks_http1_and_http2_over_tls(built, overlay):
    """Browsers negotiate h2 or http/1.1; gRPC clients h2. The codec follows ALPN."""
    public, internal = listeners_by_exposure(built[overlay])
    (listener,), (inner,) = public, internal
    (chain,) = listener["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]
    assert "DownstreamTlsContext" in tls["@type"]
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2", "http/1.1"]
    (hcm,) = connection_managers(listener)
    assert hcm["codec_type"] == "AUTO"
    # The internal listener: h2c for gRPC, HTTP/1.1 for a browser behind a port-forward.
    (inner_hcm,) = connection_managers(inner)
    assert inner_hcm["codec_type"] == "AUTO"


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_http_upstream_checks_serves_proxy_health(built, overlay):
    docs = built[overlay]
    clusters = envoy_config(docs)["static_resources"]["clusters"]
    (http,) = [c for c in clusters if upstream_ports(c) == {serve_http_port(docs)}]
    assert http["type"] == "STRICT_DNS"
    (check,) = http["health_checks"]
    # Serve's HTTP proxy answers 200 there, 503 while its node drains.
    assert check["http_health_check"]["path"] == "/-/healthz"
    idle = http["typed_extension_protocol_options"][HTTP_OPTIONS]["common_http_protocol_options"]
    # Below Serve's default HTTP keep-alive (90 s), so Envoy closes an idle connection first.
    assert int(idle["idle_timeout"].rstrip("s")) < 90


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
        assert not {routed_web_path(r) for r in routes(listener)} & set(ADMIN_WEB_PATHS)
    # The round trigger still reaches AdminService through the internal listener.
    (inner,) = internal
    assert set(INTERNAL_ONLY) <= {routed_service(r) for r in routes(inner)}
    # Serve's proxy answers reflection itself, before the Ingress checks the API key: off.
    rayservice = next(d for d in docs if d["kind"] == "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve["grpc_options"]["enable_reflection"] is False
    # Serve's ports themselves are ClusterIP only (their NetworkPolicy admits only the gateway).
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
        {"path_separated_prefix": "/admin"},
        {"prefix": "/admin"},
        {"path": "/admin/act"},
        {"prefix": "/judge"},
        {"prefix": "/images"},
        {"path": "/-/routes"},
        {"path": "/sign-in", "case_sensitive": False},
        {"path": "/sign-in", "headers": [{"name": "x-debug", "present_match": True}]},
    ],
)
def test_a_route_not_on_the_list_is_reported(built, extra):
    public, _ = listeners_by_exposure(built["dev"])
    listener = copy.deepcopy(public[0])
    connection_managers(listener)[0]["route_config"]["virtual_hosts"][0]["routes"].append(
        {"match": extra, "route": {"cluster": "ray_serve_http"}}
    )
    assert len(unlisted_routes(listener, PUBLIC_SERVICES, PUBLIC_WEB_PATHS)) == 1


def test_a_listener_made_public_is_checked(built):
    docs = copy.deepcopy(built["dev"])
    internal_svc = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "illume-grpc-internal"
    )
    internal_svc["spec"]["type"] = "LoadBalancer"
    public, _ = listeners_by_exposure(docs)
    assert {x["name"] for x in public} == {"grpc_tls", "grpc_internal"}
    inner = next(x for x in public if x["name"] == "grpc_internal")
    # AdminService and the admin pages on a public listener are both reported.
    assert len(unlisted_routes(inner, PUBLIC_SERVICES, PUBLIC_WEB_PATHS)) == 2


@pytest.mark.parametrize(
    ("match", "cluster"),
    [
        ({"path": "/sign-in"}, "ray_serve_grpc"),
        ({"prefix": "/illume.v1.RationaleService/"}, "ray_serve_http"),
        ({"prefix": "/assets/"}, "no_such_cluster"),
    ],
)
def test_a_route_to_the_wrong_upstream_is_reported(built, match, cluster):
    docs = built["dev"]
    public, _ = listeners_by_exposure(docs)
    listener = copy.deepcopy(public[0])
    vhost = connection_managers(listener)[0]["route_config"]["virtual_hosts"][0]
    vhost["routes"].insert(0, {"match": match, "route": {"cluster": cluster}})
    assert len(misrouted(docs, listener)) == 1


def test_the_path_model_follows_envoys_match_rules():
    assert path_matches({"path": "/"}, "/") and not path_matches({"path": "/"}, "/x")
    assert path_matches({"path_separated_prefix": "/judge"}, "/judge")
    assert path_matches({"path_separated_prefix": "/judge"}, "/judge/submit")
    assert not path_matches({"path_separated_prefix": "/judge"}, "/judgement")
    assert path_matches({"prefix": "/images/"}, "/images/x") and not path_matches(
        {"prefix": "/images/"}, "/images"
    )


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
