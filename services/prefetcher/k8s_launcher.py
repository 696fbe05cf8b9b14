"""Worker pods instead of worker processes: the node agent's launcher on Kubernetes.

Each worker becomes a pod pinned to the agent's node (`spec.nodeName`, no scheduler in the
way), running the same argv the local launcher would run, with the node's shared-memory
folder (a hostPath) mounted at the path the agent fetches partitions into, so the worker maps
the partition exactly as a local process would.

Only the node agent imports this module, and only when `--launcher kubernetes` is chosen: the
`kubernetes` client must stay out of the worker's import path (its start-up time is the
product).

Differences from `LocalLauncher`:
- `pid` is not a process id (the process lives in another pod's PID namespace): it is a
  stable 31-bit hash of the pod name, enough to tell workers apart in events and logs.
- `WorkerSpec.log_path` is not used: a worker's output is its pod's log (`kubectl logs`).
- An exit code is known only while the pod object exists; a pod deleted before its status was
  read, evicted, or refused by the kubelet (no free GPU) ends with `UNKNOWN_EXIT_CODE`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from libs.common.errors import ServiceUnavailableError
from services.prefetcher.launcher import WorkerSpec

logger = logging.getLogger(__name__)

WORKER_APP = "hydraserve-worker"
GPU_RESOURCE = "nvidia.com/gpu"
# the exit code of a worker whose pod ended without reporting one
UNKNOWN_EXIT_CODE = -1
# extra seconds, past the grace period, a deleted pod is given to disappear
DELETE_MARGIN_S = 10.0
_NOT_FOUND = 404
_INVALID_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_INVALID_NAME_CHARS = re.compile(r"[^a-z0-9-]+")


class PodApi(Protocol):
    """The `CoreV1Api` calls the launcher makes (a fake one in tests)."""

    def create_namespaced_pod(self, namespace: str, body: client.V1Pod,
                              **kwargs: Any) -> Any: ...

    def read_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> Any: ...

    def delete_namespaced_pod(self, name: str, namespace: str, **kwargs: Any) -> Any: ...

    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PodTemplate:
    """Everything about a worker pod that does not depend on the worker."""

    namespace: str
    image: str
    node_name: str
    # the node's shared-memory folder: the agent's work dir, mounted at the same path
    shm_host_path: str
    # "cpu": an emulated node, no GPU requested; anything else asks for one nvidia.com/gpu
    gpu_type: str = "cpu"
    # host memory requested for the worker process (not limited: a load must not be OOM-killed)
    memory_bytes: int = 4 << 30
    # a ConfigMap whose HYDRASERVE_* settings every worker gets (e.g. WORKER__CAPACITY)
    config_map: str | None = None
    # the node agent's pod: its workers are garbage-collected with it
    owner: client.V1OwnerReference | None = None
    image_pull_policy: str = "IfNotPresent"


def pod_name(worker_id: str) -> str:
    """A DNS-1123 label for the worker's pod; a hash suffix keeps ids that had to be changed
    (upper case, odd characters, too long) apart."""
    slug = _INVALID_NAME_CHARS.sub("-", worker_id.lower()).strip("-")
    name = f"{WORKER_APP}-{slug}"
    if slug == worker_id and len(name) <= 63:
        return name
    digest = hashlib.sha256(worker_id.encode()).hexdigest()[:8]
    return f"{name[:63 - 9].rstrip('-')}-{digest}"


def label_value(text: str) -> str:
    """`text` as a label value (63 characters of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    return _INVALID_LABEL_CHARS.sub("-", text)[:63].strip("-_.")


def worker_pod(spec: WorkerSpec, *, namespace: str, image: str, node_name: str,
               shm_host_path: str, gpu_type: str = "cpu", memory_bytes: int = 4 << 30,
               config_map: str | None = None, owner: client.V1OwnerReference | None = None,
               image_pull_policy: str = "IfNotPresent") -> client.V1Pod:
    """The pod that runs one worker: `spec.argv` on `node_name`, next to its partition."""
    model = _flag_value(spec.argv, "--model")
    labels = {"app": WORKER_APP, "hydraserve.io/worker-id": label_value(spec.worker_id)}
    annotations = {"hydraserve.io/worker-id": spec.worker_id}
    if model is not None:
        labels["hydraserve.io/model"] = label_value(model)
        # the label is sanitised ("meta-llama/Llama-2-7b" has a slash); the annotation is not
        annotations["hydraserve.io/model"] = model
    resources = client.V1ResourceRequirements(
        requests={"memory": str(memory_bytes)},
        limits={GPU_RESOURCE: "1"} if gpu_type != "cpu" else None)
    env = [client.V1EnvVar(name=key, value=value) for key, value in sorted(spec.env.items())]
    # the address other stages reach this worker's data-plane socket at: the pod's IP
    env.append(client.V1EnvVar(name="HYDRASERVE_WORKER__DATA_PLANE_HOST",
                               value_from=client.V1EnvVarSource(
                                   field_ref=client.V1ObjectFieldSelector(
                                       field_path="status.podIP"))))
    env_from = [client.V1EnvFromSource(config_map_ref=client.V1ConfigMapEnvSource(
        name=config_map))] if config_map else []
    container = client.V1Container(
        name="worker", image=image, image_pull_policy=image_pull_policy,
        command=list(spec.argv), env=env or None, env_from=env_from or None,
        resources=resources,
        volume_mounts=[client.V1VolumeMount(name="shm", mount_path=shm_host_path)])
    return client.V1Pod(
        api_version="v1", kind="Pod",
        metadata=client.V1ObjectMeta(
            name=pod_name(spec.worker_id), namespace=namespace, labels=labels,
            annotations=annotations, owner_references=[owner] if owner else None),
        spec=client.V1PodSpec(
            node_name=node_name, restart_policy="Never", containers=[container],
            volumes=[client.V1Volume(name="shm", host_path=client.V1HostPathVolumeSource(
                path=shm_host_path, type="Directory"))],
            # nodeName skips the scheduler, but the kubelet still honours NoExecute taints
            tolerations=[client.V1Toleration(key=GPU_RESOURCE, operator="Exists")],
            # a worker needs no API access, and no service env vars slowing its start
            automount_service_account_token=False, enable_service_links=False))


class WorkerPod:
    """A worker's pod, seen through the API; the `WorkerHandle` of `KubernetesLauncher`."""

    def __init__(self, api: PodApi, *, name: str, namespace: str,
                 poll_interval_s: float) -> None:
        self._api = api
        self.name = name
        self._namespace = namespace
        self._poll_interval_s = poll_interval_s

    @property
    def pid(self) -> int:
        """Not a process id: a stable positive hash of the pod name (see the module doc)."""
        return int(hashlib.sha256(self.name.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF

    async def wait(self) -> int:
        while True:
            exit_code = await self._exit_code()
            if exit_code is not None:
                return exit_code
            await asyncio.sleep(self._poll_interval_s)

    async def terminate(self, timeout_s: float) -> int:
        """Delete the pod: SIGTERM now (the worker drains), SIGKILL after `timeout_s`."""
        grace_s = max(0, math.ceil(timeout_s))
        await self._delete(grace_s)
        try:
            return await asyncio.wait_for(self.wait(), grace_s + DELETE_MARGIN_S)
        except TimeoutError:
            # the kubelet did not report back (node gone?): remove the object regardless
            logger.warning("worker pod %s still there %.0fs after deletion; forcing it",
                           self.name, grace_s + DELETE_MARGIN_S)
            await self._delete(0)
            return UNKNOWN_EXIT_CODE

    async def _exit_code(self) -> int | None:
        """The worker's exit code once its pod has ended; None while it runs."""
        try:
            pod = await asyncio.to_thread(self._api.read_namespaced_pod, self.name,
                                          self._namespace)
        except ApiException as exc:
            if exc.status == _NOT_FOUND:
                return UNKNOWN_EXIT_CODE
            logger.warning("reading worker pod %s failed: %s %s", self.name, exc.status,
                           exc.reason)
            return None
        except HTTPError as exc:
            logger.warning("reading worker pod %s failed: %r", self.name, exc)
            return None
        return pod_exit_code(pod)

    async def _delete(self, grace_s: int) -> None:
        try:
            await asyncio.to_thread(self._api.delete_namespaced_pod, self.name,
                                    self._namespace, grace_period_seconds=grace_s)
        except ApiException as exc:
            # gone already: nothing to stop
            if exc.status != _NOT_FOUND:
                raise OSError(f"deleting worker pod {self.name} failed: {exc.status} "
                              f"{exc.reason}") from exc
        except HTTPError as exc:
            raise OSError(f"deleting worker pod {self.name} failed: {exc!r}") from exc


def pod_exit_code(pod: client.V1Pod) -> int | None:
    """The worker container's exit code of an ended pod; None while the pod runs."""
    status = pod.status
    if status is None or status.phase not in ("Succeeded", "Failed"):
        return None
    for container in status.container_statuses or []:
        terminated = container.state.terminated if container.state else None
        if container.name == "worker" and terminated is not None:
            return int(terminated.exit_code)
    return UNKNOWN_EXIT_CODE


class KubernetesLauncher:
    """A pod per worker, on the node the agent runs on."""

    def __init__(self, template: PodTemplate, *, api: PodApi,
                 poll_interval_s: float = 1.0) -> None:
        self.template = template
        self._api = api
        self._poll_interval_s = poll_interval_s

    @classmethod
    def in_cluster(cls, template: PodTemplate, *, pod_name: str | None = None,
                   poll_interval_s: float = 1.0) -> KubernetesLauncher:
        """The launcher of a node agent running in a pod (its service account's token).

        With `pod_name` (the agent's own pod), workers are owned by that pod and, when
        `template.image` is empty, run the agent's own image.
        """
        try:
            config.load_incluster_config()
        except ConfigException as exc:
            raise ServiceUnavailableError(
                f"--launcher kubernetes needs to run in a pod: {exc}") from exc
        api = client.CoreV1Api()
        if pod_name is not None:
            try:
                agent = api.read_namespaced_pod(pod_name, template.namespace)
            except (ApiException, HTTPError) as exc:
                raise ServiceUnavailableError(
                    f"cannot read the node agent's pod {template.namespace}/{pod_name}: "
                    f"{exc}") from exc
            owner = client.V1OwnerReference(api_version="v1", kind="Pod",
                                            name=agent.metadata.name, uid=agent.metadata.uid)
            image = template.image or agent.spec.containers[0].image
            template = replace(template, owner=owner, image=image)
        if not template.image:
            raise ValueError("--launcher kubernetes needs --k8s-image or --k8s-pod-name")
        return cls(template, api=api, poll_interval_s=poll_interval_s)

    async def start(self) -> None:
        """Delete the worker pods a previous agent left on this node.

        A local worker dies with its agent; a pod does not. When the agent's pod goes, its
        workers are garbage-collected with it (their owner), but when only its container
        restarts, the pod stays, and so do the workers the old process launched: nobody
        stops them, and they hold the node's GPU memory. The new agent knows of no worker, so
        every worker pod on its node is a leftover (one agent per node: a DaemonSet). A
        failure is logged; launching does not wait for it.
        """
        t = self.template
        try:
            pods = await asyncio.to_thread(
                self._api.list_namespaced_pod, t.namespace, label_selector=f"app={WORKER_APP}",
                field_selector=f"spec.nodeName={t.node_name}")
        except (ApiException, HTTPError) as exc:
            logger.error("listing the worker pods left on %s failed: %s", t.node_name, exc)
            return
        for pod in pods.items:
            name = pod.metadata.name
            logger.warning("deleting worker pod %s/%s, left by a previous node agent on %s",
                           t.namespace, name, t.node_name)
            try:
                await asyncio.to_thread(self._api.delete_namespaced_pod, name, t.namespace,
                                        grace_period_seconds=0)
            except (ApiException, HTTPError) as exc:
                if not (isinstance(exc, ApiException) and exc.status == _NOT_FOUND):
                    logger.error("deleting worker pod %s/%s failed: %s", t.namespace, name,
                                 exc)

    async def launch(self, spec: WorkerSpec) -> WorkerPod:
        t = self.template
        pod = worker_pod(spec, namespace=t.namespace, image=t.image, node_name=t.node_name,
                         shm_host_path=t.shm_host_path, gpu_type=t.gpu_type,
                         memory_bytes=t.memory_bytes, config_map=t.config_map, owner=t.owner,
                         image_pull_policy=t.image_pull_policy)
        name = pod.metadata.name
        try:
            await asyncio.to_thread(self._api.create_namespaced_pod, t.namespace, pod)
        except ApiException as exc:
            # OSError: what the agent expects of a launch that failed
            raise OSError(f"creating worker pod {t.namespace}/{name} failed: {exc.status} "
                          f"{exc.reason}") from exc
        except HTTPError as exc:
            raise OSError(f"creating worker pod {t.namespace}/{name} failed: {exc!r}") from exc
        logger.info("launched worker %s as pod %s/%s on %s", spec.worker_id, t.namespace, name,
                    t.node_name)
        return WorkerPod(self._api, name=name, namespace=t.namespace,
                         poll_interval_s=self._poll_interval_s)


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in `argv` (`--flag value` or `--flag=value`)."""
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(f"{flag}="):
            return arg.partition("=")[2]
    return None
