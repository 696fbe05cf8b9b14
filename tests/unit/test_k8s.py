"""k8s/ and the Kubernetes launcher, without a cluster.

The manifests (and the worker pods the node agent would create) are checked against the
Kubernetes OpenAPI schema bundled by `kubernetes-validate` (strict: unknown fields fail too),
their commands against the services' own argument parsers, and `KubernetesLauncher` against a
fake `CoreV1Api`: no API server is involved anywhere here.
"""

from __future__ import annotations

import asyncio
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
kubernetes = pytest.importorskip("kubernetes")

from kubernetes import client  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from libs.common.settings import Settings  # noqa: E402
from services.prefetcher import __main__ as node_agent_main  # noqa: E402
from services.prefetcher.k8s_launcher import (  # noqa: E402
    UNKNOWN_EXIT_CODE,
    KubernetesLauncher,
    PodTemplate,
    label_value,
    pod_name,
    worker_pod,
)
from services.prefetcher.launcher import LocalLauncher, WorkerSpec  # noqa: E402

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = REPO_ROOT / "k8s" / "base"
SECRET_EXAMPLE = REPO_ROOT / "k8s" / "secret.example.yaml"
# the oldest Kubernetes minor the manifests are meant for
K8S_VERSION = "1.29"
NAMESPACE = "hydraserve"
# values the downward API would give the node agent's `$(VAR)` references
DOWNWARD = {"NODE_NAME": "gpu-node-1", "POD_NAME": "hydraserve-node-agent-x7k2p",
            "POD_NAMESPACE": NAMESPACE}
CLUSTER_SCOPED = {"Namespace"}


def validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return found


@pytest.fixture(scope="module")
def built(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """`kustomize build k8s/base` for what the kustomization uses: namespace and labels."""
    resources = []
    labels = {k: v for entry in kustomization.get("labels", []) for k, v in entry["pairs"].items()}
    for name in kustomization["resources"]:
        for resource in load_all(BASE / name):
            resource = copy.deepcopy(resource)
            metadata = resource["metadata"]
            if resource["kind"] not in CLUSTER_SCOPED:
                metadata["namespace"] = kustomization["namespace"]
            metadata["labels"] = {**metadata.get("labels", {}), **labels}
            resources.append(resource)
    return resources


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    return found


def expand(argv: list[str]) -> list[str]:
    """The kubelet's `$(VAR)` expansion of a command, with the downward API's values."""
    return [re.sub(r"\$\((\w+)\)", lambda m: DOWNWARD[m.group(1)], arg) for arg in argv]


# --- the manifests -----------------------------------------------------------------------


def test_the_kustomization_lists_exactly_the_manifests_in_base(
        kustomization: dict[str, Any]) -> None:
    on_disk = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == on_disk
    assert kustomization["namespace"] == NAMESPACE


def test_the_base_holds_the_resources_of_the_deployment(built: list[dict[str, Any]]) -> None:
    assert sorted((r["kind"], r["metadata"]["name"]) for r in built) == [
        ("ConfigMap", "hydraserve-config"),
        ("DaemonSet", "hydraserve-node-agent"),
        ("Deployment", "hydraserve-gateway"),
        ("Deployment", "hydraserve-scheduler"),
        ("Namespace", "hydraserve"),
        ("Role", "hydraserve-node-agent"),
        ("RoleBinding", "hydraserve-node-agent"),
        ("Service", "hydraserve-gateway"),
        ("Service", "hydraserve-storage"),
        ("ServiceAccount", "hydraserve-node-agent"),
        ("StatefulSet", "hydraserve-storage"),
    ]


def test_every_manifest_file_validates_against_the_kubernetes_schema() -> None:
    for path in [*sorted(BASE.glob("*.yaml")), SECRET_EXAMPLE]:
        for resource in load_all(path):
            if resource["kind"] != "Kustomization":
                validate(resource)


def test_every_built_resource_validates_and_lives_in_the_namespace(
        built: list[dict[str, Any]]) -> None:
    for resource in built:
        validate(resource)
        if resource["kind"] not in CLUSTER_SCOPED:
            assert resource["metadata"]["namespace"] == NAMESPACE


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_same_resources(built: list[dict[str, Any]]) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True,
                            text=True, timeout=60, check=True)
    from_kustomize = [r for r in yaml.safe_load_all(result.stdout) if r]
    for resource in from_kustomize:
        validate(resource)

    def key(r: dict[str, Any]) -> tuple[str, str]:
        return r["kind"], r["metadata"]["name"]

    assert sorted(from_kustomize, key=key) == sorted(built, key=key)


