"""The Kubernetes executor against an HTTP server that speaks the Kubernetes API.

No API server can run here (no container runtime, no registry ships one). ``kmock``'s
``KubernetesEmulator`` (the mock server Kopf is tested with) keeps objects in memory and serves
create/get/list/patch/delete over real HTTP; the executor's real ``kubernetes`` client calls it.
The test plays the parts nobody runs here: the Job controller and the kubelet (it creates the
pods, moves them through Running, OOMKilled, Evicted, Succeeded, Unschedulable, writes their
logs) and Kueue (it makes the Workload, admits the Job by un-suspending it, evicts it).

``_Cluster`` below adds to kmock what a real API server does and it does not: equality label
selectors on lists, uids on create, and pod logs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
from kubernetes import client as k8s

from plinth_common.errors import Unavailable
from plinth_common.net import free_tcp_port
from services.scheduler.domain import EndReason, ExitStatus, Job, JobSpec, JobState, Resources
from services.scheduler.executors.kubernetes import (
    KubernetesExecutor,
    KubernetesJobRejected,
    KueueOptions,
    _api_client,
)

pytestmark = pytest.mark.timeout(60)
NS = "plinth-jobs"
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "team-vision", "MLFLOW_TRACKING_PASSWORD": "s3cret-pw"}
ENV = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "PLINTH_JOB_ID": "x", **CREDENTIALS}


class _Cluster(kmock.KubernetesEmulator):
    """kmock plus equality label selectors, uids, pod logs, and a Job refusal to script."""

    logs: dict[str, bytes]
    refuse_jobs: str = ""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.logs = {}

    async def _handle(self, request: Any) -> Any:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            resource = request.resource
            if self.refuse_jobs and resource is not None and resource.plural == "jobs":
                raise kmock.KubernetesError(status=422, reason="Invalid", message=self.refuse_jobs)
            request.data.setdefault("metadata", {}).setdefault("uid", str(uuid.uuid4()))
        return await super()._handle(request)

    async def _serve_fetch(self, request: Any) -> Any:
        if request.subresource == "log":
            return self.logs.get(request.name, b"")
        return await super()._serve_fetch(request)

    async def _serve_list(self, request: Any) -> Any:
        body: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector", "")
        wanted = dict(term.split("=", 1) for term in selector.split(",") if "=" in term)
        body["items"] = [
            item
            for item in body["items"]
            if all(
                (item.get("metadata", {}).get("labels") or {}).get(k) == v
                for k, v in wanted.items()
            )
        ]
        return body


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[tuple[_Cluster, str]]:
    async with _Cluster() as server, kmock.Server(server) as http:
        server.resources["batch/v1/jobs"] = kmock.ResourceInfo(kind="Job", namespaced=True)
        server.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
        server.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True)
        server.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True)
        server.resources["kueue.x-k8s.io/v1beta1/workloads"] = kmock.ResourceInfo(
            kind="Workload", namespaced=True
        )
        yield server, str(http.url).rstrip("/")


def _api(url: str) -> k8s.ApiClient:
    configuration = k8s.Configuration()
    configuration.host = url
    return k8s.ApiClient(configuration)


def _executor(url: str, jobs_dir: Path, **kwargs: Any) -> KubernetesExecutor:
    return KubernetesExecutor(
        jobs_dir,
        capacity=Resources(cpu=8, memory_bytes=32 * 1024**3, gpu=2),
        api_client=lambda: _api_client({"host": url}),
        namespace=NS,
        image="registry.example/train:1",
        poll_s=0.05,
        lost_after_s=2.0,
        **kwargs,
    )


def _job(executor: KubernetesExecutor, job_id: str, **spec: Any) -> Job:
    work = executor.prepare(job_id)
    return Job(
        id=job_id,
        spec=JobSpec(
            name="train",
            team="vision",
            entrypoint=("python", "train.py"),
            working_dir=work,
            resources=Resources(cpu=1, memory_bytes=1024**3),
            **spec,
        ),
        state=JobState.ADMITTED,
        created_at=datetime.now(UTC),
    )


class _Kubelet:
    """The test's Job controller, kubelet and Kueue: real HTTP calls through the client."""

    def __init__(self, url: str) -> None:
        api = _api(url)
        self.core, self.batch = k8s.CoreV1Api(api), k8s.BatchV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def job(self, name: str) -> dict[str, Any] | None:
        try:
            response = await self._run(
                self.batch.read_namespaced_job, name, NS, _preload_content=False
            )
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(json.loads(response.data))

    async def start_pod(self, job: dict[str, Any], index: int = 0, *, running: bool = True) -> str:
        name = f"{job['metadata']['name']}-{index}-x7k2p"
        labels = dict(job["spec"]["template"]["metadata"]["labels"])
        state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        status: dict[str, Any] = {"phase": "Running" if running else "Pending"}
        if running:
            status["containerStatuses"] = [_container(state)]
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NS,
                "labels": labels,
                "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
            },
            "status": status,
        }
        await self._run(self.core.create_namespaced_pod, NS, body)
        return name

    async def pod_status(self, name: str, status: dict[str, Any]) -> None:
        await self._run(self.core.patch_namespaced_pod_status, name, NS, {"status": status})

    async def end_pod(
        self, name: str, code: int, reason: str, *, at: str = "2026-01-01T00:01:00Z"
    ) -> None:
        terminated = {"exitCode": code, "reason": reason, "finishedAt": at}
        await self.pod_status(
            name,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [_container({"terminated": terminated})],
            },
        )

    async def job_condition(self, name: str, kind: str, reason: str = "") -> None:
        condition = {"type": kind, "status": "True", "reason": reason, "message": reason}
        await self._run(
            self.batch.patch_namespaced_job_status,
            name,
            NS,
            {"status": {"conditions": [condition]}},
        )


