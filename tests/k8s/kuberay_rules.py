"""The KubeRay operator's own spec validation, re-stated in Python for the rules our manifests touch.

The CRD schemas (``validation.py``) cannot express these: KubeRay v1.7.0 runs them in Go
(``ray-operator/controllers/ray/utils/validation.go``) on every RayCluster, RayJob and RayService
before it reconciles, and a resource that fails one never gets a cluster (the operator only records
an event). Each rule below is one named function; its docstring names the Go function (and the
check inside it) that it mirrors. Helpers that mirror KubeRay's ``util.go`` predicates
(``IsAutoscalingEnabled``, ``IsAutoscalingV2Enabled``, ``IsGCSFaultToleranceEnabled``,
``IsAuthEnabled``, ``IsK8sAuthEnabled``) say so too.

Inputs are manifests as dicts (camelCase, as in YAML). A rule yields one message per violation; an
empty result means the operator accepts the resource as far as that rule goes. Feature gates take
KubeRay v1.7.0's defaults (``ray-operator/pkg/features``) unless a caller passes others.

Not mirrored (our manifests use none of it): NetworkPolicy / mTLS / history-server option details
(only "needs its feature gate" is), the RocksDB GCS backend's volume rules, worker group priority,
RayJob deletion strategies and RayCronJob.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# Constants of KubeRay v1.7.0 (ray-operator/controllers/ray/utils/constant.go).
MAX_RAYCLUSTER_NAME = 53
MAX_RAYSERVICE_NAME = MAX_RAYCLUSTER_NAME - 6
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
FT_ENABLED_ANNOTATION = "ray.io/ft-enabled"
EXTERNAL_STORAGE_NS_ANNOTATION = "ray.io/external-storage-namespace"
INITIALIZING_TIMEOUT_ANNOTATION = "ray.io/initializing-timeout"
ENV_REDIS_ADDRESS = "RAY_REDIS_ADDRESS"
ENV_REDIS_PASSWORD = "REDIS_PASSWORD"
ENV_REDIS_USERNAME = "REDIS_USERNAME"
ENV_AUTOSCALER_V2 = "RAY_enable_autoscaler_v2"
ENV_AUTOSCALER_START_CMD = "KUBERAY_GEN_AUTOSCALER_START_CMD"
RAY_START_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
AUTH_MIN_RAY = (2, 52, 0)
K8S_AUTH_MIN_RAY = (2, 55, 0)
RAYSERVICE_UPGRADE_TYPES = ("NewClusterWithIncrementalUpgrade", "NewCluster", "None")

# KubeRay v1.7.0 feature gate defaults (ray-operator/pkg/features/features.go).
DEFAULT_FEATURE_GATES: Mapping[str, bool] = {
    "RayJobDeletionPolicy": True,
    "RayServiceIncrementalUpgrade": True,
    "RayClusterNetworkPolicy": False,
    "GCSFaultToleranceEmbeddedStorage": False,
    "RayClusterMTLS": False,
    "RayClusterHistoryServer": False,
}

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_GO_DURATION = re.compile(r"^([-+]?)((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$")


@dataclass
class RayResource:
    """One RayService, RayCluster or RayJob, with the parts the rules read."""

    kind: str
    name: str
    annotations: dict[str, str]
    labels: dict[str, str]
    spec: dict[str, Any]
    feature_gates: Mapping[str, bool] = field(default_factory=lambda: dict(DEFAULT_FEATURE_GATES))

    @property
    def cluster(self) -> dict[str, Any] | None:
        """The RayClusterSpec: a RayService's rayClusterConfig, a RayJob's rayClusterSpec (may be
        None), a RayCluster's spec."""
        if self.kind == "RayService":
            return self.spec.get("rayClusterConfig") or {}
        if self.kind == "RayJob":
            return self.spec.get("rayClusterSpec")
        return self.spec

    def gate(self, name: str) -> bool:
        return bool(self.feature_gates.get(name, False))


def resource(doc: Mapping[str, Any], feature_gates: Mapping[str, bool] | None = None) -> RayResource:
    """A manifest (dict) as a RayResource."""
    meta = doc.get("metadata") or {}
    return RayResource(
        kind=doc["kind"],
        name=meta.get("name", ""),
        annotations=dict(meta.get("annotations") or {}),
        labels=dict(meta.get("labels") or {}),
        spec=doc.get("spec") or {},
        feature_gates=dict(DEFAULT_FEATURE_GATES if feature_gates is None else feature_gates),
    )


