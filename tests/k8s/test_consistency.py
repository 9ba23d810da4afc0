"""Ports, labels and selectors agree; GPUs, limits, images and resources are as the product needs."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml

from services.config import DEFAULT_GRPC_MAX_MESSAGE_BYTES, DEFAULT_GRPC_PORT, AppConfig
from tests.k8s.conftest import K8S_DIR, REPO_ROOT, render
from tests.k8s.validation import pod_templates, split_image

OVERLAYS = render.OVERLAYS
RAY_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001}
# Ports of Ray pods that something outside the namespace may reach, and who (docs/ARCHITECTURE.md, Security):
# Prometheus scrapes metrics; the KubeRay operator deploys serveConfigV2 through the dashboard.
EXTERNAL_ALLOWED = {"metrics": "any", "dashboard": "kuberay-operator"}


# -- helpers ----------------------------------------------------------------------------------------


def _rayservice(docs):
    return next(d for d in docs if d["kind"] == "RayService")


def _cluster(docs):
    return _rayservice(docs)["spec"]["rayClusterConfig"]


def _worker_groups(docs):
    return _cluster(docs).get("workerGroupSpecs", [])


def pods(docs) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(where, labels as running, pod spec) of every pod; KubeRay's own labels are added to Ray pods."""
    out = []
    for doc in docs:
        for where, template in pod_templates(doc):
            labels = dict(template.get("metadata", {}).get("labels", {}))
            if doc["kind"] == "RayService":
                labels["ray.io/node-type"] = "head" if where == "head" else "worker"
                labels["ray.io/is-ray-node"] = "yes"
            name = doc["metadata"].get("name", doc["metadata"].get("generateName"))
            out.append((f"{doc['kind']}/{name} {where}", labels, template["spec"]))
    return out


def containers(docs):
    for where, _, spec in pods(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield where, c


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are used"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _port_names(spec) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", []) if "name" in p
    }


def _ray_containers(docs):
    return [c for where, c in containers(docs) if where.startswith("RayService")]


def _serve_config(docs):
    return yaml.safe_load(_rayservice(docs)["spec"]["serveConfigV2"])


# -- Services and the gateway -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_that_have_their_target_ports(rendered, overlay):
    docs = rendered[overlay]
    all_pods = pods(docs)
    for svc in [d for d in docs if d["kind"] == "Service"]:
        selected = [
            (w, spec)
            for w, labels, spec in all_pods
            if _selects({"matchLabels": svc["spec"]["selector"]}, labels)
        ]
        assert selected, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for where, spec in selected:
                target = port["targetPort"]
                if isinstance(target, str):
                    assert target in _port_names(spec), (
                        f"{svc['metadata']['name']}: {where} lacks port {target}"
                    )
                else:
                    assert target in _port_names(spec).values()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_service_exposes_the_grpc_port_of_every_ray_pod(rendered, overlay):
    docs = rendered[overlay]
    serve = _serve_config(docs)
    assert serve["grpc_options"]["port"] == DEFAULT_GRPC_PORT
    svc = _rayservice(docs)["spec"]["serveService"]
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["serve-grpc"]["port"] == DEFAULT_GRPC_PORT
    assert "selector" not in svc["spec"], "KubeRay owns the serve Service's selector"
    for where, labels, spec in pods(docs):
        if labels.get("ray.io/is-ray-node") == "yes":
            names = _port_names(spec)
            assert names.get("serve-grpc") == DEFAULT_GRPC_PORT, where
            assert names.get("serve") == serve["http_options"]["port"], where
            assert names.get("metrics") == 8080, where


SERVING_ROLE = {"illume.dev/role": "serving"}


def _envoy(docs) -> dict[str, Any]:
    config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "illume-grpc-gateway"
    )
    return yaml.safe_load(config["data"]["envoy.yaml"])


