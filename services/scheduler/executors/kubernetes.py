"""The Kubernetes executor: each attempt of a job is a ``batch/v1`` Job, through the official client.

The ``kubernetes`` client is synchronous: every call runs in a worker thread
(:func:`asyncio.to_thread`), one thread hop per poll of an attempt, so the event loop stays free.
Per attempt:

- The Job is named ``plinth-<job id>-a<attempt>``: a launch repeated after a crash finds the Job
  it already created (HTTP 409 or a read), and :meth:`KubernetesExecutor.reattach` needs nothing
  but the job. Owner labels ``plinth.dev/job-id``, ``plinth.dev/team``, ``plinth.dev/attempt`` are
  on the Job and its pods (the pods are listed by them).
- The manifest comes from the pure function :func:`job_manifest` (tests validate it against the
  official schemas): requests and limits (``cpu``, ``memory``, ``nvidia.com/gpu``; limits equal
  requests, so memory over the request is an OOM kill, as with the local executor), the flavor's
  labels as a node selector and its taints as tolerations, ``backoffLimit: 0`` (retries are
  Plinth's), ``ttlSecondsAfterFinished``, ``activeDeadlineSeconds`` from the maximum run time.
  A gang of N is an Indexed Job with ``completions = parallelism = N``; each pod's
  ``PLINTH_REPLICA_INDEX``/``PLINTH_RANK`` is its completion index (downward API).
- MLflow credentials never appear in the manifest: they go into a Secret
  ``plinth-<id>-a<N>-mlflow`` read through ``secretKeyRef``, owned by the Job (deleted with it).
- Pod logs are copied into ``<jobs_dir>/<id>/log`` while the attempt runs (whole lines) and once
  more at its end, so they outlive the pods (``ttlSecondsAfterFinished``, node loss). What was
  copied per pod is kept in ``k8s-a<N>.copied``: a re-attached executor goes on from there.
- End reasons come from the pods: ``OOMKilled`` (container state), ``Evicted`` (pod reason),
  ``DeadlineExceeded`` (the Job's condition), ``PodScheduled=False/Unschedulable`` or an image
  that cannot be pulled for longer than ``pending_timeout_s`` (the Job is then deleted), an
  invalid image at once; the exit code from the container's terminated state (128+N: signal N).
- A stop deletes the Job (``propagationPolicy: Background``, ``gracePeriodSeconds``); the pods get
  SIGTERM and, after their ``terminationGracePeriodSeconds`` (the executor's ``kill_grace_s``),
  SIGKILL. The attempt ends once its pods are gone (their last log lines copied).

Kueue hand-off (``executor_options["kueue"] = "true"``): the Job is created with ``suspend: true``
and the ``kueue.x-k8s.io/queue-name`` label (and ``kueue.x-k8s.io/priority-class``); Kueue admits
it by un-suspending it. The executor reads Kueue's Workload for the Job (``kueue.x-k8s.io/v1beta1``,
owned by the Job) and writes its conditions (QuotaReserved, Admitted, Evicted, Finished) into the
job's log as ``[plinth] kueue: ...`` lines. An eviction by Kueue (preemption, a stopped queue)
ends the attempt as ``PREEMPTED``: the Job is deleted and Plinth requeues the job (a requeue, not
a failure); Kueue's own requeue of the old Job would otherwise run it behind Plinth's back.

Not measured: used memory and cpu time (that needs metrics-server or the kubelet's summary API),
so :class:`ExitStatus` carries 0 for both. ``PLINTH_OUTPUT_FILE`` and ``PLINTH_CHECKPOINT_DIR``
are shared with Plinth (and kept across attempts) only when the job folders are on a volume the
pods mount (``volume_claim``); otherwise they are ``emptyDir`` volumes below ``/plinth``, gone
with the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from plinth_common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.scheduler.domain import CREDENTIAL_ENV, EndReason, ExitStatus, Job, Resources
from services.scheduler.executors._room import (
    RoomExecutor,
    attempt_env,
    attempt_of,
    replicas_of,
)
from services.scheduler.queueing.model import ResourceFlavor, Taint

__all__ = [
    "JOB_IMAGE_ENV",
    "KubernetesExecutor",
    "KubernetesHandle",
    "KubernetesJobRejected",
    "KueueOptions",
    "job_manifest",
    "job_name",
    "secret_manifest",
]

log = logging.getLogger(__name__)

#: A job's own image (in its spec's env), instead of its flavor's ``image``.
JOB_IMAGE_ENV = "CONTAINER_IMAGE"
LABEL_JOB_ID = "plinth.dev/job-id"
LABEL_TEAM = "plinth.dev/team"
LABEL_ATTEMPT = "plinth.dev/attempt"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
_KUEUE = ("kueue.x-k8s.io", "v1beta1", "workloads")
_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
_CONTAINER = "job"
#: Where a pod without the shared volume keeps its outputs file and checkpoints.
SCRATCH_DIR = "/plinth"
_MESSAGE_CHARS = 1000
# Waiting reasons that no wait will fix: the job fails at once with the engine's message.
_BAD_IMAGE = frozenset({"InvalidImageName", "ErrImageNeverPull"})
# Waiting reasons that may pass (a registry hiccup, a Secret not there yet): patience first.
_STUCK_WAITING = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "CreateContainerError"}
)


class KubernetesJobRejected(FailedPrecondition):
    """The API server refused the Job (an invalid manifest, a quota, a webhook): its words."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KueueOptions:
    """The Kueue hand-off: the LocalQueue to submit to, and a WorkloadPriorityClass ('' none)."""

    queue_name: str
    priority_class: str = ""