# -- helpers mirroring util.go ------------------------------------------------------------------------


def _head(cluster: Mapping[str, Any]) -> dict[str, Any]:
    return cluster.get("headGroupSpec") or {}


def _containers(group: Mapping[str, Any]) -> list[dict[str, Any]]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def _ray_container_env(group: Mapping[str, Any]) -> dict[str, str | None]:
    """The env of the Ray container (index 0, KubeRay's RayContainerIndex): name -> literal value."""
    containers = _containers(group)
    if not containers:
        return {}
    return {e["name"]: e.get("value") for e in containers[0].get("env") or []}


def autoscaling_enabled(cluster: Mapping[str, Any]) -> bool:
    """Mirrors ``IsAutoscalingEnabled``: enableInTreeAutoscaling is true."""
    return cluster.get("enableInTreeAutoscaling") is True


def autoscaler_v2_selected(cluster: Mapping[str, Any]) -> bool:
    """Mirrors ``IsAutoscalingV2Enabled``: autoscalerOptions.version is "v2"."""
    return (cluster.get("autoscalerOptions") or {}).get("version") == "v2"


def gcs_ft_enabled(cluster: Mapping[str, Any], annotations: Mapping[str, str]) -> bool:
    """Mirrors ``IsGCSFaultToleranceEnabled``: the ft annotation is "true" or
    gcsFaultToleranceOptions is set."""
    return (
        annotations.get(FT_ENABLED_ANNOTATION, "").lower() == "true"
        or cluster.get("gcsFaultToleranceOptions") is not None
    )


def token_auth_enabled(cluster: Mapping[str, Any]) -> bool:
    """Mirrors ``IsAuthEnabled``: authOptions.mode is "token"."""
    return (cluster.get("authOptions") or {}).get("mode") == "token"


def k8s_token_auth_enabled(auth_options: Mapping[str, Any] | None) -> bool:
    """Mirrors ``IsK8sAuthEnabled``: authOptions.enableK8sTokenAuth is true."""
    return bool(auth_options) and auth_options.get("enableK8sTokenAuth") is True


def _parse_version(text: str) -> tuple[int, ...] | None:
    """Like Go's ``version.ParseGeneric``: leading ``X.Y[.Z]`` numbers (a ``v`` prefix allowed)."""
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not match:
        return None
    return tuple(int(g or 0) for g in match.groups())