def _container(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "job",
        "image": "registry.example/train:1",
        "imageID": "",
        "ready": "running" in state,
        "restartCount": 0,
        "state": state,
    }


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def _requests(server: _Cluster, method: str, plural: str) -> list[Any]:
    return [
        r
        for r in list(server)
        if str(r.method).upper().endswith(method)
        and r.resource is not None
        and r.resource.plural == plural
        and not r.subresource
    ]


async def test_a_job_runs_its_log_is_kept_and_a_restarted_scheduler_reattaches(
    cluster: tuple[_Cluster, str], tmp_path: Path
) -> None:
    server, url = cluster
    kubelet = _Kubelet(url)
    executor = _executor(url, tmp_path)
    job = _job(executor, "j-run")
    handle = await executor.launch(job, ENV)
    created = await kubelet.job("plinth-j-run-a1")
    assert created is not None and created["spec"]["backoffLimit"] == 0
    # Credentials only in the Secret, which the Job owns; the Job carries references.
    assert "s3cret-pw" not in json.dumps(created)
    secret = server.objects[kmock.resource("", "v1", "secrets"), NS, "plinth-j-run-a1-mlflow"]
    assert secret["stringData"] == CREDENTIALS
    assert secret["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]

    first = asyncio.create_task(handle.wait())
    pod = await kubelet.start_pod(created)
    server.logs[pod] = b"epoch 1\nepoch 2 (half a li"
    await _until(lambda: _has(executor, job, b"epoch 1\n"))
    first.cancel()  # the scheduler dies here

    restarted = _executor(url, tmp_path)
    again = await restarted.launch(job, ENV)  # a launch repeated after a crash: no second Job
    assert len(_requests(server, "POST", "jobs")) == 1
    follow = asyncio.create_task(again.wait())
    server.logs[pod] = b"epoch 1\nepoch 2 (half a line)\ndone"
    await kubelet.end_pod(pod, 0, "Completed")
    await kubelet.job_condition("plinth-j-run-a1", "Complete")
    status = await asyncio.wait_for(follow, 10)
    assert status.succeeded, status
    # Each line exactly once, the last one without its newline too.
    assert await restarted.read_log(job.id, 0) == b"epoch 1\nepoch 2 (half a line)\ndone"
    # The cluster forgets the Job and its pods (TTL): the log stays in Plinth.
    await kubelet._run(kubelet.batch.delete_namespaced_job, "plinth-j-run-a1", NS)
    await kubelet._run(kubelet.core.delete_namespaced_pod, pod, NS)
    assert await restarted.reattach(job) is None
    assert (await restarted.read_log(job.id, 0)).endswith(b"done")
    await executor.aclose()
    await restarted.aclose()


async def _has(executor: KubernetesExecutor, job: Job, data: bytes) -> bool:
    return data in await executor.read_log(job.id, 0)


async def _run_to_end(
    url: str,
    tmp_path: Path,
    job_id: str,
    ending: Callable[[_Kubelet, str, str], Awaitable[None]],
    **kwargs: Any,
) -> tuple[ExitStatus, _Kubelet, KubernetesExecutor]:
    kubelet = _Kubelet(url)
    executor = _executor(url, tmp_path, **kwargs)
    job = _job(executor, job_id)
    handle = await executor.launch(job, ENV)
    name = f"plinth-{job_id}-a1"
    created = await kubelet.job(name)
    assert created is not None
    waiting = asyncio.create_task(handle.wait())
    pod = await kubelet.start_pod(created, running="pending" not in job_id)
    await ending(kubelet, name, pod)
    status = await asyncio.wait_for(waiting, 10)
    await executor.aclose()
    return status, kubelet, executor


async def _oom(kubelet: _Kubelet, name: str, pod: str) -> None:
    await kubelet.end_pod(pod, 137, "OOMKilled")
    await kubelet.job_condition(name, "Failed", "BackoffLimitExceeded")


async def _evicted(kubelet: _Kubelet, name: str, pod: str) -> None:
    message = "The node was low on resource: memory."
    await kubelet.pod_status(pod, {"phase": "Failed", "reason": "Evicted", "message": message})
    await kubelet.job_condition(name, "Failed", "BackoffLimitExceeded")


async def _exit_3(kubelet: _Kubelet, name: str, pod: str) -> None:
    await kubelet.end_pod(pod, 3, "Error")
    await kubelet.job_condition(name, "Failed", "BackoffLimitExceeded")


async def _deadline(kubelet: _Kubelet, name: str, pod: str) -> None:
    await kubelet.end_pod(pod, 143, "Error")
    await kubelet.job_condition(name, "Failed", "DeadlineExceeded")


@pytest.mark.parametrize(
    ("ending", "end_reason", "exit_code", "signal"),
    [
        (_oom, EndReason.OOM_KILLED, -1, 9),
        (_evicted, EndReason.EVICTED, -1, 0),
        (_exit_3, EndReason.EXITED, 3, 0),
        (_deadline, EndReason.RUN_TIME_EXCEEDED, -1, 0),
    ],
)
async def test_pod_endings_are_reported_with_their_reason(
    cluster: tuple[_Cluster, str],
    tmp_path: Path,
    ending: Callable[[_Kubelet, str, str], Awaitable[None]],
    end_reason: EndReason,
    exit_code: int,
    signal: int,
) -> None:
    _, url = cluster
    status, _, _ = await _run_to_end(url, tmp_path, "j-end", ending)
    assert (status.end_reason, status.exit_code, status.signal) == (end_reason, exit_code, signal)
    assert not status.succeeded


async def test_a_gang_reports_its_first_failure_once_every_pod_has_ended(
    cluster: tuple[_Cluster, str], tmp_path: Path
) -> None:
    server, url = cluster
    kubelet = _Kubelet(url)
    executor = _executor(url, tmp_path)
    job = _job(executor, "j-gang", replicas=2)
    handle = await executor.launch(job, ENV)
    created = await kubelet.job("plinth-j-gang-a1")
    assert created is not None and created["spec"]["completionMode"] == "Indexed"
    pods = [await kubelet.start_pod(created, index) for index in (0, 1)]
    waiting = asyncio.create_task(handle.wait())
    server.logs[pods[0]] = b"rank 0 step 1\n"
    server.logs[pods[1]] = b"rank 1 step 1\n"
    # Rank 1 runs out of memory; the Job fails; the controller then stops rank 0.
    await kubelet.end_pod(pods[1], 137, "OOMKilled", at="2026-01-01T00:01:00Z")
    await kubelet.job_condition("plinth-j-gang-a1", "Failed", "BackoffLimitExceeded")
    await asyncio.sleep(0.3)
    assert not waiting.done()  # rank 0 still runs: the gang has not ended yet
    await kubelet.end_pod(pods[0], 143, "Error", at="2026-01-01T00:01:05Z")
    status = await asyncio.wait_for(waiting, 10)
    assert status.end_reason is EndReason.OOM_KILLED
    assert pods[1] in status.reason
    log_text = await executor.read_log(job.id, 0)
    assert sorted(log_text.splitlines()) == [b"rank 0 step 1", b"rank 1 step 1"]
    await executor.aclose()


UNSCHEDULABLE = {
    "phase": "Pending",
    "conditions": [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ],
}
BAD_IMAGE = {
    "phase": "Pending",
    "containerStatuses": [
        _container(
            {
                "waiting": {
                    "reason": "InvalidImageName",
                    "message": 'couldn\'t parse image name "Train:latest": invalid reference format',
                }
            }
        )
    ],
}


@pytest.mark.parametrize(
    ("pod_status", "patience_s", "end_reason", "message"),
    [
        (UNSCHEDULABLE, 0.3, EndReason.UNSCHEDULABLE, "3 Insufficient nvidia.com/gpu"),
        # No patience for an image name that can never be pulled: it fails at once.
        (BAD_IMAGE, 60.0, EndReason.LAUNCH_FAILED, "invalid reference format"),
    ],
)
async def test_a_pod_that_cannot_start_ends_the_attempt_and_its_job(
    cluster: tuple[_Cluster, str],
    tmp_path: Path,
    pod_status: dict[str, Any],
    patience_s: float,
    end_reason: EndReason,
    message: str,
) -> None:
    _, url = cluster

    async def pending(kubelet: _Kubelet, name: str, pod: str) -> None:
        await kubelet.pod_status(pod, pod_status)

    status, kubelet, _ = await _run_to_end(
        url, tmp_path, "j-pending", pending, pending_timeout_s=patience_s
    )
    assert status.end_reason is end_reason
    assert message in status.reason
    assert await kubelet.job("plinth-j-pending-a1") is None  # deleted, not left pending


async def test_cancel_deletes_the_job_in_the_background_and_ends_when_its_pod_does(
    cluster: tuple[_Cluster, str], tmp_path: Path
) -> None:
    server, url = cluster
    kubelet = _Kubelet(url)
    executor = _executor(url, tmp_path)
    job = _job(executor, "j-cancel")
    handle = await executor.launch(job, ENV)
    created = await kubelet.job("plinth-j-cancel-a1")
    assert created is not None
    pod = await kubelet.start_pod(created)
    waiting = asyncio.create_task(handle.wait())
    await executor.terminate(job, grace_s=7)
    delete = _requests(server, "DELETE", "jobs")
    assert [
        (r.params.get("propagationPolicy"), r.params.get("gracePeriodSeconds")) for r in delete
    ] == [("Background", "7")]
    await asyncio.sleep(0.3)
    assert not waiting.done()  # the Job is gone, its pod still runs its grace period
    server.logs[pod] = b"got SIGTERM, saving a checkpoint\n"
    await kubelet.end_pod(pod, 143, "Error")
    status = await asyncio.wait_for(waiting, 10)
    assert status.signal == 15 and not status.succeeded
    assert await executor.read_log(job.id, 0) == b"got SIGTERM, saving a checkpoint\n"
    await executor.aclose()


async def test_kueue_admits_the_suspended_job_and_its_eviction_is_a_preemption(
    cluster: tuple[_Cluster, str], tmp_path: Path
) -> None:
    server, url = cluster
    kubelet = _Kubelet(url)
    executor = _executor(
        url, tmp_path, kueue=KueueOptions(queue_name="vision", priority_class="high")
    )
    job = _job(executor, "j-kueue")
    handle = await executor.launch(job, ENV)
    name = "plinth-j-kueue-a1"
    created = await kubelet.job(name)
    assert created is not None and created["spec"]["suspend"] is True
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "vision"
    waiting = asyncio.create_task(handle.wait())

    # Kueue: a Workload owned by the Job, quota reserved and admitted, the Job un-suspended.
    uid = created["metadata"]["uid"]
    workload: dict[str, Any] = {
        "apiVersion": "kueue.x-k8s.io/v1beta1",
        "kind": "Workload",
        "metadata": {
            "name": f"job-{name}-1a2b3",
            "namespace": NS,
            "labels": {"kueue.x-k8s.io/job-uid": uid},
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid}
            ],
        },
        "spec": {"queueName": "vision"},
    }
    await kubelet._run(
        kubelet.custom.create_namespaced_custom_object,
        "kueue.x-k8s.io",
        "v1beta1",
        NS,
        "workloads",
        workload,
    )
    await asyncio.sleep(0.2)
    assert not waiting.done()  # suspended in Kueue's queue is not stuck

    def conditions(*items: tuple[str, str, str]) -> dict[str, Any]:
        return {
            "status": {
                "conditions": [
                    {"type": t, "status": "True", "reason": r, "message": m} for t, r, m in items
                ]
            }
        }

    admitted = (
        ("QuotaReserved", "QuotaReserved", "Quota reserved in ClusterQueue gpu"),
        ("Admitted", "Admitted", "The workload is admitted"),
    )
    await kubelet._run(
        kubelet.custom.patch_namespaced_custom_object_status,
        "kueue.x-k8s.io",
        "v1beta1",
        NS,
        "workloads",
        workload["metadata"]["name"],
        conditions(*admitted),
    )
    await kubelet._run(kubelet.batch.patch_namespaced_job, name, NS, {"spec": {"suspend": False}})
    pod = await kubelet.start_pod(created)
    server.logs[pod] = b"step 1\n"
    await _until(lambda: _has(executor, job, b"step 1\n"))

    # Kueue preempts it: Workload Evicted, the Job suspended again, its pod deleted.
    evicted = ("Evicted", "Preempted", "Preempted to accommodate a higher priority workload")
    await kubelet._run(
        kubelet.custom.patch_namespaced_custom_object_status,
        "kueue.x-k8s.io",
        "v1beta1",
        NS,
        "workloads",
        workload["metadata"]["name"],
        conditions(*admitted, evicted),
    )
    await kubelet._run(kubelet.batch.patch_namespaced_job, name, NS, {"spec": {"suspend": True}})
    await kubelet._run(kubelet.core.delete_namespaced_pod, pod, NS)
    status = await asyncio.wait_for(waiting, 10)
    assert status.end_reason is EndReason.PREEMPTED
    assert "Preempted to accommodate" in status.reason
    assert await kubelet.job(name) is None  # Plinth requeues; Kueue must not run it again
    text = (await executor.read_log(job.id, 0)).decode()
    assert "[plinth] kueue: Admitted=True" in text and "step 1" in text
    await executor.aclose()


async def test_an_unreachable_api_server_and_a_refused_job(
    cluster: tuple[_Cluster, str], tmp_path: Path
) -> None:
    server, url = cluster
    closed = _executor(f"http://127.0.0.1:{free_tcp_port()}", tmp_path)
    with pytest.raises(Unavailable, match=r"^executor kubernetes unreachable: "):
        await closed.launch(_job(closed, "j-down"), ENV)
    await closed.aclose()

    server.refuse_jobs = 'Job.batch "plinth-j-bad-a1" is invalid: spec.template: Invalid value'
    executor = _executor(url, tmp_path)
    with pytest.raises(KubernetesJobRejected, match=r"is invalid: spec\.template"):
        await executor.launch(_job(executor, "j-bad"), ENV)
    # The credentials Secret made for it is not left behind.
    secrets = kmock.resource("", "v1", "secrets")
    assert (secrets, NS, "plinth-j-bad-a1-mlflow") not in server.objects or server.objects[
        secrets, NS, "plinth-j-bad-a1-mlflow"
    ].deleted
    await executor.aclose()