def _upstream_services(docs) -> dict[str, dict[str, Any]]:
    """For each of the gateway's upstream clusters (by name): the cluster, the Service its one
    address resolves (by DNS name) and that Service's port."""
    out = {}
    for cluster in _envoy(docs)["static_resources"]["clusters"]:
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == address["address"])
        port = next(p for p in svc["spec"]["ports"] if p["port"] == address["port_value"])
        out[cluster["name"]] = {"service": svc, "port": port, "cluster": cluster}
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_balances_per_serving_pod_and_listens_on_its_ports(rendered, overlay):
    docs = rendered[overlay]
    upstreams = _upstream_services(docs)
    # Serve's gRPC proxy (the API) and its HTTP proxy (the annotation web app), nothing else.
    by_target = {u["port"]["targetPort"]: u for u in upstreams.values()}
    assert sorted(by_target) == ["serve", "serve-grpc"] and len(upstreams) == 2
    assert by_target["serve-grpc"]["port"]["port"] == DEFAULT_GRPC_PORT
    assert by_target["serve"]["port"]["port"] == _serve_config(docs)["http_options"]["port"]
    for upstream in upstreams.values():
        svc, cluster = upstream["service"], upstream["cluster"]
        # One host per pod: a headless Service resolved by STRICT_DNS (a ClusterIP would be one
        # host, and HTTP/2's few long-lived connections would pin the load to a few pods).
        assert svc["spec"].get("clusterIP") == "None", "the gateway's upstream is a headless Service"
        assert cluster["type"] == "STRICT_DNS"
        assert cluster["lb_policy"] in ("LEAST_REQUEST", "ROUND_ROBIN")
    grpc = json.dumps(by_target["serve-grpc"]["cluster"])
    assert "http2_protocol_options" in grpc, "Serve's gRPC proxy speaks HTTP/2 only"
    http = json.dumps(by_target["serve"]["cluster"])
    assert "http2_protocol_options" not in http, "Serve's HTTP proxy (uvicorn) has no h2c"
    envoy = _envoy(docs)
    listeners = {
        x["name"]: x["address"]["socket_address"]["port_value"]
        for x in envoy["static_resources"]["listeners"]
    }
    deployment = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "illume-grpc-gateway"
    )
    names = _port_names(deployment["spec"]["template"]["spec"])
    assert names["grpc-tls"] == listeners["grpc_tls"]
    assert names["grpc-internal"] == listeners["grpc_internal"]
    tls = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]
    assert "DownstreamTlsContext" in tls["typed_config"]["@type"]
    public = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "illume-grpc-gateway"
    )
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["grpc-tls"], "only TLS is public"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_serving_pods_are_behind_the_gateway(rendered, overlay):
    docs = rendered[overlay]
    serving_groups = [
        g["groupName"]
        for g in _worker_groups(docs)
        if SERVING_ROLE.items() <= g["template"]["metadata"]["labels"].items()
    ]
    for upstream in _upstream_services(docs).values():
        selector = upstream["service"]["spec"]["selector"]
        assert SERVING_ROLE.items() <= selector.items()
        chosen = [where for where, labels, _ in pods(docs) if _selects({"matchLabels": selector}, labels)]
        assert serving_groups and sorted(chosen) == sorted(
            f"RayService/illume worker {name}" for name in serving_groups
        ), "the head, training workers and other pods are not selected"
    args = AppConfig.model_validate(_serve_config(docs)["applications"][0]["args"])
    if overlay == "gpu":
        training = [g for g in _worker_groups(docs) if g["groupName"] not in serving_groups]
        assert training, "gpu has a training group, and it is not behind the gateway"
        # Serving replicas are pinned to serving nodes by a resource only those offer.
        for name, amount in args.serve_resources.items():
            for g in _worker_groups(docs):
                offered = json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"')))
                assert (name in offered) == (g["groupName"] in serving_groups), g["groupName"]
                assert amount <= offered.get(name, amount)