def job_name(job: Job) -> str:
    """The Kubernetes Job of the job's current attempt."""
    return f"plinth-{job.id}-a{attempt_of(job)}"


def _secret_name(job: Job) -> str:
    return f"{job_name(job)}-mlflow"


def _labels(job: Job) -> dict[str, str]:
    return {
        LABEL_JOB_ID: job.id,
        LABEL_TEAM: job.team,
        LABEL_ATTEMPT: str(attempt_of(job)),
        "app.kubernetes.io/managed-by": "plinth",
    }


def _quantity_cpu(cpu: float) -> str:
    return f"{max(1, math.ceil(cpu * 1000))}m"


def secret_manifest(job: Job, *, namespace: str, data: Mapping[str, str]) -> dict[str, Any]:
    """The Secret holding the attempt's MLflow credentials (``stringData``)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": _secret_name(job), "namespace": namespace, "labels": _labels(job)},
        "type": "Opaque",
        "stringData": dict(data),
    }


def job_manifest(
    job: Job,
    env: Mapping[str, str],
    *,
    namespace: str,
    image: str,
    node_selector: Mapping[str, str] | None = None,
    taints: Sequence[Taint] = (),
    secret_keys: Iterable[str] = (),
    kueue: KueueOptions | None = None,
    ttl_s: int = 3600,
    kill_grace_s: float = 30.0,
    service_account: str = "",
    volume_claim: str = "",
    jobs_dir: str = "",
) -> dict[str, Any]:
    """The ``batch/v1`` Job of the job's current attempt.

    Args:
        env: the job's variables, as values; ``secret_keys`` are read from the attempt's Secret.
        volume_claim: a PersistentVolumeClaim holding ``jobs_dir``, mounted at the same path (the
            job's working directory, checkpoints and outputs are then shared with Plinth); ''
            runs in the image's working directory.
    """
    replicas = replicas_of(job)
    resources = job.spec.resources
    quantities: dict[str, str] = {"cpu": _quantity_cpu(resources.cpu or 0.001)}
    if resources.memory_bytes:
        quantities["memory"] = str(int(resources.memory_bytes))
    if resources.gpu:
        quantities["nvidia.com/gpu"] = str(int(resources.gpu))
    container_env: list[dict[str, Any]] = [
        {"name": key, "value": value} for key, value in sorted(env.items())
    ]
    container_env += [
        {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": _secret_name(job), "key": key}},
        }
        for key in sorted(secret_keys)
    ]
    for name in ("PLINTH_REPLICA_INDEX", "PLINTH_RANK"):
        if replicas > 1:
            container_env.append(
                {"name": name, "valueFrom": {"fieldRef": {"fieldPath": _COMPLETION_INDEX}}}
            )
        else:
            container_env.append({"name": name, "value": "0"})
    container: dict[str, Any] = {
        "name": _CONTAINER,
        "image": image,
        "command": list(job.spec.entrypoint),
        "env": container_env,
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": max(0, math.ceil(kill_grace_s)),
        "containers": [container],
    }
    if volume_claim:
        container["workingDir"] = job.spec.working_dir
        container["volumeMounts"] = [{"name": "plinth-jobs", "mountPath": jobs_dir}]
        pod_spec["volumes"] = [
            {"name": "plinth-jobs", "persistentVolumeClaim": {"claimName": volume_claim}}
        ]
    else:
        # Somewhere writable for PLINTH_OUTPUT_FILE and PLINTH_CHECKPOINT_DIR (a read-only
        # image, a non-root user): an emptyDir, gone with the pod.
        container["volumeMounts"] = [
            {"name": "plinth-checkpoint", "mountPath": f"{SCRATCH_DIR}/checkpoint"},
            {"name": "plinth-outputs", "mountPath": f"{SCRATCH_DIR}/outputs"},
        ]
        pod_spec["volumes"] = [
            {"name": "plinth-checkpoint", "emptyDir": {}},
            {"name": "plinth-outputs", "emptyDir": {}},
        ]
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if taints:
        pod_spec["tolerations"] = [
            {"key": t.key, "operator": "Equal", "value": t.value, "effect": t.effect}
            if t.value
            else {"key": t.key, "operator": "Exists", "effect": t.effect}
            for t in taints
        ]
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    labels = _labels(job)
    job_labels = dict(labels)
    spec: dict[str, Any] = {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": int(ttl_s),
        "completions": replicas,
        "parallelism": replicas,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if replicas > 1:
        spec["completionMode"] = "Indexed"
    max_run = job.spec.max_run_time_s or 0.0
    if max_run > 0:
        spec["activeDeadlineSeconds"] = max(1, math.ceil(max_run))
    if kueue is not None:
        spec["suspend"] = True
        job_labels[KUEUE_QUEUE_LABEL] = kueue.queue_name
        if kueue.priority_class:
            job_labels[KUEUE_PRIORITY_LABEL] = kueue.priority_class
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(job), "namespace": namespace, "labels": job_labels},
        "spec": spec,
    }


class KubernetesHandle:
    """A created attempt, followed by polling its Job, pods (and Workload)."""

    pid = 0  # no process id to record: the Job's name is derived from the job

    def __init__(self, executor: KubernetesExecutor, job: Job) -> None:
        self._executor = executor
        self._job = job
        self.name = job_name(job)

    async def wait(self) -> ExitStatus:
        """Polls until the attempt ended, copying its pods' logs meanwhile."""
        return await self._executor._follow(self._job, self.name)


@dataclasses.dataclass
class _Follow:
    """What a follower remembers between polls."""

    admitted: bool = False  # seen un-suspended (Kueue mode)
    stuck_since: float | None = None
    ending_since: float | None = None  # the Job ended or went, its pods not yet
    kueue_seen: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class _Observed:
    job: dict[str, Any] | None
    pods: list[dict[str, Any]]
    workload: dict[str, Any] | None = None
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class KubernetesExecutor(RoomExecutor):
    """Runs each attempt of a job as a Kubernetes Job in ``namespace``.

    Args:
        jobs_dir: the job folders (logs, checkpoints, outputs) on the scheduler's machine.
        capacity: what admission may hand out to this flavor.
        api_client: a ``kubernetes.client.ApiClient`` factory (called once, on first use, so a
            cluster that cannot be configured yet reads as unreachable, not as a crash).
        namespace: where the Jobs, pods and Secrets are.
        image: the flavor's image; a job may name its own in ``CONTAINER_IMAGE``.
        node_selector, taints: from the flavor (its labels and taints).
        kueue: the Kueue hand-off, or None (Plinth's admission only).
        ttl_s: ``ttlSecondsAfterFinished``.
        kill_grace_s: the pods' ``terminationGracePeriodSeconds``.
        pending_timeout_s: how long a pod may stay unschedulable, or its image unpullable,
            before the attempt ends (UNSCHEDULABLE / LAUNCH_FAILED).
        poll_s: how often a running attempt is read.
        lost_after_s: how long the API server may stay unreachable while an attempt runs before
            it is reported ``EXECUTOR_LOST``.
        request_timeout_s: one API call's limit.
        service_account: the pods' ServiceAccount ('' : the namespace's default).
        volume_claim: a PVC holding ``jobs_dir``, mounted in the pods at the same path.
    """

    def __init__(
        self,
        jobs_dir: Path,
        *,
        capacity: Resources,
        api_client: Any,
        namespace: str = "default",
        image: str = "",
        node_selector: Mapping[str, str] | None = None,
        taints: Sequence[Taint] = (),
        kueue: KueueOptions | None = None,
        ttl_s: int = 3600,
        kill_grace_s: float = 30.0,
        pending_timeout_s: float = 300.0,
        poll_s: float = 2.0,
        lost_after_s: float = 120.0,
        request_timeout_s: float = 30.0,
        service_account: str = "",
        volume_claim: str = "",
    ) -> None:
        super().__init__(jobs_dir, capacity=capacity)
        self._jobs_dir = jobs_dir
        self._api_factory = api_client
        self._api: Any = None
        self._api_lock = threading.Lock()
        self.namespace = namespace
        self._image = image
        self._node_selector = dict(node_selector or {})
        self._taints = tuple(taints)
        self._kueue = kueue
        self._ttl_s = ttl_s
        self._kill_grace_s = kill_grace_s
        self._pending_timeout_s = pending_timeout_s
        self._poll_s = poll_s
        self._lost_after_s = lost_after_s
        self._timeout = request_timeout_s
        self._service_account = service_account
        self._volume_claim = volume_claim
        self._stopping: set[str] = set()
        self._copy_locks: dict[str, threading.Lock] = {}

    @classmethod
    def from_flavor(
        cls, flavor: ResourceFlavor, jobs_dir: Path, *, capacity: Resources
    ) -> KubernetesExecutor:
        """Builds one from a flavor: its labels (node selector), taints (tolerations) and
        ``executor_options``: ``namespace``, ``image``; the cluster as ``host`` (an API server
        URL, with ``token_file`` and ``ca_file``), or ``kubeconfig``/``context``, else the
        in-cluster ServiceAccount; ``kueue`` ("true"), ``queue_name``, ``priority_class``;
        ``ttl_s``, ``kill_grace_s``, ``pending_timeout_s``, ``poll_s``, ``service_account``,
        ``volume_claim``. No credential is ever an option's value: files are named instead.

        Raises:
            InvalidArgument: a bad option.
        """
        options = dict(flavor.executor_options)
        field = f"flavors.{flavor.name}.executor_options"
        kueue = None
        if options.get("kueue", "").lower() in ("true", "1", "yes"):
            if not options.get("queue_name"):
                raise InvalidArgument(f"{field}.queue_name", "the Kueue hand-off needs a queue")
            kueue = KueueOptions(
                queue_name=options["queue_name"], priority_class=options.get("priority_class", "")
            )
        try:
            numbers = {
                key: float(options[key])
                for key in ("ttl_s", "kill_grace_s", "pending_timeout_s", "poll_s")
                if key in options
            }
        except ValueError as exc:
            raise InvalidArgument(field, f"not a number: {exc}") from exc
        host = options.get("host", "")
        if host and not host.startswith(("http://", "https://")):
            raise InvalidArgument(f"{field}.host", f"must be an http(s) URL, got {host!r}")
        return cls(
            jobs_dir,
            capacity=capacity,
            api_client=lambda: _api_client(options),
            namespace=options.get("namespace", "default"),
            image=options.get("image", ""),
            node_selector=flavor.labels,
            taints=flavor.taints,
            kueue=kueue,
            ttl_s=int(numbers.get("ttl_s", 3600)),
            kill_grace_s=numbers.get("kill_grace_s", 30.0),
            pending_timeout_s=numbers.get("pending_timeout_s", 300.0),
            poll_s=numbers.get("poll_s", 2.0),
            service_account=options.get("service_account", ""),
            volume_claim=options.get("volume_claim", ""),
        )

    # -- the contract (capacity, folders, log and outputs: RoomExecutor) ----------------------

    async def launch(self, job: Job, env: Mapping[str, str]) -> KubernetesHandle:
        """Creates attempt ``job.attempt``'s Secret and Job; finds the Job instead if it exists.

        Raises:
            Unavailable: the API server cannot be reached ("executor kubernetes unreachable: ...").
            KubernetesJobRejected: the API server refused the Job (its message).
        """
        name = job_name(job)
        if await asyncio.to_thread(self._read_job, name) is not None:
            log.info("kubernetes job %s already created; following it", name)
            return KubernetesHandle(self, job)
        image = job.spec.env.get(JOB_IMAGE_ENV) or self._image
        if not image:
            raise KubernetesJobRejected(
                f"job {job.id}: no image (the flavor names none and the job sets no "
                f"{JOB_IMAGE_ENV})"
            )
        attempt = attempt_of(job)
        checkpoint = await asyncio.to_thread(self._room.fresh_attempt, job.id, attempt)
        await asyncio.to_thread(self._room.write_text, job.id, f"k8s-a{attempt}.copied", "{}\n")
        plain = {k: v for k, v in env.items() if k not in CREDENTIAL_ENV}
        secret = {k: v for k, v in env.items() if k in CREDENTIAL_ENV and v}
        if not self._volume_claim:  # the pod cannot see the scheduler's folders
            checkpoint = f"{SCRATCH_DIR}/checkpoint"
            outputs = f"{SCRATCH_DIR}/outputs/outputs.json"
        else:
            outputs = str(self._room.outputs_path(job.id))
        plain.update(attempt_env(job, outputs=outputs, checkpoint=checkpoint))
        manifest = job_manifest(
            job,
            plain,
            namespace=self.namespace,
            image=image,
            node_selector=self._node_selector,
            taints=self._taints,
            secret_keys=secret,
            kueue=self._kueue,
            ttl_s=self._ttl_s,
            kill_grace_s=self._kill_grace_s,
            service_account=self._service_account,
            volume_claim=self._volume_claim,
            jobs_dir=str(self._jobs_dir),
        )
        await asyncio.to_thread(self._create, job, manifest, secret)
        return KubernetesHandle(self, job)

    async def reattach(self, job: Job) -> KubernetesHandle | None:
        """The current attempt's Job, by its name; None if the cluster does not know it.

        Raises:
            Unavailable: the API server cannot be reached (the caller should try again).
        """
        if await asyncio.to_thread(self._read_job, job_name(job)) is None:
            return None
        return KubernetesHandle(self, job)

    async def terminate(self, job: Job, *, grace_s: float | None = None) -> None:
        """Deletes the attempt's Job (Background propagation): its pods get SIGTERM, then SIGKILL
        after their grace period. Returns at once."""
        name = job_name(job)
        self._stopping.add(name)
        grace = self._kill_grace_s if grace_s is None else max(0.0, grace_s)
        await asyncio.to_thread(self._delete_job, name, grace)

    async def aclose(self) -> None:
        """Closes the API client's connection pool."""
        api, self._api = self._api, None
        if api is not None:
            await asyncio.to_thread(api.close)

    # -- following an attempt -----------------------------------------------------------------

    async def _follow(self, job: Job, name: str) -> ExitStatus:
        state = _Follow()
        unreachable_since: float | None = None
        while True:
            try:
                observed = await asyncio.to_thread(self._observe, job, name)
            except Unavailable as exc:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self._lost_after_s:
                    return _lost(f"{exc.message} for {self._lost_after_s:g} s")
                await asyncio.sleep(self._poll_s)
                continue
            unreachable_since = None
            status = await asyncio.to_thread(self._judge, job, name, observed, state)
            if status is not None:
                self._stopping.discard(name)
                self._copy_locks.pop(name, None)
                return status
            await asyncio.sleep(self._poll_s)

    def _observe(self, job: Job, name: str) -> _Observed:
        """One poll (in a worker thread): the Job, its pods, its Workload; logs copied."""
        observed = _Observed(job=self._read_job(name), pods=self._pods(job))
        if self._kueue is not None and observed.job is not None:
            observed.workload = self._workload(observed.job)
        if observed.job is not None and not observed.pods:
            observed.events = self._events(name)
        self._copy_logs(job, observed.pods, final=False)
        return observed

    def _judge(self, job: Job, name: str, seen: _Observed, state: _Follow) -> ExitStatus | None:
        """The attempt's ending, or None while it goes on (in a worker thread: it may delete)."""
        if seen.workload is not None:
            self._note_kueue(job, seen.workload, state)
        if seen.job is None:
            if self._pods_ending(seen, state):
                return None  # deleted: wait for its pods to end (their last log lines)
            self._copy_logs(job, seen.pods, final=True)
            if name in self._stopping:
                return ExitStatus(exit_code=-1, signal=15, reason="")
            return _lost(f"kubernetes job {name} was deleted outside Plinth")
        metadata = seen.job.get("metadata") or {}
        spec, status = seen.job.get("spec") or {}, seen.job.get("status") or {}
        finished = _condition(status, "Complete") or _condition(status, "Failed")
        if finished is not None:
            if self._pods_ending(seen, state):
                return None  # the Job controller still stops the gang's other pods
            self._copy_logs(job, seen.pods, final=True)
            return _ended(finished, seen.pods, spec)
        if metadata.get("deletionTimestamp"):
            return None
        if self._kueue is not None:
            if not spec.get("suspend"):
                state.admitted = True
            evicted = _condition((seen.workload or {}).get("status") or {}, "Evicted")
            if evicted is not None or (state.admitted and spec.get("suspend")):
                return self._preempted(job, name, seen, evicted)
            if spec.get("suspend"):
                return None  # waiting in Kueue's queue: no pod yet, nothing stuck
        return self._pending(job, name, seen, state)

    def _pods_ending(self, seen: _Observed, state: _Follow) -> bool:
        """True while pods of an ended (or deleted) Job still run, for at most their grace
        period and a minute (a pod on a lost node never reports its end)."""
        if not any(_pod_active(p) for p in seen.pods):
            return False
        now = time.monotonic()
        state.ending_since = state.ending_since or now
        return now - state.ending_since < self._kill_grace_s + 60.0

    def _pending(self, job: Job, name: str, seen: _Observed, state: _Follow) -> ExitStatus | None:
        """An attempt whose pods cannot start: at once for a bad image, else after patience."""
        stuck: tuple[EndReason, str] | None = None
        for pod in seen.pods:
            why = _stuck(pod)
            if why is None:
                continue
            reason, kind, message = why
            if reason in _BAD_IMAGE:
                return self._give_up(job, name, EndReason.LAUNCH_FAILED, message)
            stuck = (kind, message)
        if stuck is None and not seen.pods:
            failed = [e for e in seen.events if e.get("reason") == "FailedCreate"]
            if failed:
                stuck = (EndReason.LAUNCH_FAILED, _short(str(failed[-1].get("message", ""))))
        if stuck is None:
            state.stuck_since = None
            return None
        now = time.monotonic()
        state.stuck_since = state.stuck_since or now
        if now - state.stuck_since < self._pending_timeout_s:
            return None
        kind, message = stuck
        return self._give_up(job, name, kind, f"{message} (for {self._pending_timeout_s:g} s)")

    def _give_up(self, job: Job, name: str, kind: EndReason, message: str) -> ExitStatus:
        log.info("kubernetes job %s: %s; deleting it", name, message)
        with contextlib.suppress(Unavailable):
            self._delete_job(name, 0.0)
        self._copy_logs(job, self._safe_pods(job), final=True)
        return ExitStatus(exit_code=-1, reason=f"kubernetes: {message}", end_reason=kind)

    def _preempted(
        self, job: Job, name: str, seen: _Observed, evicted: dict[str, Any] | None
    ) -> ExitStatus:
        why = "evicted by Kueue"
        if evicted is not None:
            why += f" ({evicted.get('reason', '')}): {_short(str(evicted.get('message', '')))}"
        self._copy_logs(job, seen.pods, final=True)
        # Kueue would requeue the suspended Job itself; Plinth requeues the job instead.
        with contextlib.suppress(Unavailable):
            self._delete_job(name, self._kill_grace_s)
        return ExitStatus(exit_code=-1, reason=f"kueue: {why}", end_reason=EndReason.PREEMPTED)

    def _note_kueue(self, job: Job, workload: dict[str, Any], state: _Follow) -> None:
        """Writes each new Workload condition into the job's log (what a user waiting sees)."""
        for cond in (workload.get("status") or {}).get("conditions") or []:
            key = f"{cond.get('type')}={cond.get('status')}:{cond.get('reason', '')}"
            if key in state.kueue_seen or cond.get("type") not in (
                "QuotaReserved",
                "Admitted",
                "Evicted",
                "Finished",
            ):
                continue
            state.kueue_seen.add(key)
            message = _short(str(cond.get("message", "")))
            line = f"[plinth] kueue: {cond.get('type')}={cond.get('status')}"
            line += f" ({cond.get('reason', '')}): {message}\n" if message else "\n"
            self._room.append_log(job.id, line.encode())

    # -- logs and outputs ---------------------------------------------------------------------

    def _copy_logs(self, job: Job, pods: list[dict[str, Any]], *, final: bool) -> None:
        """Appends what each pod wrote since the last copy: whole lines while it runs, the rest
        once it has ended (or ``final``); a pod copied to its end is not read again."""
        lock = self._copy_locks.setdefault(job_name(job), threading.Lock())
        with lock:
            name = f"k8s-a{attempt_of(job)}.copied"
            try:
                state = json.loads(self._room.read_text(job.id, name) or "{}")
            except ValueError:
                state = {}
            copied: dict[str, int] = dict(state.get("copied") or {})
            ended: set[str] = set(state.get("ended") or [])
            changed = False
            for pod in sorted(pods, key=_pod_index):
                pod_name = (pod.get("metadata") or {}).get("name", "")
                if not pod_name or pod_name in ended or not _pod_started(pod):
                    continue
                whole = final or _pod_ended(pod)
                try:
                    data = self._pod_log(pod_name)
                except Unavailable:
                    continue
                done = copied.get(pod_name, 0)
                new = data[done:]
                if not whole:
                    new = new[: new.rfind(b"\n") + 1]
                if whole:
                    ended.add(pod_name)
                    changed = True
                if not new:
                    continue
                self._room.append_log(job.id, new)
                copied[pod_name] = done + len(new)
                changed = True
            if changed:
                text = json.dumps({"copied": copied, "ended": sorted(ended)})
                self._room.write_text(job.id, name, text + "\n")

    # -- API calls (worker threads) -----------------------------------------------------------

    def _client(self) -> Any:
        with self._api_lock:
            if self._api is None:
                try:
                    self._api = self._api_factory()
                except Exception as exc:  # any configuration failure
                    raise _unreachable(f"cannot configure the client: {exc}") from exc
            return self._api

    def _call(self, api: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One API call, its JSON body decoded; ApiException passed up for the caller to judge.

        Raises:
            Unavailable: the server cannot be reached, answers 5xx, or refuses Plinth (401/403).
        """
        apis = {"batch": k8s.BatchV1Api, "core": k8s.CoreV1Api, "custom": k8s.CustomObjectsApi}
        target = apis[api](self._client())
        try:
            response = getattr(target, method)(
                *args, _preload_content=False, _request_timeout=self._timeout, **kwargs
            )
        except ApiException as exc:
            if exc.status in (401, 403):
                raise _unreachable(
                    f"the API server refused Plinth (HTTP {exc.status}): {_api_message(exc)}"
                ) from exc
            if exc.status == 0 or exc.status >= 500:
                raise _unreachable(f"HTTP {exc.status}: {_api_message(exc)}") from exc
            raise
        except (HTTPError, OSError) as exc:
            raise _unreachable(_cause(exc)) from exc
        data = response.data
        if method == "read_namespaced_pod_log":
            return data
        return json.loads(data) if data else {}

    def _read_job(self, name: str) -> dict[str, Any] | None:
        try:
            job = self._call("batch", "read_namespaced_job", name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _unreachable(f"HTTP {exc.status}: {_api_message(exc)}") from exc
        return job if isinstance(job, dict) else None

    def _pods(self, job: Job) -> list[dict[str, Any]]:
        selector = f"{LABEL_JOB_ID}={job.id},{LABEL_ATTEMPT}={attempt_of(job)}"
        try:
            body = self._call(
                "core", "list_namespaced_pod", self.namespace, label_selector=selector
            )
        except ApiException as exc:
            raise _unreachable(f"HTTP {exc.status}: {_api_message(exc)}") from exc
        return list(body.get("items") or [])

    def _safe_pods(self, job: Job) -> list[dict[str, Any]]:
        try:
            return self._pods(job)
        except Unavailable:
            return []

    def _pod_log(self, pod: str) -> bytes:
        try:
            data = self._call(
                "core", "read_namespaced_pod_log", pod, self.namespace, container=_CONTAINER
            )
        except ApiException as exc:
            raise _unreachable(f"HTTP {exc.status}: {_api_message(exc)}") from exc
        return data if isinstance(data, bytes) else str(data).encode()

    def _events(self, name: str) -> list[dict[str, Any]]:
        try:
            body = self._call(
                "core",
                "list_namespaced_event",
                self.namespace,
                field_selector=f"involvedObject.name={name}",
            )
        except (ApiException, Unavailable):
            return []  # events help explain; their absence changes nothing
        items = body.get("items") or []
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]

    def _workload(self, job_obj: dict[str, Any]) -> dict[str, Any] | None:
        """Kueue's Workload owned by the Job (found by Kueue's job-uid label and the owner)."""
        uid = (job_obj.get("metadata") or {}).get("uid", "")
        if not uid:
            return None
        try:
            body = self._call(
                "custom",
                "list_namespaced_custom_object",
                *_KUEUE[:2],
                self.namespace,
                _KUEUE[2],
                label_selector=f"{KUEUE_JOB_UID_LABEL}={uid}",
            )
        except ApiException as exc:
            if exc.status == 404:  # Kueue is not installed (its CRD is missing)
                return None
            raise _unreachable(f"HTTP {exc.status}: {_api_message(exc)}") from exc
        for item in body.get("items") or []:
            owners = (item.get("metadata") or {}).get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                return dict(item)
        return None

    def _create(self, job: Job, manifest: dict[str, Any], secret: Mapping[str, str]) -> None:
        """The Secret (if any), then the Job, then the Secret made the Job's (garbage-collected
        with it)."""
        if secret:
            body = secret_manifest(job, namespace=self.namespace, data=secret)
            try:
                self._call("core", "create_namespaced_secret", self.namespace, body)
            except ApiException as exc:
                if exc.status != 409:  # 409: a launch repeated after a crash made it already
                    raise KubernetesJobRejected(
                        f"kubernetes refused the credentials Secret of job {job.id}: "
                        f"{_api_message(exc)}"
                    ) from exc
        try:
            created = self._call("batch", "create_namespaced_job", self.namespace, manifest)
        except ApiException as exc:
            if exc.status == 409:
                return  # created by a concurrent or repeated launch: follow that one
            if secret:
                with contextlib.suppress(ApiException, Unavailable):
                    self._call(
                        "core", "delete_namespaced_secret", _secret_name(job), self.namespace
                    )
            raise KubernetesJobRejected(
                f"kubernetes refused job {job.id}: {_api_message(exc)}"
            ) from exc
        uid = (created.get("metadata") or {}).get("uid")
        if secret and uid:
            owner = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": job_name(job),
                "uid": uid,
                "blockOwnerDeletion": False,
            }
            try:
                self._call(
                    "core",
                    "patch_namespaced_secret",
                    _secret_name(job),
                    self.namespace,
                    {"metadata": {"ownerReferences": [owner]}},
                )
            except (ApiException, Unavailable) as exc:
                log.warning("secret of %s not owned by its Job (left behind): %s", job.id, exc)

    def _delete_job(self, name: str, grace_s: float) -> None:
        try:
            self._call(
                "batch",
                "delete_namespaced_job",
                name,
                self.namespace,
                propagation_policy="Background",
                grace_period_seconds=max(0, math.ceil(grace_s)),
            )
        except ApiException as exc:
            if exc.status != 404:
                log.warning("kubernetes refused to delete %s: %s", name, _api_message(exc))


def _api_client(options: Mapping[str, str]) -> Any:
    """A configured ``ApiClient``: by ``host`` (+ ``token_file``, ``ca_file``), a kubeconfig, or
    the in-cluster ServiceAccount."""
    configuration = k8s.Configuration()
    if options.get("host"):
        configuration.host = options["host"].rstrip("/")
        if options.get("token_file"):
            token = Path(options["token_file"]).read_text().strip()
            configuration.api_key = {"authorization": token}
            configuration.api_key_prefix = {"authorization": "Bearer"}
        if options.get("ca_file"):
            configuration.ssl_ca_cert = options["ca_file"]
    elif options.get("kubeconfig") or options.get("context"):
        k8s_config.load_kube_config(
            config_file=options.get("kubeconfig") or None,
            context=options.get("context") or None,
            client_configuration=configuration,
        )
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)
    # One retry, not urllib3's three: a follower polls again anyway, and tolerates an API
    # server that stays away for lost_after_s; three retries per call only multiply warnings.
    configuration.retries = 1
    return k8s.ApiClient(configuration)


def _unreachable(cause: str) -> Unavailable:
    return Unavailable(f"executor kubernetes unreachable: {cause}", dependency="kubernetes")


def _cause(exc: BaseException) -> str:
    # urllib3's MaxRetryError wraps the real cause (connection refused, a timeout).
    reason = getattr(exc, "reason", None)
    text = str(reason or exc) or type(exc).__name__
    return _short(text)


def _short(text: str) -> str:
    return " ".join(text.split())[:_MESSAGE_CHARS]


def _api_message(exc: ApiException) -> str:
    """The API server's ``Status.message``, else its reason."""
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict) and body.get("message"):
            return _short(str(body["message"]))
    except (ValueError, TypeError):
        pass
    return _short(str(exc.reason or f"HTTP {exc.status}"))