def test_the_schema_rejects_a_deployment_with_replicas_as_a_word() -> None:
    broken = copy.deepcopy(find(load_all(BASE / "scheduler.yaml"), "Deployment",
                                "hydraserve-scheduler"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        validate(broken)
    assert list(caught.value.path) == ["spec", "replicas"]


def test_the_schema_rejects_a_misspelt_container_field() -> None:
    broken = copy.deepcopy(find(load_all(BASE / "scheduler.yaml"), "Deployment",
                                "hydraserve-scheduler"))
    pod_spec(broken)["containers"][0]["comand"] = ["python"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_the_configmap_holds_only_settings_the_services_read(
        built: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    data = find(built, "ConfigMap", "hydraserve-config")["data"]
    secret = load_all(SECRET_EXAMPLE)[0]["stringData"]
    for key in [*data, *secret]:
        group, _, field = key.removeprefix("HYDRASERVE_").lower().partition("__")
        assert key.startswith("HYDRASERVE_") and group in Settings.model_fields, key
        assert field in Settings.model_fields[group].annotation.model_fields, key  # type: ignore[union-attr]
    for key, value in {**data, **secret}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.nats.url == "nats://nats.nats.svc.cluster.local:4222"
    assert settings.gateway.storage_url == "http://hydraserve-storage:8600"
    assert (settings.gateway.host, settings.gateway.port) == ("0.0.0.0", 8000)
    assert settings.database.url.startswith("postgresql+asyncpg://")


def test_secret_references_name_keys_of_the_example_secret(built: list[dict[str, Any]]) -> None:
    (secret,) = load_all(SECRET_EXAMPLE)
    for workload in built:
        if workload["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        spec = pod_spec(workload)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] == secret["metadata"]["name"]
                if "configMapRef" in source:
                    find(built, "ConfigMap", source["configMapRef"]["name"])
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in secret["stringData"]


def test_services_select_the_pods_of_their_workload(built: list[dict[str, Any]]) -> None:
    for service, kind in (("hydraserve-gateway", "Deployment"),
                          ("hydraserve-storage", "StatefulSet")):
        selector = find(built, "Service", service)["spec"]["selector"]
        labels = find(built, kind, service)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    storage = find(built, "StatefulSet", "hydraserve-storage")
    assert storage["spec"]["serviceName"] == "hydraserve-storage"
    assert [t["metadata"]["name"] for t in storage["spec"]["volumeClaimTemplates"]] == ["store"]
    assert container(storage, "storage")["volumeMounts"] == [
        {"name": "store", "mountPath": "/store"}]


def test_containers_run_the_commands_of_docker_compose(built: list[dict[str, Any]]) -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    for kind, name, compose_name in (("StatefulSet", "hydraserve-storage", "storage"),
                                     ("Deployment", "hydraserve-scheduler", "scheduler"),
                                     ("Deployment", "hydraserve-gateway", "gateway"),
                                     ("DaemonSet", "hydraserve-node-agent", "node-1")):
        command = pod_spec(find(built, kind, name))["containers"][0]["command"]
        assert command[:3] == compose[compose_name]["command"][:3], name
    storage = container(find(built, "StatefulSet", "hydraserve-storage"), "storage")
    assert storage["command"] == compose["storage"]["command"]
    gateway = find(built, "Deployment", "hydraserve-gateway")
    assert pod_spec(gateway)["initContainers"][0]["command"] == compose["migrate"]["command"]


def test_the_scheduler_command_parses_with_its_own_parser(built: list[dict[str, Any]]) -> None:
    from services.scheduler.__main__ import parse_args

    command = container(find(built, "Deployment", "hydraserve-scheduler"), "scheduler")["command"]
    args = parse_args(command[3:])
    assert args.storage_url == "http://hydraserve-storage:8600"
    assert (args.nats, args.database_url) == (None, None)  # from the environment


def test_the_node_agent_runs_on_gpu_nodes_with_host_shared_memory(
        built: list[dict[str, Any]]) -> None:
    agent = find(built, "DaemonSet", "hydraserve-node-agent")
    spec = pod_spec(agent)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        spec["tolerations"])
    assert spec.get("hostNetwork") is not True
    assert spec["volumes"] == [{"name": "shm", "hostPath": {
        "path": "/dev/shm/hydraserve", "type": "DirectoryOrCreate"}}]
    assert container(agent, "node-agent")["volumeMounts"] == [
        {"name": "shm", "mountPath": "/dev/shm/hydraserve"}]
    assert "limits" not in container(agent, "node-agent")["resources"]


def test_the_node_agent_command_launches_worker_pods_into_its_shared_memory(
        built: list[dict[str, Any]]) -> None:
    agent = container(find(built, "DaemonSet", "hydraserve-node-agent"), "node-agent")
    downward = {v["name"]: v["valueFrom"]["fieldRef"]["fieldPath"] for v in agent["env"]}
    assert downward == {"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name",
                        "POD_NAMESPACE": "metadata.namespace"}
    args = node_agent_main.parse_args(expand(agent["command"])[3:])
    config = node_agent_main.build_config(args)
    assert (args.launcher, args.k8s_namespace, args.k8s_node_name, args.k8s_pod_name) == (
        "kubernetes", NAMESPACE, "gpu-node-1", "hydraserve-node-agent-x7k2p")
    assert config.agent.node_id == "gpu-node-1"
    # the worker pods mount the hostPath where the agent writes the partitions
    assert str(config.agent.work_dir) == agent["volumeMounts"][0]["mountPath"]
    assert config.agent.worker_args == ("--device=cuda",)
    find(built, "ConfigMap", args.k8s_config_map)


def test_the_node_agent_may_manage_pods_in_its_namespace_only(
        built: list[dict[str, Any]]) -> None:
    agent = find(built, "DaemonSet", "hydraserve-node-agent")
    account = pod_spec(agent)["serviceAccountName"]
    find(built, "ServiceAccount", account)
    role = find(built, "Role", "hydraserve-node-agent")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["create", "delete", "get", "list", "watch"]}]
    binding = find(built, "RoleBinding", "hydraserve-node-agent")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                    "namespace": NAMESPACE}]