def test_gpu_rounds_are_pinned_to_training_nodes_by_resources(rendered):
    docs = rendered["gpu"]
    args = AppConfig.model_validate(_serve_config(docs)["applications"][0]["args"])
    tuning = args.tuning
    assert tuning.use_gpu and tuning.worker_resources and tuning.entrypoint_resources
    assert not args.shared_filesystem and tuning.storage_path.startswith("s3://")
    assert tuning.storage_path.split("/")[2] == args.artifact_uri.split("/")[2], "the artifact bucket"
    offering = {}
    for g in _worker_groups(docs):
        offered = json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"')))
        for name in {**tuning.worker_resources, **tuning.entrypoint_resources}:
            if name in offered:
                offering.setdefault(name, []).append(g)
    for name in {**tuning.worker_resources, **tuning.entrypoint_resources}:
        (group,) = offering[name]  # one group offers it: the training group
        assert group.get("minReplicas", 0) == 0 and int(group["rayStartParams"]["num-gpus"]) >= 1
        assert SERVING_ROLE.items() - group["template"]["metadata"]["labels"].items()
        assert group["maxReplicas"] * int(group["rayStartParams"]["num-gpus"]) >= tuning.num_workers
    # A GPU group scaling up from zero (node, driver, image pull) takes minutes: the round waits,
    # for its driver (the Jobs API's start timeout, on the head) and for its workers.
    assert tuning.schedule_timeout_s >= 600
    (head,) = _cluster(docs)["headGroupSpec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in head["env"]}
    assert int(env.get("RAY_JOB_START_TIMEOUT_SECONDS", 900)) >= 600


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_api_address_resolves_from_the_cluster(rendered, overlay):
    # Not 127.0.0.1 (the LoopController runs on a worker pod, the dashboard on the head), and not
    # KubeRay's illume-head-svc, which points at the active cluster while a new one starts.
    args = AppConfig.model_validate(_serve_config(rendered[overlay])["applications"][0]["args"])
    assert args.tuning.jobs_api_address == ""


def test_manual_round_job_calls_the_internal_gateway_with_an_admin_key(rendered, extra_manifests):
    for overlay in OVERLAYS:
        internal = next(
            d
            for d in rendered[overlay]
            if d["kind"] == "Service" and d["metadata"]["name"] == "illume-grpc-internal"
        )
        target = f"{internal['metadata']['name']}:{internal['spec']['ports'][0]['port']}"
        job = next(d for d in extra_manifests if d["kind"] == "Job")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[:2] == ["client", "start-round"]
        assert args[args.index("--target") + 1] == target
        assert "--api-key-file" in args and "--namespace" in args
    # No CronJob: the LoopController starts rounds; a nightly call would fail with
    # FAILED_PRECONDITION whenever there is nothing to do.
    assert not any(d["kind"] == "CronJob" for o in OVERLAYS for d in rendered[o])


# -- NetworkPolicies ----------------------------------------------------------------------------------


def _policies(docs):
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_select_real_pods_and_ports(rendered, extra_manifests, overlay):
    docs = rendered[overlay]
    # The one-off round Job (k8s/jobs/) runs in the same namespace.
    all_pods = pods(docs + extra_manifests)
    for policy in _policies(docs):
        name, spec = policy["metadata"]["name"], policy["spec"]
        targets = [(w, spec_) for w, labels, spec_ in all_pods if _selects(spec["podSelector"], labels)]
        assert targets, f"NetworkPolicy {name} selects no pod"
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert any(_selects(peer["podSelector"], labels) for _, labels, _ in all_pods), (
                        f"NetworkPolicy {name}: a 'from' podSelector matches no pod of the namespace"
                    )
            for port in rule.get("ports", []):
                for where, pod_spec in targets:
                    if isinstance(port["port"], str):
                        assert port["port"] in _port_names(pod_spec), (
                            f"{name}: {where} has no port {port['port']}"
                        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_default_deny_and_who_reaches_the_ray_pods(rendered, overlay):
    docs = rendered[overlay]
    policies = _policies(docs)
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), (
        "default deny"
    )
    ray_labels = {"app.kubernetes.io/name": "illume", "app.kubernetes.io/component": "ray"}
    gateway = {"app.kubernetes.io/name": "illume", "app.kubernetes.io/component": "grpc-gateway"}
    grpc_sources, http_sources = [], []
    for policy in policies:
        selector = policy["spec"]["podSelector"]
        if not selector or not _selects(selector, {**ray_labels, "ray.io/node-type": "head"}):
            continue
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            assert peers, f"{policy['metadata']['name']}: a Ray pod rule must name its sources"
            ports = {p["port"] for p in rule.get("ports", [])}
            for peer in peers:
                assert "ipBlock" not in peer, "no address ranges reach Ray pods"
                if "namespaceSelector" in peer:
                    # From outside the namespace: only the listed ports, only the listed sources.
                    assert ports, f"{policy['metadata']['name']}: cross-namespace rule without ports"
                    for port in ports:
                        assert port in EXTERNAL_ALLOWED, f"{port} reachable from outside the namespace"
                        assert port not in RAY_PORTS or port == "dashboard"
                        if EXTERNAL_ALLOWED[port] != "any":
                            assert (
                                peer.get("podSelector", {})
                                .get("matchLabels", {})
                                .get("app.kubernetes.io/name")
                                == EXTERNAL_ALLOWED[port]
                            )
                    assert not ({"client", "gcs", 10001, 6379, 8265} & ports)
                elif peer["podSelector"]["matchLabels"] == ray_labels:
                    assert not ports, "Ray pods reach each other on every port"
                else:
                    assert ports, f"{policy['metadata']['name']}: rule without ports"
                    if ports & {"serve-grpc", DEFAULT_GRPC_PORT}:
                        grpc_sources.append(peer["podSelector"]["matchLabels"])
                    if ports & {"serve", _serve_config(docs)["http_options"]["port"]}:
                        http_sources.append(peer["podSelector"]["matchLabels"])
    assert grpc_sources == [gateway], "only the gateway reaches the gRPC port"
    assert http_sources == [gateway], "only the gateway reaches Serve's HTTP port (the web app)"


# -- Ray: GPUs, CPUs, limits, env -----------------------------------------------------------------------


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_start_params_match_container_limits(rendered, overlay):
    cluster = _cluster(rendered[overlay])
    groups = [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert int(group["rayStartParams"].get("num-gpus", 0)) == gpus, f"{name}: num-gpus != nvidia.com/gpu"
        assert int(container["resources"]["requests"].get("nvidia.com/gpu", gpus)) == gpus
        assert _quantity(group["rayStartParams"].get("num-cpus", 0)) <= _quantity(limits["cpu"]), name
        assert group["rayStartParams"].get("metrics-export-port", "8080") == "8080"


def test_dev_is_cpu_only(rendered):
    docs = rendered["dev"]
    assert not any("nvidia.com/gpu" in json.dumps(c["resources"]) for _, c in containers(docs))
    assert _serve_config(docs)["applications"][0]["args"]["generator"]["num_gpus"] == 0
    assert any(d["kind"] == "StatefulSet" and "postgres" in d["metadata"]["name"] for d in docs)
    assert any(
        d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"] for d in docs
    )


def test_gpu_has_serving_and_scale_to_zero_training_groups(rendered):
    docs = rendered["gpu"]
    cluster = _cluster(docs)
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if int(g["rayStartParams"].get("num-gpus", 0)) > 0]
    serving = [g for g in gpu_groups if g.get("minReplicas", 0) >= 1]
    training = [g for g in gpu_groups if g.get("minReplicas", 0) == 0 and g.get("replicas", 0) == 0]
    assert serving and training, "a GPU group that serves and a separate one that scales to zero"
    args = AppConfig.model_validate(_serve_config(docs)["applications"][0]["args"])
    assert 0 < args.generator.num_gpus <= max(int(g["rayStartParams"]["num-gpus"]) for g in serving)
    assert args.generator.num_cpus <= max(_quantity(g["rayStartParams"]["num-cpus"]) for g in serving)
    assert args.artifact_uri.startswith("s3://")
    assert not any(d["kind"] == "StatefulSet" for d in docs), "gpu uses an external PostgreSQL"
    assert not any(d["kind"] == "Secret" for d in docs), "gpu Secrets are created by the operator"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_container_has_the_grpc_limit_and_the_database_secret(rendered, overlay):
    docs = rendered[overlay]
    ray = _ray_containers(docs)
    assert len(ray) == 1 + len(_worker_groups(docs))
    for c in ray:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(DEFAULT_GRPC_MAX_MESSAGE_BYTES)
        assert {"secretRef": {"name": "illume-postgres"}} in c["envFrom"]
        assert {"name", "mountPath"} <= set(c["volumeMounts"][0])
        assert "readinessProbe" in c and "livenessProbe" in c
    args = AppConfig.model_validate(_serve_config(docs)["applications"][0]["args"])
    assert args.feedback_log.store.backend == "postgresql"
    assert "@" not in args.feedback_log.store.url, "no credentials in the Serve config"
    keys_dir = str(args.auth.keys_file.parent)
    for c in ray:
        assert keys_dir in {m["mountPath"] for m in c["volumeMounts"]}
    if args.artifact_uri.startswith("/"):
        for c in ray:
            assert any(args.artifact_uri.startswith(m["mountPath"]) for m in c["volumeMounts"])


WEB_SESSION_SECRET = "illume-web-session"


def _offered_resources(group) -> dict[str, float]:
    return json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))


