"""The KubeRay operator accepts our manifests: its v1.7.0 validation rules (``kuberay_rules.py``).

Three parts:

1. every rule on every RayService / RayCluster / RayJob of ``k8s/rendered/*.yaml`` and ``k8s/jobs/``;
2. the relevant cases of KubeRay's own ``validation_test.go``, re-stated as inputs and the rules
   they must break (none: accepted), so our re-statement agrees with the operator on them;
3. each rule fails on the rendered gpu RayService broken for that rule (the rule can fail).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.k8s import kuberay_rules as kr
from tests.k8s.conftest import render

ALL_GATES_ON = {**kr.DEFAULT_FEATURE_GATES, "GCSFaultToleranceEmbeddedStorage": True}


def ray_resources(docs) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") in kr.RAY_KINDS]


# -- 1. the rendered manifests -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_every_rule_accepts_the_rendered_ray_resources(rendered, extra_manifests, overlay):
    docs = ray_resources(rendered[overlay]) + ray_resources(extra_manifests)
    assert [d["kind"] for d in docs] == ["RayService"]
    for doc in docs:
        assert kr.violations(doc) == {}, f"{doc['kind']}/{doc['metadata']['name']}"


def test_the_gpu_overlay_uses_what_the_rules_guard(rendered):
    """The rules are not vacuous for gpu: it sets what they check."""
    cluster = next(d for d in rendered["gpu"] if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    assert any("idleTimeoutSeconds" in g for g in cluster["workerGroupSpecs"])
    assert kr.autoscaler_v2_selected(cluster) and kr.autoscaling_enabled(cluster)
    assert kr.gcs_ft_enabled(cluster, {}) and cluster["gcsFaultToleranceOptions"]["redisAddress"]
    assert kr.token_auth_enabled(cluster)


# -- 2. KubeRay's own cases ------------------------------------------------------------------------------


def _template(env: dict[str, str] | None = None, restart: str | None = None, containers: int = 1):
    spec: dict[str, Any] = {
        "containers": [{"name": "ray", "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}][
            :containers
        ]
    }
    if restart:
        spec["restartPolicy"] = restart
    return {"spec": spec}


def _worker(name: str = "worker-group-1", env=None, restart=None, containers=1, **fields):
    return {"groupName": name, "template": _template(env, restart, containers), **fields}


def _cluster(head_env=None, head_params=None, head_restart=None, head_containers=1, workers=(), **fields):
    head: dict[str, Any] = {"template": _template(head_env, head_restart, head_containers)}
    if head_params:
        head["rayStartParams"] = head_params
    return {"headGroupSpec": head, "workerGroupSpecs": list(workers), **fields}


def raycluster(spec, name="raycluster", annotations=None, labels=None):
    meta = {"name": name, "annotations": annotations or {}, "labels": labels or {}}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta, "spec": spec}


def rayservice(cluster=None, name="rayservice", annotations=None, **spec):
    meta = {"name": name, "annotations": annotations or {}}
    body = {"rayClusterConfig": cluster if cluster is not None else {}, **spec}
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": meta, "spec": body}


def rayjob(spec, name="rayjob"):
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name}, "spec": spec}


FT = kr.FT_ENABLED_ANNOTATION
GCS = "gcs_fault_tolerance_is_configured_once"
BACKEND = "gcs_fault_tolerance_backend"
AUTOSCALER = "autoscaler_settings_agree"
REPLICAS = "worker_replica_bounds"
IDLE = "idle_timeout_needs_autoscaler_v2"
AUTH = "token_auth_needs_a_recent_ray"
UPGRADE = "rayservice_upgrade_strategy"
LABELS = "group_labels_are_valid"
v2 = {"version": "v2"}
v1 = {"version": "v1"}
on = {"enableInTreeAutoscaling": True}
off = {"enableInTreeAutoscaling": False}
bounded = {"minReplicas": 0, "maxReplicas": 5}


def _incremental(enable_autoscaling=True, **options):
    strategy: dict[str, Any] = {"type": "NewClusterWithIncrementalUpgrade"}
    if options:
        strategy["clusterUpgradeOptions"] = options
    return rayservice(_cluster(enableInTreeAutoscaling=enable_autoscaling), upgradeStrategy=strategy)


def _token_auth(version, k8s=False, **auth):
    return raycluster(
        _cluster(rayVersion=version, authOptions={"mode": "token", "enableK8sTokenAuth": k8s, **auth})
    )


# (KubeRay test function, its case, manifest, rules it must break (empty: accepted), feature gates)
CASES: list[tuple[str, str, dict[str, Any], set[str], dict[str, bool] | None]] = [
    # TestValidateRayClusterSpecGcsFaultToleranceOptions (embedded-storage gate on)
    *[
        ("GcsFaultToleranceOptions", case, raycluster(spec, annotations=ann), broken, ALL_GATES_ON)
        for case, spec, ann, broken in [
            ("ft-enabled false and options set", _cluster(gcsFaultToleranceOptions={}), {FT: "false"}, {GCS}),
            ("ft-enabled true and options set", _cluster(gcsFaultToleranceOptions={}), {FT: "true"}, {GCS}),
            (
                "options with an address",
                _cluster(gcsFaultToleranceOptions={"redisAddress": "redis:6379"}),
                {},
                set(),
            ),
            ("neither", _cluster(), {}, set()),
            (
                "ft-enabled false and RAY_REDIS_ADDRESS",
                _cluster({kr.ENV_REDIS_ADDRESS: "redis:6379"}),
                {FT: "false"},
                {GCS},
            ),
            (
                "options and RAY_REDIS_ADDRESS",
                _cluster({kr.ENV_REDIS_ADDRESS: "redis:6379"}, gcsFaultToleranceOptions={}),
                {},
                {GCS},
            ),
            ("RAY_REDIS_ADDRESS without FT", _cluster({kr.ENV_REDIS_ADDRESS: "redis:6379"}), {}, {GCS}),
            (
                "ft-enabled true and RAY_REDIS_ADDRESS",
                _cluster({kr.ENV_REDIS_ADDRESS: "redis:6379"}),
                {FT: "true"},
                set(),
            ),
            (
                "options and external-storage-namespace annotation",
                _cluster(gcsFaultToleranceOptions={"redisAddress": "redis:6379"}),
                {kr.EXTERNAL_STORAGE_NS_ANNOTATION: "myns"},
                {GCS},
            ),
            (
                "redis backend without an address",
                _cluster(gcsFaultToleranceOptions={"backend": "redis"}),
                {},
                set(),
            ),
            (
                "redis backend with rocksdb storage",
                _cluster(gcsFaultToleranceOptions={"backend": "redis", "storage": {"size": "1Gi"}}),
                {},
                {BACKEND},
            ),
            ("rocksdb backend alone", _cluster(gcsFaultToleranceOptions={"backend": "rocksdb"}), {}, set()),
            (
                "rocksdb backend with its storage",
                _cluster(gcsFaultToleranceOptions={"backend": "rocksdb", "storage": {"size": "2Gi"}}),
                {},
                set(),
            ),
            (
                "rocksdb backend with a redis address",
                _cluster(gcsFaultToleranceOptions={"backend": "rocksdb", "redisAddress": "redis:6379"}),
                {},
                {BACKEND},
            ),
            (
                "rocksdb backend with an external storage namespace",
                _cluster(gcsFaultToleranceOptions={"backend": "rocksdb", "externalStorageNamespace": "ns"}),
                {},
                {BACKEND},
            ),
        ]
    ],
    # TestValidateRayClusterSpecEmbeddedGCSFeatureGate
    (
        "EmbeddedGCSFeatureGate",
        "rocksdb without the gate",
        raycluster(_cluster(gcsFaultToleranceOptions={"backend": "rocksdb"})),
        {BACKEND},
        None,
    ),
    (
        "EmbeddedGCSFeatureGate",
        "rocksdb with the gate",
        raycluster(_cluster(gcsFaultToleranceOptions={"backend": "rocksdb"})),
        set(),
        ALL_GATES_ON,
    ),
    # TestValidateRayClusterSpecRedisPassword / RedisUsername
    (
        "RedisPassword",
        "redis-password start param with options",
        raycluster(_cluster(head_params={"redis-password": "password"}, gcsFaultToleranceOptions={})),
        {GCS},
        None,
    ),
    (
        "RedisPassword",
        "REDIS_PASSWORD env with options",
        raycluster(_cluster({kr.ENV_REDIS_PASSWORD: "password"}, gcsFaultToleranceOptions={})),
        {GCS},
        None,
    ),
    (
        "RedisPassword",
        "options.redisPassword",
        raycluster(
            _cluster(gcsFaultToleranceOptions={"redisAddress": "redis:6379", "redisPassword": {"value": "p"}})
        ),
        set(),
        None,
    ),
    (
        "RedisUsername",
        "redis-username start param",
        raycluster(_cluster(head_params={"redis-username": "username"})),
        {"redis_username_only_in_options"},
        None,
    ),
    (
        "RedisUsername",
        "REDIS_USERNAME env",
        raycluster(_cluster({kr.ENV_REDIS_USERNAME: "username"})),
        {"redis_username_only_in_options"},
        None,
    ),
    (
        "RedisUsername",
        "options.redisUsername",
        raycluster(
            _cluster(gcsFaultToleranceOptions={"redisAddress": "redis:6379", "redisUsername": {"value": "u"}})
        ),
        set(),
        None,
    ),
    # TestValidateRayClusterSpecNames (ValidateRayClusterMetadata)
    (
        "Names",
        "54 characters",
        raycluster(_cluster(), name="a" * 54),
        {"name_is_a_short_dns1035_label"},
        None,
    ),
    ("Names", "53 characters", raycluster(_cluster(), name="a" * 53), set(), None),
    (
        "Names",
        "not a DNS-1035 label",
        raycluster(_cluster(), name="1" * 53),
        {"name_is_a_short_dns1035_label"},
        None,
    ),
    # TestValidateRayClusterSpecEmptyContainers
    (
        "EmptyContainers",
        "head without containers",
        raycluster(_cluster(head_containers=0)),
        {"groups_have_a_container"},
        None,
    ),
    (
        "EmptyContainers",
        "worker without containers",
        raycluster(_cluster(workers=[_worker(containers=0, **bounded)])),
        {"groups_have_a_container"},
        None,
    ),
    (
        "EmptyContainers",
        "containers everywhere",
        raycluster(_cluster(workers=[_worker(**bounded)])),
        set(),
        None,
    ),
    # TestValidateRayClusterSpecSuspendingWorkerGroup
    (
        "SuspendingWorkerGroup",
        "suspended without the feature gate",
        raycluster(_cluster(workers=[_worker(suspend=True, **bounded)])),
        {"suspended_worker_groups"},
        {**kr.DEFAULT_FEATURE_GATES, "RayJobDeletionPolicy": False},
    ),
    (
        "SuspendingWorkerGroup",
        "suspended without the autoscaler",
        raycluster(_cluster(workers=[_worker(suspend=True, **bounded)])),
        set(),
        None,
    ),
    (
        "SuspendingWorkerGroup",
        "suspended with the autoscaler",
        raycluster(_cluster(workers=[_worker(suspend=True, **bounded)], **on)),
        {"suspended_worker_groups"},
        None,
    ),
    # TestValidateRayClusterSpecAutoscaler
    (
        "Autoscaler",
        "v2 env 1 without autoscaling",
        raycluster(_cluster({kr.ENV_AUTOSCALER_V2: "1"}, **off)),
        {AUTOSCALER},
        None,
    ),
    (
        "Autoscaler",
        "v2 env true without autoscaling",
        raycluster(_cluster({kr.ENV_AUTOSCALER_V2: "true"}, **off)),
        {AUTOSCALER},
        None,
    ),
    (
        "Autoscaler",
        "version and v2 env both set",
        raycluster(_cluster({kr.ENV_AUTOSCALER_V2: "true"}, autoscalerOptions=v2, **on)),
        {AUTOSCALER},
        None,
    ),
    (
        "Autoscaler",
        "v2 and head restartPolicy Always",
        raycluster(_cluster(head_restart="Always", autoscalerOptions=v2, **on)),
        {AUTOSCALER},
        None,
    ),
    (
        "Autoscaler",
        "v1 and a worker restartPolicy Always (a warning only)",
        raycluster(
            _cluster(
                workers=[_worker(restart="Never"), _worker("worker-group-2", restart="Always")],
                autoscalerOptions=v1,
                **on,
            )
        ),
        set(),
        None,
    ),
    (
        "Autoscaler",
        "v2 and a worker restartPolicy Always",
        raycluster(
            _cluster(
                head_restart="Never",
                workers=[_worker(restart="Never"), _worker("worker-group-2", restart="Always")],
                autoscalerOptions=v2,
                **on,
            )
        ),
        {AUTOSCALER},
        None,
    ),
    (
        "Autoscaler",
        "v2 with restartPolicy Never or unset",
        raycluster(
            _cluster(
                workers=[_worker(), _worker("worker-group-2", restart="Never")], autoscalerOptions=v2, **on
            )
        ),
        set(),
        None,
    ),
    (
        "Autoscaler",
        "KUBERAY_GEN_AUTOSCALER_START_CMD in autoscalerOptions.env",
        raycluster(
            _cluster(
                autoscalerOptions={
                    "args": ["my-custom-autoscaler-cmd"],
                    "env": [{"name": kr.ENV_AUTOSCALER_START_CMD, "value": "ray kuberay-autoscaler"}],
                },
                **on,
            )
        ),
        {AUTOSCALER},
        None,
    ),
    # TestValidateRayClusterSpec_Resources
    (
        "Resources",
        "head: both",
        raycluster(
            {
                **_cluster(workers=[_worker(**bounded)]),
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "1"},
                    "resources": {"CPU": "1"},
                    "template": _template(),
                },
            }
        ),
        {"resources_in_one_place"},
        None,
    ),
    (
        "Resources",
        "head: start params only",
        raycluster(
            _cluster(
                head_params={"num-cpus": "2", "memory": "4G", "resources": '{"TPU": "8"}'},
                workers=[_worker(**bounded)],
            )
        ),
        set(),
        None,
    ),
    (
        "Resources",
        "worker: both",
        raycluster(
            _cluster(workers=[_worker(rayStartParams={"num-gpus": "1"}, resources={"GPU": "1"}, **bounded)])
        ),
        {"resources_in_one_place"},
        None,
    ),
    (
        "Resources",
        "worker: resources only",
        raycluster(
            _cluster(workers=[_worker(resources={"CPU": "2", "memory": "4G", "TPU": "8"}, **bounded)])
        ),
        set(),
        None,
    ),
    # TestValidateRayClusterSpec_Labels
    (
        "Labels",
        "labels in head start params",
        raycluster(_cluster(head_params={"labels": "ray.io/node-group=worker-group-1"})),
        {LABELS},
        None,
    ),
    (
        "Labels",
        "labels in worker start params",
        raycluster(_cluster(workers=[_worker(rayStartParams={"labels": "a=b"}, **bounded)])),
        {LABELS},
        None,
    ),
    (
        "Labels",
        "labels field",
        raycluster(_cluster(workers=[_worker(labels={"ray.io/accelerator-type": "TPU-V6E"}, **bounded)])),
        set(),
        None,
    ),
    (
        "Labels",
        "invalid key",
        raycluster(_cluster(workers=[_worker(labels={"invalid_key!": "value"}, **bounded)])),
        {LABELS},
        None,
    ),
    (
        "Labels",
        "invalid value",
        raycluster(
            {
                **_cluster(),
                "headGroupSpec": {"labels": {"valid-key": "invalid/value"}, "template": _template()},
            }
        ),
        {LABELS},
        None,
    ),
    # TestValidateRayClusterSpecRayVersionForAuth and TestValidateRayClusterSpec_Auth
    ("RayVersionForAuth", "2.52.0", _token_auth("2.52.0"), set(), None),
    ("RayVersionForAuth", "2.52.0 with k8s token auth", _token_auth("2.52.0", k8s=True), {AUTH}, None),
    ("RayVersionForAuth", "2.55.0 with k8s token auth", _token_auth("2.55.0", k8s=True), set(), None),
    ("RayVersionForAuth", "3.0.0", _token_auth("3.0.0"), set(), None),
    ("RayVersionForAuth", "3.0.0 with k8s token auth", _token_auth("3.0.0", k8s=True), set(), None),
    ("RayVersionForAuth", "2.50.0", _token_auth("2.50.0"), {AUTH}, None),
    ("RayVersionForAuth", "not a version", _token_auth("invalid-version"), {AUTH}, None),
    ("RayVersionForAuth", "no version", _token_auth(""), {AUTH}, None),
    (
        "Auth",
        "k8s token auth and a secretName",
        _token_auth("2.55.0", k8s=True, secretName="my-secret"),
        {AUTH},
        None,
    ),
    ("Auth", "k8s token auth alone", _token_auth("2.55.0", k8s=True), set(), None),
    ("Auth", "secretName alone", _token_auth("2.55.0", secretName="my-secret"), set(), None),
    # TestValidateRayServiceSpec
    (
        "RayServiceSpec",
        "headService name set",
        rayservice({"headGroupSpec": {"headService": {"metadata": {"name": "my-head-service"}}}}),
        {"rayservice_head_service_unnamed", "groups_have_a_container"},
        None,
    ),
    ("RayServiceSpec", "valid", rayservice(_cluster()), set(), None),
    (
        "RayServiceSpec",
        "invalid upgrade type",
        rayservice(_cluster(), upgradeStrategy={"type": "invalidStrategy"}),
        {UPGRADE},
        None,
    ),
    ("RayServiceSpec", "empty spec", rayservice(), {"groups_have_a_container"}, None),
    (
        "RayServiceSpec",
        "negative deletion delay",
        rayservice(_cluster(), rayClusterDeletionDelaySeconds=-1),
        {UPGRADE},
        None,
    ),
    (
        "RayServiceSpec",
        "k8s token auth",
        rayservice({"authOptions": {"mode": "token", "enableK8sTokenAuth": True}}),
        {"rayservice_has_no_k8s_token_auth", AUTH, "groups_have_a_container"},
        None,
    ),
    # TestValidateRayServiceMetadata
    (
        "RayServiceMetadata",
        "48 characters",
        rayservice(_cluster(), name="j" * 48),
        {"name_is_a_short_dns1035_label"},
        None,
    ),
    (
        "RayServiceMetadata",
        "not a DNS-1035 label",
        rayservice(_cluster(), name="1" * 47),
        {"name_is_a_short_dns1035_label"},
        None,
    ),
    ("RayServiceMetadata", "47 characters", rayservice(_cluster(), name="j" * 47), set(), None),
    *[
        (
            "RayServiceMetadata",
            f"initializing timeout {value!r}",
            rayservice(_cluster(), annotations={kr.INITIALIZING_TIMEOUT_ANNOTATION: value}),
            broken,
            None,
        )
        for value, broken in [
            ("5m", set()),
            ("300", set()),
            ("0", {"initializing_timeout_is_positive"}),
            ("-100", {"initializing_timeout_is_positive"}),
            ("-5m", {"initializing_timeout_is_positive"}),
            ("invalid", {"initializing_timeout_is_positive"}),
        ]
    ],
    # TestValidateClusterUpgradeOptions
    *[
        ("ClusterUpgradeOptions", case, manifest, broken, None)
        for case, manifest, broken in [
            (
                "valid",
                _incremental(
                    maxSurgePercent=50, stepSizePercent=50, intervalSeconds=10, gatewayClassName="istio"
                ),
                set(),
            ),
            (
                "no autoscaler",
                _incremental(
                    False,
                    maxSurgePercent=50,
                    stepSizePercent=50,
                    intervalSeconds=10,
                    gatewayClassName="istio",
                ),
                {UPGRADE},
            ),
            ("no options", _incremental(), {UPGRADE}),
            (
                "maxSurgePercent 200",
                _incremental(
                    maxSurgePercent=200, stepSizePercent=50, intervalSeconds=10, gatewayClassName="istio"
                ),
                {UPGRADE},
            ),
            (
                "no stepSizePercent",
                _incremental(maxSurgePercent=50, intervalSeconds=10, gatewayClassName="istio"),
                {UPGRADE},
            ),
            (
                "step above surge",
                _incremental(
                    maxSurgePercent=50, stepSizePercent=75, intervalSeconds=10, gatewayClassName="istio"
                ),
                {UPGRADE},
            ),
            (
                "interval 0",
                _incremental(
                    maxSurgePercent=50, stepSizePercent=50, intervalSeconds=0, gatewayClassName="istio"
                ),
                {UPGRADE},
            ),
            (
                "no gateway class",
                _incremental(maxSurgePercent=50, stepSizePercent=50, intervalSeconds=10),
                {UPGRADE},
            ),
        ]
    ],
    # TestValidateRayClusterSpec_IdleTimeoutSeconds (autoscaling on)
    *[
        (
            "IdleTimeoutSeconds",
            case,
            raycluster(_cluster(head_env, workers=workers, **on, **fields)),
            broken,
            None,
        )
        for case, head_env, workers, fields, broken in [
            (
                "worker idle with v2",
                None,
                [_worker(idleTimeoutSeconds=60, minReplicas=0, maxReplicas=10)],
                {"autoscalerOptions": v2},
                set(),
            ),
            (
                "worker idle with the v2 env",
                {kr.ENV_AUTOSCALER_V2: "1"},
                [_worker(idleTimeoutSeconds=60, minReplicas=0, maxReplicas=10)],
                {},
                set(),
            ),
            (
                "worker idle 0",
                None,
                [_worker(idleTimeoutSeconds=0, minReplicas=0, maxReplicas=10)],
                {"autoscalerOptions": v2},
                set(),
            ),
            (
                "worker idle negative",
                None,
                [_worker(idleTimeoutSeconds=-10, minReplicas=0, maxReplicas=10)],
                {"autoscalerOptions": v2},
                {IDLE},
            ),
            (
                "worker idle without v2",
                None,
                [_worker(idleTimeoutSeconds=60, minReplicas=0, maxReplicas=10)],
                {},
                {IDLE},
            ),
            (
                "worker idle with the env false",
                {kr.ENV_AUTOSCALER_V2: "false"},
                [_worker(idleTimeoutSeconds=60, minReplicas=0, maxReplicas=10)],
                {},
                {IDLE},
            ),
            ("no worker idle", None, [_worker(minReplicas=0, maxReplicas=10)], {}, set()),
            (
                "options idle with v2",
                None,
                [],
                {"autoscalerOptions": {**v2, "idleTimeoutSeconds": 120}},
                set(),
            ),
            (
                "options idle with v1",
                None,
                [],
                {"autoscalerOptions": {**v1, "idleTimeoutSeconds": 120}},
                set(),
            ),
            (
                "options idle without a version",
                None,
                [],
                {"autoscalerOptions": {"idleTimeoutSeconds": 120}},
                set(),
            ),
            ("options idle 0", None, [], {"autoscalerOptions": {"idleTimeoutSeconds": 0}}, set()),
            (
                "options idle negative",
                None,
                [],
                {"autoscalerOptions": {"idleTimeoutSeconds": -10}},
                {AUTOSCALER},
            ),
            ("options without idle", None, [], {"autoscalerOptions": v1}, set()),
            ("no options", None, [], {}, set()),
        ]
    ],
    # TestValidateRayClusterSpec_WorkerGroupReplicaValidation
    *[
        (
            "WorkerGroupReplicaValidation",
            case,
            raycluster(_cluster(workers=[_worker("worker-group-3", **group)], **scaling)),
            broken,
            None,
        )
        for case, group, scaling, broken in [
            ("min above max", {"minReplicas": 5, "maxReplicas": 3}, off, {REPLICAS}),
            ("replicas below min", {"replicas": 1, "minReplicas": 2, "maxReplicas": 5}, off, set()),
            ("no min without autoscaling", {"maxReplicas": 5}, off, {REPLICAS}),
            ("no max without autoscaling", {"minReplicas": 1}, off, {REPLICAS}),
            ("neither without autoscaling", {}, off, {REPLICAS}),
            ("negative min", {"minReplicas": -1}, on, {REPLICAS}),
            ("negative max", {"maxReplicas": -1}, on, {REPLICAS}),
            ("neither with autoscaling", {}, on, set()),
        ]
    ],
    # TestValidateRayClusterUpgradeOptions
    *[
        (
            "RayClusterUpgradeOptions",
            case,
            raycluster(_cluster(**strategy), labels={"ray.io/originated-from-crd": origin} if origin else {}),
            broken,
            None,
        )
        for case, strategy, origin, broken in [
            ("none", {}, "", set()),
            ("None", {"upgradeStrategy": {"type": "None"}}, "RayCluster", set()),
            ("Recreate", {"upgradeStrategy": {"type": "Recreate"}}, "RayCluster", set()),
            (
                "Recreate by a RayJob",
                {"upgradeStrategy": {"type": "Recreate"}},
                "RayJob",
                {"raycluster_upgrade_strategy"},
            ),
            (
                "Recreate by a RayService",
                {"upgradeStrategy": {"type": "Recreate"}},
                "RayService",
                {"raycluster_upgrade_strategy"},
            ),
            (
                "invalid",
                {"upgradeStrategy": {"type": "InvalidStrategy"}},
                "RayCluster",
                {"raycluster_upgrade_strategy"},
            ),
        ]
    ],
    # TestValidateRayJobSpec (the cluster checks)
    ("RayJobSpec", "neither rayClusterSpec nor clusterSelector", rayjob({}), {"rayjob_has_a_cluster"}, None),
    (
        "RayJobSpec",
        "valid",
        rayjob({"suspend": True, "shutdownAfterJobFinishes": True, "rayClusterSpec": _cluster()}),
        set(),
        None,
    ),
    (
        "RayJobSpec",
        "clusterSelector and suspend",
        rayjob({"suspend": True, "shutdownAfterJobFinishes": True, "clusterSelector": {"key": "value"}}),
        {"rayjob_has_a_cluster"},
        None,
    ),
]


@pytest.mark.parametrize(
    ("go_test", "case", "manifest", "broken", "gates"),
    CASES,
    ids=[f"{c[0]}: {c[1]}" for c in CASES],
)
def test_kuberay_cases_replayed(go_test, case, manifest, broken, gates):
    assert set(kr.violations(manifest, gates)) == broken


def test_every_rule_is_exercised_by_kuberay_cases_or_a_break():
    replayed = set().union(*(broken for *_, broken, _ in CASES))
    assert replayed | set(BREAKS) >= set(kr.RULES)
    assert len(CASES) >= 100


# -- 3. each rule fails on a manifest broken for it ---------------------------------------------------


def _cluster_of(doc):
    return doc["spec"]["rayClusterConfig"]


def _head_env(doc):
    return _cluster_of(doc)["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault("env", [])


def _train_group(doc):
    return next(g for g in _cluster_of(doc)["workerGroupSpecs"] if "idleTimeoutSeconds" in g)


def _as_raycluster(doc):
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "illume-abcde", "labels": {"ray.io/originated-from-crd": "RayService"}},
        "spec": _cluster_of(doc),
    }


def _break_initializing_timeout(doc):
    doc["metadata"].setdefault("annotations", {})[kr.INITIALIZING_TIMEOUT_ANNOTATION] = "0"


def _break_container(doc):
    _cluster_of(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"] = []


def _break_replicas(doc):
    _cluster_of(doc)["workerGroupSpecs"][0]["minReplicas"] = 9


def _break_resources(doc):
    _cluster_of(doc)["workerGroupSpecs"][0]["resources"] = {"GPU": "1"}


def _break_labels(doc):
    _train_group(doc)["rayStartParams"]["labels"] = "illume.dev/role=training"


def _break_idle_timeout(doc):
    # The gpu overlay as it was: idleTimeoutSeconds on gpu-train, autoscaler v2 not selected.
    del _cluster_of(doc)["autoscalerOptions"]["version"]


def _break_suspend(doc):
    _train_group(doc)["suspend"] = True


def _break_gcs_once(doc):
    _head_env(doc).append({"name": kr.ENV_REDIS_PASSWORD, "value": "secret"})


def _break_gcs_backend(doc):
    _cluster_of(doc)["gcsFaultToleranceOptions"]["storage"] = {"size": "1Gi"}


def _break_redis_username(doc):
    _head_env(doc).append({"name": kr.ENV_REDIS_USERNAME, "value": "illume"})


def _break_autoscaler(doc):
    _head_env(doc).append({"name": kr.ENV_AUTOSCALER_V2, "value": "true"})


def _break_token_auth(doc):
    _cluster_of(doc)["rayVersion"] = "2.50.0"


def _break_feature_gated(doc):
    _cluster_of(doc)["networkPolicy"] = {"mode": "DenyAll"}


def _break_k8s_token_auth(doc):
    _cluster_of(doc)["authOptions"] = {"mode": "token", "enableK8sTokenAuth": True}


def _break_head_service(doc):
    _cluster_of(doc)["headGroupSpec"]["headService"] = {"metadata": {"name": "illume-head"}}


def _break_upgrade(doc):
    doc["spec"]["upgradeStrategy"] = {"type": "Recreate"}


def _break_raycluster_upgrade(doc):
    cluster = _as_raycluster(doc)
    cluster["spec"]["upgradeStrategy"] = {"type": "Recreate"}
    return cluster


def _break_rayjob(doc):
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "illume-round"},
        "spec": {"clusterSelector": {"ray.io/cluster": "illume-abcde"}, "backoffLimit": 2},
    }


def _break_name(doc):
    doc["metadata"]["name"] = "illume-" + "x" * 41


# rule -> how to break the rendered gpu RayService for it (in place, or returning another resource)
BREAKS: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
    "name_is_a_short_dns1035_label": _break_name,
    "initializing_timeout_is_positive": _break_initializing_timeout,
    "groups_have_a_container": _break_container,
    "worker_replica_bounds": _break_replicas,
    "resources_in_one_place": _break_resources,
    "group_labels_are_valid": _break_labels,
    "idle_timeout_needs_autoscaler_v2": _break_idle_timeout,
    "suspended_worker_groups": _break_suspend,
    "gcs_fault_tolerance_is_configured_once": _break_gcs_once,
    "gcs_fault_tolerance_backend": _break_gcs_backend,
    "redis_username_only_in_options": _break_redis_username,
    "autoscaler_settings_agree": _break_autoscaler,
    "token_auth_needs_a_recent_ray": _break_token_auth,
    "feature_gated_fields": _break_feature_gated,
    "rayservice_has_no_k8s_token_auth": _break_k8s_token_auth,
    "rayservice_head_service_unnamed": _break_head_service,
    "rayservice_upgrade_strategy": _break_upgrade,
    "raycluster_upgrade_strategy": _break_raycluster_upgrade,
    "rayjob_has_a_cluster": _break_rayjob,
}


def test_every_rule_has_a_break():
    assert set(BREAKS) == set(kr.RULES)


@pytest.mark.parametrize("rule", sorted(kr.RULES))
def test_a_manifest_broken_for_a_rule_fails_it(rendered, rule):
    doc = copy.deepcopy(next(d for d in rendered["gpu"] if d["kind"] == "RayService"))
    assert kr.violations(doc) == {}
    broken = BREAKS[rule](doc) or doc
    found = kr.violations(broken)
    assert rule in found, f"{rule} did not fire: {found}"