# --- the worker pod ----------------------------------------------------------------------

SHM = "/dev/shm/hydraserve"
SPEC = WorkerSpec(
    worker_id="w-42",
    argv=["/usr/local/bin/python", "-m", "services.worker", "--model",
          "meta-llama/Llama-2-7b-chat-hf", "--partition", f"{SHM}/ww-42.safetensors",
          "--worker-id", "w-42"],
    log_path=Path(f"{SHM}/logs/worker-w-42.log"), env={"HS_TRACE": "1"})


def serialized(pod: client.V1Pod) -> dict[str, Any]:
    data: dict[str, Any] = client.ApiClient().sanitize_for_serialization(pod)
    return data


def build_pod(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "image": "hydraserve:latest",
                              "node_name": "gpu-node-1", "shm_host_path": SHM,
                              "gpu_type": "nvidia", "memory_bytes": 4 << 30,
                              "config_map": "hydraserve-config"}
    return serialized(worker_pod(SPEC, **{**kwargs, **overrides}))


def test_the_worker_pod_validates_against_the_pod_schema() -> None:
    validate(build_pod())
    validate(build_pod(gpu_type="cpu", config_map=None, owner=client.V1OwnerReference(
        api_version="v1", kind="Pod", name="hydraserve-node-agent-x7k2p", uid="1234")))