def _condition(status: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def _containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list((pod.get("status") or {}).get("containerStatuses") or [])


def _pod_started(pod: Mapping[str, Any]) -> bool:
    return any(
        "running" in (c.get("state") or {}) or "terminated" in (c.get("state") or {})
        for c in _containers(pod)
    )


def _pod_ended(pod: Mapping[str, Any]) -> bool:
    """Every container terminated (its log is complete)."""
    containers = _containers(pod)
    return bool(containers) and all("terminated" in (c.get("state") or {}) for c in containers)


def _pod_active(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Pending", "Running")


def _pod_index(pod: Mapping[str, Any]) -> int:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(annotations.get("batch.kubernetes.io/job-completion-index", 0))
    except ValueError:
        return 0


def _stuck(pod: Mapping[str, Any]) -> tuple[str, EndReason, str] | None:
    """Why a pending pod cannot start (its reason, the end reason it would be, the message)."""
    status = pod.get("status") or {}
    name = (pod.get("metadata") or {}).get("name", "")
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            message = _short(str(cond.get("message", "")))
            return "Unschedulable", EndReason.UNSCHEDULABLE, f"pod {name} unschedulable: {message}"
    for container in _containers(pod):
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        if reason in _BAD_IMAGE or reason in _STUCK_WAITING:
            message = _short(str(waiting.get("message", "")))
            return reason, EndReason.LAUNCH_FAILED, f"pod {name} {reason}: {message}"
    return None


def _lost(why: str) -> ExitStatus:
    return ExitStatus(exit_code=-1, reason=why, end_reason=EndReason.EXECUTOR_LOST)


def _ended(
    finished: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]
) -> ExitStatus:
    """A finished Job's ending, as told by its condition and its pods."""
    if finished.get("type") == "Complete":
        return ExitStatus(exit_code=0)
    reason = finished.get("reason", "")
    if reason == "DeadlineExceeded":
        deadline = spec.get("activeDeadlineSeconds")
        return ExitStatus(
            exit_code=-1,
            reason=f"kubernetes: job ran past its activeDeadlineSeconds ({deadline} s)",
            end_reason=EndReason.RUN_TIME_EXCEEDED,
        )
    # The failed pod says why: the first one that failed (a gang's others were then stopped).
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=_finished_at)
    for pod in failed:
        status = pod.get("status") or {}
        name = (pod.get("metadata") or {}).get("name", "")
        if status.get("reason") == "Evicted":
            return ExitStatus(
                exit_code=-1,
                reason=f"kubernetes: pod {name} evicted: {_short(str(status.get('message', '')))}",
                end_reason=EndReason.EVICTED,
            )
        if status.get("reason") == "DeadlineExceeded":
            return ExitStatus(
                exit_code=-1,
                reason=f"kubernetes: pod {name} ran past its deadline",
                end_reason=EndReason.RUN_TIME_EXCEEDED,
            )
        for container in _containers(pod):
            terminated = (container.get("state") or {}).get("terminated")
            if not terminated:
                continue
            code = int(terminated.get("exitCode", 0) or 0)
            if code == 0:
                continue
            signal = code - 128 if 128 < code < 160 else 0
            if terminated.get("reason") == "OOMKilled":
                return ExitStatus(
                    exit_code=-1,
                    signal=signal or 9,
                    reason=f"kubernetes: container of pod {name} OOMKilled",
                    end_reason=EndReason.OOM_KILLED,
                )
            return ExitStatus(exit_code=-1 if signal else code, signal=signal)
    message = _short(str(finished.get("message", "")))
    return _lost(f"kubernetes: job failed ({reason}): {message} (its pods are gone)")


def _finished_at(pod: Mapping[str, Any]) -> str:
    times = [
        ((c.get("state") or {}).get("terminated") or {}).get("finishedAt") or ""
        for c in _containers(pod)
    ]
    return min((t for t in times if t), default="~")