def _groups(cluster: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name as KubeRay's messages use it, group) for the head ("Head") and each worker group."""
    out = [("Head", _head(cluster))]
    out += [(g.get("groupName", ""), g) for g in cluster.get("workerGroupSpecs") or []]
    return out


# -- metadata rules -------------------------------------------------------------------------------------


def name_is_a_short_dns1035_label(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayServiceMetadata`` / ``ValidateRayClusterMetadata`` /
    ``ValidateRayJobMetadata``: the name is a DNS-1035 label of at most 47 characters for a
    RayService or RayJob (their RayCluster names get a suffix) and 53 for a RayCluster."""
    limit = {"RayService": MAX_RAYSERVICE_NAME, "RayJob": MAX_RAYJOB_NAME}.get(res.kind, MAX_RAYCLUSTER_NAME)
    if len(res.name) > limit:
        yield f"{res.kind} name {res.name!r} is longer than {limit} characters"
    if not _DNS1035.match(res.name) or len(res.name) > 63:
        yield f"{res.kind} name {res.name!r} is not a DNS-1035 label"


def initializing_timeout_is_positive(res: RayResource) -> Iterator[str]:
    """Mirrors ``validateInitializingTimeout`` (from ``ValidateRayServiceMetadata``): the
    ``ray.io/initializing-timeout`` annotation, when set, is a positive Go duration or a positive
    integer of seconds."""
    if res.kind != "RayService":
        return
    value = res.annotations.get(INITIALIZING_TIMEOUT_ANNOTATION, "")
    if not value:
        return
    if _GO_DURATION.match(value):
        if value.startswith("-") or not re.search(r"[1-9]", value):
            yield f"{INITIALIZING_TIMEOUT_ANNOTATION} must be a positive duration, got {value!r}"
        return
    if re.fullmatch(r"[-+]?\d+", value):
        if int(value) <= 0:
            yield f"{INITIALIZING_TIMEOUT_ANNOTATION} must be a positive integer, got {value!r}"
        return
    yield f"{INITIALIZING_TIMEOUT_ANNOTATION} has an invalid format: {value!r}"


# -- RayClusterSpec rules (ValidateRayClusterSpec) -----------------------------------------------------


def groups_have_a_container(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterSpec``: "headGroupSpec should have at least one container" and
    "workerGroupSpec should have at least one container"."""
    cluster = res.cluster
    if cluster is None:
        return
    if not _containers(_head(cluster)):
        yield "headGroupSpec has no container"
    for group in cluster.get("workerGroupSpecs") or []:
        if not _containers(group):
            yield f"worker group {group.get('groupName')} has no container"


def worker_replica_bounds(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterSpec``'s replica checks: without the autoscaler every worker
    group sets both minReplicas and maxReplicas; neither is negative; minReplicas <= maxReplicas."""
    cluster = res.cluster
    if cluster is None:
        return
    autoscaling = autoscaling_enabled(cluster)
    for group in cluster.get("workerGroupSpecs") or []:
        name, low, high = group.get("groupName"), group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            yield f"worker group {name} must set minReplicas and maxReplicas without the autoscaler"
        if low is not None and low < 0:
            yield f"worker group {name} has negative minReplicas {low}"
        if high is not None and high < 0:
            yield f"worker group {name} has negative maxReplicas {high}"
        if low is not None and high is not None and low > high:
            yield f"worker group {name}: minReplicas {low} > maxReplicas {high}"


def resources_in_one_place(res: RayResource) -> Iterator[str]:
    """Mirrors ``validateRayGroupResources``: a group declares its Ray resources either in
    rayStartParams (num-cpus, num-gpus, memory, resources) or in the top-level ``resources``
    field, not both."""
    cluster = res.cluster
    if cluster is None:
        return
    for name, group in _groups(cluster):
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in RAY_START_RESOURCE_PARAMS) and group.get("resources"):
            yield f"{name} group sets resources in both rayStartParams and resources"


def group_labels_are_valid(res: RayResource) -> Iterator[str]:
    """Mirrors ``validateRayGroupLabels``: no ``labels`` key in rayStartParams (use the group's
    ``labels`` field), and every key and value of that field follows Kubernetes label syntax."""
    cluster = res.cluster
    if cluster is None:
        return
    for name, group in _groups(cluster):
        if "labels" in (group.get("rayStartParams") or {}):
            yield f"{name} group: rayStartParams['labels'] is not supported"
        for key, value in (group.get("labels") or {}).items():
            if not _label_key_ok(key):
                yield f"{name} group: invalid label key {key!r}"
            if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
                yield f"{name} group: invalid label value {value!r} of {key!r}"


def _label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def idle_timeout_needs_autoscaler_v2(res: RayResource) -> Iterator[str]:
    """Mirrors ``validateWorkerGroupIdleTimeout``: a worker group's idleTimeoutSeconds is
    non-negative and allowed only with autoscaler v2 selected (autoscalerOptions.version: v2, or
    the head's ``RAY_enable_autoscaler_v2`` env set to "1"/"true")."""
    cluster = res.cluster
    if cluster is None:
        return
    v2_env = _ray_container_env(_head(cluster)).get(ENV_AUTOSCALER_V2) in ("1", "true")
    for group in cluster.get("workerGroupSpecs") or []:
        timeout = group.get("idleTimeoutSeconds")
        if timeout is None:
            continue
        if timeout < 0:
            yield f"worker group {group.get('groupName')}: idleTimeoutSeconds {timeout} is negative"
        elif not (autoscaler_v2_selected(cluster) or v2_env):
            yield (
                f"worker group {group.get('groupName')}: idleTimeoutSeconds is set but autoscaler v2 "
                "is not selected (autoscalerOptions.version: v2)"
            )


def suspended_worker_groups(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterSpec``'s suspend checks: a worker group may be suspended only
    with the RayJobDeletionPolicy feature gate on, and never with the autoscaler enabled."""
    cluster = res.cluster
    if cluster is None:
        return
    for group in cluster.get("workerGroupSpecs") or []:
        if group.get("suspend") is True:
            if not res.gate("RayJobDeletionPolicy"):
                yield f"worker group {group.get('groupName')} suspended without RayJobDeletionPolicy"
            elif autoscaling_enabled(cluster):
                yield f"worker group {group.get('groupName')} suspended with the autoscaler enabled"


def gcs_fault_tolerance_is_configured_once(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterSpec``'s GCS fault tolerance checks: not both the
    ``ray.io/ft-enabled`` annotation and gcsFaultToleranceOptions; ``RAY_REDIS_ADDRESS`` on the
    head only when fault tolerance is on; with gcsFaultToleranceOptions, no ``redis-password``
    start param, no ``REDIS_PASSWORD`` / ``RAY_REDIS_ADDRESS`` head env and no
    ``ray.io/external-storage-namespace`` annotation (the options carry them)."""
    cluster = res.cluster
    if cluster is None:
        return
    options = cluster.get("gcsFaultToleranceOptions")
    head = _head(cluster)
    env = _ray_container_env(head)
    if res.annotations.get(FT_ENABLED_ANNOTATION, "") != "" and options is not None:
        yield f"both the {FT_ENABLED_ANNOTATION} annotation and gcsFaultToleranceOptions are set"
    if not gcs_ft_enabled(cluster, res.annotations) and ENV_REDIS_ADDRESS in env:
        yield f"{ENV_REDIS_ADDRESS} is set but GCS fault tolerance is not enabled"
    if options is None:
        return
    if (head.get("rayStartParams") or {}).get("redis-password"):
        yield "redis-password in rayStartParams with gcsFaultToleranceOptions (use redisPassword)"
    if ENV_REDIS_PASSWORD in env:
        yield f"{ENV_REDIS_PASSWORD} env on the head with gcsFaultToleranceOptions (use redisPassword)"
    if ENV_REDIS_ADDRESS in env:
        yield f"{ENV_REDIS_ADDRESS} env on the head with gcsFaultToleranceOptions (use redisAddress)"
    if res.annotations.get(EXTERNAL_STORAGE_NS_ANNOTATION, ""):
        yield f"{EXTERNAL_STORAGE_NS_ANNOTATION} annotation with gcsFaultToleranceOptions"


def gcs_fault_tolerance_backend(res: RayResource) -> Iterator[str]:
    """Mirrors ``validateGcsFaultToleranceBackend``: the redis backend (the default) takes no
    ``storage``; the embedded rocksdb backend needs the GCSFaultToleranceEmbeddedStorage feature
    gate and takes none of the redis fields."""
    cluster = res.cluster
    options = (cluster or {}).get("gcsFaultToleranceOptions")
    if options is None:
        return
    if (options.get("backend") or "redis") == "redis":
        if options.get("storage") is not None:
            yield "gcsFaultToleranceOptions.storage is set with the redis backend"
        return
    if not res.gate("GCSFaultToleranceEmbeddedStorage"):
        yield "the rocksdb GCS backend needs the GCSFaultToleranceEmbeddedStorage feature gate"
    for key in ("redisAddress", "redisUsername", "redisPassword", "externalStorageNamespace"):
        if options.get(key):
            yield f"gcsFaultToleranceOptions.{key} is set with the rocksdb backend"


def redis_username_only_in_options(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterSpec``: no ``redis-username`` start param and no
    ``REDIS_USERNAME`` head env (gcsFaultToleranceOptions.redisUsername carries it)."""
    cluster = res.cluster
    if cluster is None:
        return
    head = _head(cluster)
    if (head.get("rayStartParams") or {}).get("redis-username") or ENV_REDIS_USERNAME in _ray_container_env(
        head
    ):
        yield "redis username set in rayStartParams or env (use gcsFaultToleranceOptions.redisUsername)"


def autoscaler_settings_agree(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterSpec``'s autoscaler checks: ``RAY_enable_autoscaler_v2`` on the
    head is not "1"/"true" without the autoscaler; with it, not both autoscalerOptions.version and
    that env; with autoscaler v2, head and worker pods' restartPolicy is Never or unset;
    autoscalerOptions.idleTimeoutSeconds is non-negative; autoscalerOptions.env does not set
    ``KUBERAY_GEN_AUTOSCALER_START_CMD``."""
    cluster = res.cluster
    if cluster is None:
        return
    head = _head(cluster)
    head_env = _ray_container_env(head)
    options = cluster.get("autoscalerOptions")
    if not autoscaling_enabled(cluster):
        if head_env.get(ENV_AUTOSCALER_V2) in ("1", "true"):
            yield f"{ENV_AUTOSCALER_V2} is set on the head but enableInTreeAutoscaling is false"
    else:
        if options is not None and options.get("version") is not None and ENV_AUTOSCALER_V2 in head_env:
            yield f"both autoscalerOptions.version and the head env {ENV_AUTOSCALER_V2} are set"
        if autoscaler_v2_selected(cluster):
            for name, group in _groups(cluster):
                policy = ((group.get("template") or {}).get("spec") or {}).get("restartPolicy", "")
                if policy not in ("", "Never"):
                    yield f"{name} group: restartPolicy {policy} with autoscaler v2 (Never or unset)"
    if options is not None:
        if (options.get("idleTimeoutSeconds") or 0) < 0:
            yield "autoscalerOptions.idleTimeoutSeconds is negative"
        if any(e.get("name") == ENV_AUTOSCALER_START_CMD for e in options.get("env") or []):
            yield f"autoscalerOptions.env sets {ENV_AUTOSCALER_START_CMD}, which KubeRay manages"


def token_auth_needs_a_recent_ray(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterSpec``'s auth checks: authOptions.mode "token" needs rayVersion
    >= 2.52.0; enableK8sTokenAuth needs mode "token", rayVersion >= 2.55.0 and no secretName."""
    cluster = res.cluster
    if cluster is None:
        return
    auth = cluster.get("authOptions")
    if not token_auth_enabled(cluster):
        if k8s_token_auth_enabled(auth):
            yield "authOptions.enableK8sTokenAuth without authOptions.mode: token"
        return
    text = cluster.get("rayVersion", "")
    if not text:
        yield "authOptions.mode is token but rayVersion is not set"
        return
    version = _parse_version(text)
    if version is None:
        yield f"authOptions.mode is token but rayVersion {text!r} is not a version"
        return
    if version < AUTH_MIN_RAY:
        yield f"authOptions.mode is token but rayVersion {text} < 2.52.0"
    if k8s_token_auth_enabled(auth):
        if version < K8S_AUTH_MIN_RAY:
            yield f"authOptions.enableK8sTokenAuth needs rayVersion >= 2.55.0, got {text}"
        if auth.get("secretName"):
            yield "authOptions.enableK8sTokenAuth and authOptions.secretName are both set"


def feature_gated_fields(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterSpec``'s feature gate checks: networkPolicy needs
    RayClusterNetworkPolicy, tlsOptions RayClusterMTLS, historyServerOptions
    RayClusterHistoryServer (all off by default in v1.7.0)."""
    cluster = res.cluster
    if cluster is None:
        return
    for key, gate in (
        ("networkPolicy", "RayClusterNetworkPolicy"),
        ("tlsOptions", "RayClusterMTLS"),
        ("historyServerOptions", "RayClusterHistoryServer"),
    ):
        if cluster.get(key) is not None and not res.gate(gate):
            yield f"spec.{key} needs the {gate} feature gate"


# -- RayService rules (ValidateRayServiceSpec) -----------------------------------------------------------


def rayservice_has_no_k8s_token_auth(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayServiceSpec`` (and ``ValidateRayJobSpec``): Kubernetes-delegated token
    auth (authOptions.enableK8sTokenAuth) is not supported for a RayService or a RayJob."""
    if res.kind in ("RayService", "RayJob") and k8s_token_auth_enabled(
        (res.cluster or {}).get("authOptions")
    ):
        yield f"{res.kind} does not support authOptions.enableK8sTokenAuth"


def rayservice_head_service_unnamed(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayServiceSpec``: rayClusterConfig.headGroupSpec.headService.metadata.name
    is not set (KubeRay names the head Service ``<rayservice>-head-svc`` itself)."""
    if res.kind != "RayService":
        return
    head_service = _head(res.cluster or {}).get("headService") or {}
    if (head_service.get("metadata") or {}).get("name"):
        yield "headGroupSpec.headService.metadata.name must not be set on a RayService"


def rayservice_upgrade_strategy(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayServiceSpec``'s upgrade checks and ``ValidateClusterUpgradeOptions``:
    upgradeStrategy.type is NewClusterWithIncrementalUpgrade, NewCluster or None;
    rayClusterDeletionDelaySeconds is non-negative; an incremental upgrade (with its feature gate
    on) needs the autoscaler and clusterUpgradeOptions with 0 <= stepSizePercent <=
    maxSurgePercent <= 100, intervalSeconds > 0 and a gatewayClassName."""
    if res.kind != "RayService":
        return
    strategy = res.spec.get("upgradeStrategy") or {}
    kind = strategy.get("type")
    if kind is not None and kind not in RAYSERVICE_UPGRADE_TYPES:
        yield f"upgradeStrategy.type {kind!r} is not one of {', '.join(RAYSERVICE_UPGRADE_TYPES)}"
    delay = res.spec.get("rayClusterDeletionDelaySeconds")
    if delay is not None and delay < 0:
        yield f"rayClusterDeletionDelaySeconds {delay} is negative"
    if kind != "NewClusterWithIncrementalUpgrade" or not res.gate("RayServiceIncrementalUpgrade"):
        return
    if not autoscaling_enabled(res.cluster or {}):
        yield "NewClusterWithIncrementalUpgrade needs the Ray autoscaler"
    options = strategy.get("clusterUpgradeOptions")
    if options is None:
        yield "NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions"
        return
    surge = options.get("maxSurgePercent", 100)
    step = options.get("stepSizePercent")
    if not 0 <= surge <= 100:
        yield "maxSurgePercent must be between 0 and 100"
    if step is None or not 0 <= step <= 100:
        yield "stepSizePercent must be between 0 and 100"
    elif step > surge:
        yield "stepSizePercent must be <= maxSurgePercent"
    if (options.get("intervalSeconds") or 0) <= 0:
        yield "intervalSeconds must be > 0"
    if not options.get("gatewayClassName"):
        yield "gatewayClassName is required for NewClusterWithIncrementalUpgrade"


# -- RayCluster and RayJob rules -------------------------------------------------------------------------


def raycluster_upgrade_strategy(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayClusterUpgradeOptions``: a RayCluster's upgradeStrategy.type is
    Recreate or None, and only a RayCluster created directly by a user sets it."""
    if res.kind != "RayCluster":
        return
    kind = (res.spec.get("upgradeStrategy") or {}).get("type")
    if kind is None:
        return
    if kind not in ("Recreate", "None"):
        yield f"upgradeStrategy.type {kind!r} is not Recreate or None"
    if res.labels.get("ray.io/originated-from-crd") in ("RayJob", "RayService"):
        yield "upgradeStrategy is set on a RayCluster created by a RayJob or RayService"


def rayjob_has_a_cluster(res: RayResource) -> Iterator[str]:
    """Mirrors ``ValidateRayJobSpec``'s cluster checks: one of rayClusterSpec or clusterSelector
    is set; a clusterSelector names a cluster (``ray.io/cluster``), is not suspended, not used in
    SidecarMode and takes no backoffLimit > 0."""
    if res.kind != "RayJob":
        return
    selector = res.spec.get("clusterSelector") or {}
    if res.spec.get("rayClusterSpec") is None and not selector:
        yield "RayJob sets neither rayClusterSpec nor clusterSelector"
    if selector:
        if not selector.get("ray.io/cluster"):
            yield "clusterSelector has no ray.io/cluster"
        if res.spec.get("suspend"):
            yield "a clusterSelector RayJob cannot be suspended"
        if res.spec.get("submissionMode") == "SidecarMode":
            yield "clusterSelector is not supported in SidecarMode"
        if (res.spec.get("backoffLimit") or 0) > 0:
            yield "backoffLimit is incompatible with clusterSelector"


RULES: dict[str, Callable[[RayResource], Iterator[str]]] = {
    f.__name__: f
    for f in (
        name_is_a_short_dns1035_label,
        initializing_timeout_is_positive,
        groups_have_a_container,
        worker_replica_bounds,
        resources_in_one_place,
        group_labels_are_valid,
        idle_timeout_needs_autoscaler_v2,
        suspended_worker_groups,
        gcs_fault_tolerance_is_configured_once,
        gcs_fault_tolerance_backend,
        redis_username_only_in_options,
        autoscaler_settings_agree,
        token_auth_needs_a_recent_ray,
        feature_gated_fields,
        rayservice_has_no_k8s_token_auth,
        rayservice_head_service_unnamed,
        rayservice_upgrade_strategy,
        raycluster_upgrade_strategy,
        rayjob_has_a_cluster,
    )
}
RAY_KINDS = ("RayService", "RayCluster", "RayJob")


def violations(
    doc: Mapping[str, Any], feature_gates: Mapping[str, bool] | None = None
) -> dict[str, list[str]]:
    """{rule name: messages} of every rule the manifest ``doc`` breaks (empty: the operator accepts it)."""
    res = resource(doc, feature_gates)
    out = {}
    for name, rule in RULES.items():
        messages = list(rule(res))
        if messages:
            out[name] = messages
    return out