def test_the_worker_pod_runs_the_worker_argv_on_the_agents_node_next_to_its_partition(
        ) -> None:
    pod = build_pod()
    assert pod["metadata"]["name"] == "hydraserve-worker-w-42"
    assert pod["metadata"]["labels"] == {"app": "hydraserve-worker",
                                         "hydraserve.io/worker-id": "w-42",
                                         "hydraserve.io/model": "meta-llama-Llama-2-7b-chat-hf"}
    assert pod["metadata"]["annotations"]["hydraserve.io/model"] == (
        "meta-llama/Llama-2-7b-chat-hf")
    spec = pod["spec"]
    assert spec["nodeName"] == "gpu-node-1"
    assert spec["restartPolicy"] == "Never"
    assert spec["volumes"] == [{"name": "shm", "hostPath": {"path": SHM, "type": "Directory"}}]
    (worker,) = spec["containers"]
    assert worker["command"] == SPEC.argv
    assert worker["image"] == "hydraserve:latest"
    assert worker["env"] == [
        {"name": "HS_TRACE", "value": "1"},
        {"name": "HYDRASERVE_WORKER__DATA_PLANE_HOST",
         "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    assert worker["envFrom"] == [{"configMapRef": {"name": "hydraserve-config"}}]
    assert worker["volumeMounts"] == [{"name": "shm", "mountPath": SHM}]
    assert worker["resources"] == {"requests": {"memory": str(4 << 30)},
                                   "limits": {"nvidia.com/gpu": "1"}}


def test_a_worker_pod_on_an_emulated_node_asks_for_no_gpu() -> None:
    resources = build_pod(gpu_type="cpu", memory_bytes=1 << 30)["spec"]["containers"][0][
        "resources"]
    assert resources == {"requests": {"memory": str(1 << 30)}}


def test_a_worker_pod_is_owned_by_the_node_agents_pod_when_given() -> None:
    owner = client.V1OwnerReference(api_version="v1", kind="Pod", name="agent", uid="u-1")
    pod = build_pod(owner=owner)
    assert pod["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "agent", "uid": "u-1"}]


@pytest.mark.parametrize("worker_id", ["W_Upper.Case/1", "x" * 80, "a--"])
def test_pod_names_are_dns_labels_and_differ_when_ids_do(worker_id: str) -> None:
    name = pod_name(worker_id)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert pod_name(worker_id + "z") != name


def test_label_values_drop_characters_labels_cannot_hold() -> None:
    assert label_value("org/Model:v1") == "org-Model-v1"
    assert label_value("/" + "m" * 70) == "m" * 62


# --- the launcher, against a fake CoreV1Api (tested without a cluster) -------------------


def pod_status(phase: str, exit_code: int | None = None) -> client.V1Pod:
    state = (client.V1ContainerState(terminated=client.V1ContainerStateTerminated(
        exit_code=exit_code)) if exit_code is not None else client.V1ContainerState())
    return client.V1Pod(status=client.V1PodStatus(phase=phase, container_statuses=[
        client.V1ContainerStatus(name="worker", state=state, image="hydraserve:latest",
                                 image_id="", ready=False, restart_count=0)]))


class FakePodApi:
    """CoreV1Api's pod calls: records what is asked, answers reads from a script."""

    def __init__(self, reads: list[client.V1Pod | ApiException] | None = None,
                 create_error: ApiException | None = None,
                 listed: list[str] | ApiException | None = None) -> None:
        self.created: list[tuple[str, client.V1Pod]] = []
        self.deleted: list[tuple[str, str, int]] = []
        self.list_calls: list[tuple[str, dict[str, Any]]] = []
        self._reads = list(reads or [])
        self._create_error = create_error
        self._listed = listed or []

    def create_namespaced_pod(self, namespace: str, body: client.V1Pod,
                              **kwargs: Any) -> client.V1Pod:
        if self._create_error is not None:
            raise self._create_error
        self.created.append((namespace, body))
        return body

    def read_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> client.V1Pod:
        answer = self._reads.pop(0) if len(self._reads) > 1 else self._reads[0]
        if isinstance(answer, ApiException):
            raise answer
        return answer

    def delete_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> None:
        self.deleted.append((namespace, name, kwargs["grace_period_seconds"]))

    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> client.V1PodList:
        self.list_calls.append((namespace, kwargs))
        if isinstance(self._listed, ApiException):
            raise self._listed
        return client.V1PodList(items=[client.V1Pod(metadata=client.V1ObjectMeta(name=n))
                                       for n in self._listed])


TEMPLATE = PodTemplate(namespace=NAMESPACE, image="hydraserve:latest", node_name="gpu-node-1",
                       shm_host_path=SHM, gpu_type="nvidia", config_map="hydraserve-config")


def launcher(api: FakePodApi) -> KubernetesLauncher:
    return KubernetesLauncher(TEMPLATE, api=api, poll_interval_s=0.0)


def test_launch_creates_the_worker_pod_in_the_namespace() -> None:
    api = FakePodApi()
    handle = asyncio.run(launcher(api).launch(SPEC))
    ((namespace, body),) = api.created
    assert namespace == NAMESPACE
    assert serialized(body) == build_pod()
    assert handle.name == "hydraserve-worker-w-42"
    assert handle.pid == asyncio.run(launcher(FakePodApi()).launch(SPEC)).pid > 0


def test_a_refused_pod_creation_is_the_oserror_the_agent_handles() -> None:
    api = FakePodApi(create_error=ApiException(status=409, reason="AlreadyExists"))
    with pytest.raises(OSError, match="409 AlreadyExists"):
        asyncio.run(launcher(api).launch(SPEC))


def test_wait_returns_the_worker_containers_exit_code_once_the_pod_ended() -> None:
    api = FakePodApi(reads=[pod_status("Pending"), pod_status("Running"),
                            ApiException(status=500, reason="Internal"),
                            pod_status("Failed", exit_code=3)])

    async def scenario() -> int:
        handle = await launcher(api).launch(SPEC)
        return await asyncio.wait_for(handle.wait(), 5)

    assert asyncio.run(scenario()) == 3


def test_wait_reports_an_unknown_exit_code_for_a_pod_that_is_gone() -> None:
    api = FakePodApi(reads=[ApiException(status=404, reason="NotFound")])

    async def scenario() -> int:
        handle = await launcher(api).launch(SPEC)
        return await asyncio.wait_for(handle.wait(), 5)

    assert asyncio.run(scenario()) == UNKNOWN_EXIT_CODE


def test_terminate_deletes_the_pod_with_the_timeout_as_grace_period() -> None:
    api = FakePodApi(reads=[pod_status("Running"), pod_status("Succeeded", exit_code=0)])

    async def scenario() -> int:
        handle = await launcher(api).launch(SPEC)
        return await asyncio.wait_for(handle.terminate(12.5), 5)

    assert asyncio.run(scenario()) == 0
    assert api.deleted == [(NAMESPACE, "hydraserve-worker-w-42", 13)]


def test_start_deletes_the_worker_pods_a_previous_agent_left_on_its_node() -> None:
    api = FakePodApi(listed=["hydraserve-worker-w-1", "hydraserve-worker-w-2"])

    asyncio.run(launcher(api).start())

    assert api.list_calls == [(NAMESPACE, {"label_selector": "app=hydraserve-worker",
                                           "field_selector": "spec.nodeName=gpu-node-1"})]
    assert api.deleted == [(NAMESPACE, "hydraserve-worker-w-1", 0),
                           (NAMESPACE, "hydraserve-worker-w-2", 0)]


def test_start_logs_a_failed_listing_and_launching_still_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = FakePodApi(listed=ApiException(status=403, reason="Forbidden"))
    chosen = launcher(api)

    asyncio.run(chosen.start())
    asyncio.run(chosen.launch(SPEC))

    assert "listing the worker pods left on gpu-node-1 failed" in caplog.text
    assert api.deleted == [] and len(api.created) == 1


# --- choosing the launcher ---------------------------------------------------------------

REQUIRED = ["--node-id", "n1", "--gpu-memory-gb", "24", "--nic-gbps", "16",
            "--storage-url", "http://storage:8600", "--nats", "nats://nats:4222"]


def test_the_node_agent_launches_local_processes_by_default() -> None:
    args = node_agent_main.parse_args(REQUIRED)
    assert args.launcher == "local"
    launcher = node_agent_main.build_launcher(args, node_agent_main.build_config(args))
    assert isinstance(launcher, LocalLauncher)


def test_the_kubernetes_launcher_outside_a_pod_fails_with_a_clear_error() -> None:
    from libs.common.errors import ServiceUnavailableError

    args = node_agent_main.parse_args([*REQUIRED, "--launcher", "kubernetes",
                                       "--k8s-image", "hydraserve:latest"])
    with pytest.raises(ServiceUnavailableError, match="needs to run in a pod"):
        node_agent_main.build_launcher(args, node_agent_main.build_config(args))


def test_the_node_agent_imports_kubernetes_only_for_the_kubernetes_launcher() -> None:
    script = ("import sys, services.prefetcher.__main__ as m\n"
              "m.build_launcher(m.parse_args(sys.argv[1:]), m.build_config("
              "m.parse_args(sys.argv[1:])))\n"
              "print('kubernetes' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script, *REQUIRED], capture_output=True,
                            text=True, check=True, cwd=REPO_ROOT, timeout=120)
    assert result.stdout.strip() == "False"