def ingress_hosts(docs, args: AppConfig) -> list[str]:
    """The Ray pods ("head", "worker <group>") where Serve may place an Ingress replica: those whose
    Ray resources hold its CPUs and every custom resource it asks for (``serve_resources``)."""
    cluster = _cluster(docs)
    groups = [("head", cluster["headGroupSpec"])] + [
        (f"worker {g['groupName']}", g) for g in cluster.get("workerGroupSpecs", [])
    ]
    hosts = []
    for where, group in groups:
        params = group["rayStartParams"]
        (container,) = group["template"]["spec"]["containers"]
        cpus = _quantity(params.get("num-cpus", container["resources"]["limits"]["cpu"]))
        offered = _offered_resources(group)
        fits = all(offered.get(name, 0) >= amount for name, amount in args.serve_resources.items())
        if cpus >= args.ingress.num_cpus and fits:
            hosts.append(where)
    return hosts


def session_secret_mount(spec, secret_file) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(volumeMount, volume) that puts ``secret_file`` into the pod, or None."""
    (container,) = spec["containers"]
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == str(secret_file.parent) and not mount.get("subPath"):
            return mount, next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return None


def check_session_secret(docs) -> None:
    args = AppConfig.model_validate(_serve_config(docs)["applications"][0]["args"])
    secret_file = args.web.session_secret_file
    assert secret_file is not None, "every Ingress replica must read one secret (web.session_secret_file)"
    # Browsers reach the app over the gateway's TLS listener (or http://localhost, a port-forward).
    assert args.web.cookie_secure is True
    hosts = ingress_hosts(docs, args)
    assert hosts, "some pod must be able to run the Ingress"
    # The head as well (k8s/base/rayservice.yaml): it takes no replica only while its num-cpus is 0.
    must_mount = {*hosts, "head"}
    for where, _, spec in pods(docs):
        if not where.startswith("RayService/") or where.split(" ", 1)[1] not in must_mount:
            continue
        found = session_secret_mount(spec, secret_file)
        assert found, f"{where} may run an Ingress replica but has no {secret_file.parent} mount"
        mount, volume = found
        assert mount.get("readOnly") is True, where
        assert volume["secret"]["secretName"] == WEB_SESSION_SECRET, where
        # The Secret's key is the file's name (no items: a key renamed in the Secret would vanish).
        assert "items" not in volume["secret"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_that_may_run_the_ingress_mounts_the_session_secret(rendered, overlay):
    check_session_secret(rendered[overlay])
    # Created by the operator (docs/DEPLOY.md), never committed.
    assert not any(
        d["kind"] == "Secret" and d["metadata"]["name"] == WEB_SESSION_SECRET for d in rendered[overlay]
    )


def test_the_session_secret_check_fails_without_the_mount(rendered):
    docs = copy.deepcopy(rendered["gpu"])
    serving = next(
        g for g in _worker_groups(docs) if SERVING_ROLE.items() <= g["template"]["metadata"]["labels"].items()
    )
    (container,) = serving["template"]["spec"]["containers"]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "web-session"]
    with pytest.raises(AssertionError, match="may run an Ingress replica"):
        check_session_secret(docs)


def test_deploy_md_creates_the_session_secret_under_the_key_the_pods_read(rendered):
    text = (REPO_ROOT / "docs" / "DEPLOY.md").read_text()
    (key,) = set(
        re.findall(rf"create secret generic {WEB_SESSION_SECRET}\s+\\?\s*--from-literal=([\w.-]+)=", text)
    )
    for overlay in OVERLAYS:
        args = AppConfig.model_validate(_serve_config(rendered[overlay])["applications"][0]["args"])
        assert args.web.session_secret_file.name == key, overlay


# -- images, resources, security -----------------------------------------------------------------------


def _all_containers(rendered, extra_manifests):
    out = [(f"{o}: {w}", c) for o in OVERLAYS for w, c in containers(rendered[o])]
    return out + [(f"jobs: {w}", c) for w, c in containers(extra_manifests)]


def _pinned(image: str) -> bool:
    name, rest = split_image(image)
    return bool(name) and (rest.startswith("@sha256:") or (rest.startswith(":") and rest != ":latest"))


def test_every_image_is_pinned_by_tag(rendered, extra_manifests):
    assert not _pinned("envoyproxy/envoy") and not _pinned("postgres:latest") and not _pinned("reg:5000/x")
    assert _pinned("reg:5000/x:1.0") and _pinned("x@sha256:" + "0" * 64)
    for where, c in _all_containers(rendered, extra_manifests):
        assert _pinned(c["image"]), f"{where}: image {c['image']} is not pinned"
    for o in OVERLAYS:
        image = _cluster(rendered[o]).get("autoscalerOptions", {}).get("image")
        assert image is None or _pinned(image)


def test_every_container_sets_resources(rendered, extra_manifests):
    for where, c in _all_containers(rendered, extra_manifests):
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"{where} {c['name']}: {kind}"
    for o in OVERLAYS:
        cluster = _cluster(rendered[o])
        if cluster.get("enableInTreeAutoscaling"):
            resources = cluster["autoscalerOptions"]["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
                resources["limits"]
            )


def test_pods_run_as_non_root(rendered, extra_manifests):
    docs = [d for o in OVERLAYS for d in rendered[o]] + extra_manifests
    for where, _, spec in pods(docs):
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, where
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where


# -- observability --------------------------------------------------------------------------------------


def test_pod_monitor_scrapes_the_ray_metrics_port(rendered):
    docs = rendered["gpu"]
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    selected = [spec for _, labels, spec in pods(docs) if _selects(monitor["spec"]["selector"], labels)]
    assert len(selected) == 1 + len(_worker_groups(docs))
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert all(_port_names(spec)[endpoint["port"]] == 8080 for spec in selected)


# Emitted by the LoopController (not yet in services/metrics.py).
PENDING_METRICS = {"illume_tuning_rounds_total"}


def test_grafana_dashboard_covers_the_product_metrics(rendered):
    dashboard_cm = next(
        d for d in rendered["gpu"] if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]
    )
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_cm["data"]["illume-dashboard.json"])
    text = (K8S_DIR / "components" / "monitoring" / "illume-dashboard.json").read_text()
    assert json.loads(text) == dashboard
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("latency", "batch", "throughput", "feedback", "acceptance per adapter", "rounds"):
        assert word in titles
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bray_(illume_\w+)", exprs)}
    sources = "".join(p.read_text() for p in (REPO_ROOT / "services").rglob("*.py"))
    missing = {m for m in used if f'"{m}"' not in sources} - PENDING_METRICS
    assert not missing, f"dashboard uses metrics no service defines: {missing}"


def test_the_database_ca_that_deploy_md_names_is_mounted_on_every_gpu_ray_container(rendered):
    # docs/DEPLOY.md has the operator create Secret illume-postgres with PGSSLMODE=verify-full and
    # PGSSLROOTCERT: that file must exist in every Ray container, or no connection verifies.
    text = (REPO_ROOT / "docs" / "DEPLOY.md").read_text()
    assert "PGSSLMODE=verify-full" in text
    (root_cert,) = set(re.findall(r"PGSSLROOTCERT=(\S+)", text))
    docs = rendered["gpu"]
    for _, labels, spec in pods(docs):
        if labels.get("ray.io/is-ray-node") != "yes":
            continue
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        directory = root_cert.rsplit("/", 1)[0]
        assert directory in mounts, f"{directory} not mounted"
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[directory])
        assert volume["secret"]["secretName"] == "illume-postgres-ca"
