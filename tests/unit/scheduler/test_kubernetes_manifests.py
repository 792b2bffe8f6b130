"""What Plinth sends to Kubernetes, validated against the official schemas of a current version.

``kubernetes-validate`` ships the schemas in its wheel (no network): every Job and Secret the
executor makes, and deploy/kubernetes/rbac.yaml, are checked strictly (unknown fields fail).
The end-reason mapping from pod status is checked here too; the executor's calls against an
HTTP server speaking the API are in tests/integration/test_kubernetes_executor.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.scheduler.domain import EndReason, Job, JobSpec, JobState, Resources
from services.scheduler.executors.kubernetes import (
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    KubernetesExecutor,
    KueueOptions,
    _ended,
    job_manifest,
    secret_manifest,
)
from services.scheduler.queueing.model import ResourceFlavor, Taint

#: The newest Kubernetes whose schemas the pinned kubernetes-validate ships.
K8S_VERSION = "1.37.0"
RBAC = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes" / "rbac.yaml"


def _validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def _job(replicas: int = 1, **spec: Any) -> Job:
    return Job(
        id="j-0123456789ab",
        spec=JobSpec(
            name="train",
            team="vision",
            entrypoint=("python", "train.py", "--epochs", "3"),
            working_dir="/var/lib/plinth/jobs/j-0123456789ab/work",
            resources=Resources(cpu=1.5, memory_bytes=2 * 1024**3, gpu=1),
            replicas=replicas,
            **spec,
        ),
        state=JobState.ADMITTED,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        attempt=2,
    )


ENV = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "PLINTH_JOB_ID": "j-0123456789ab"}


def test_a_single_job_is_a_valid_job_with_resources_selector_tolerations_and_deadline() -> None:
    manifest = job_manifest(
        _job(max_run_time_s=90.5),
        ENV,
        namespace="plinth-jobs",
        image="registry.example/train:1",
        node_selector={"gpu.example/model": "a100"},
        taints=(Taint(key="gpu", value="true"), Taint(key="spot", effect="NoExecute")),
        secret_keys=["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"],
        ttl_s=600,
        kill_grace_s=12.5,
    )
    _validate(manifest)
    assert manifest["metadata"]["name"] == "plinth-j-0123456789ab-a2"
    labels = manifest["metadata"]["labels"]
    assert labels["plinth.dev/job-id"] == "j-0123456789ab"
    assert (labels["plinth.dev/team"], labels["plinth.dev/attempt"]) == ("vision", "2")
    spec = manifest["spec"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (0, 600)
    assert spec["activeDeadlineSeconds"] == 91
    assert "suspend" not in spec and "completionMode" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 13
    assert pod["nodeSelector"] == {"gpu.example/model": "a100"}
    assert pod["tolerations"] == [
        {"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists", "effect": "NoExecute"},
    ]
    container = pod["containers"][0]
    assert container["command"] == ["python", "train.py", "--epochs", "3"]
    wanted = {"cpu": "1500m", "memory": str(2 * 1024**3), "nvidia.com/gpu": "1"}
    assert container["resources"] == {"requests": wanted, "limits": wanted}
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert env["PLINTH_REPLICA_INDEX"]["value"] == "0"
    # Credentials are references to the attempt's Secret, never values in the manifest.
    ref = env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "plinth-j-0123456789ab-a2-mlflow", "key": "MLFLOW_TRACKING_PASSWORD"}
    assert "value" not in env["MLFLOW_TRACKING_PASSWORD"]
    # Without the shared volume, writable scratch for outputs and checkpoints (read-only images).
    assert [m["mountPath"] for m in container["volumeMounts"]] == [
        "/plinth/checkpoint",
        "/plinth/outputs",
    ]


def test_a_gang_is_an_indexed_job_and_kueue_mode_creates_it_suspended_and_labelled() -> None:
    manifest = job_manifest(
        _job(replicas=4),
        ENV,
        namespace="plinth-jobs",
        image="registry.example/train:1",
        kueue=KueueOptions(queue_name="team-vision", priority_class="high"),
        service_account="trainer",
        volume_claim="plinth-jobs",
        jobs_dir="/var/lib/plinth/jobs",
    )
    _validate(manifest)
    spec = manifest["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["suspend"] is True
    labels = manifest["metadata"]["labels"]
    assert (labels[KUEUE_QUEUE_LABEL], labels[KUEUE_PRIORITY_LABEL]) == ("team-vision", "high")
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer"
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["PLINTH_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == index
    assert container["workingDir"] == "/var/lib/plinth/jobs/j-0123456789ab/work"
    assert container["volumeMounts"] == [
        {"name": "plinth-jobs", "mountPath": "/var/lib/plinth/jobs"}
    ]


def test_the_credentials_secret_and_the_rbac_are_valid() -> None:
    secret = secret_manifest(
        _job(), namespace="plinth-jobs", data={"MLFLOW_TRACKING_PASSWORD": "s3cret"}
    )
    _validate(secret)
    documents = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    for document in documents:
        _validate(document)
    kinds = {d["kind"] for d in documents}
    assert kinds == {"ServiceAccount", "Role", "RoleBinding"}
    role = next(d for d in documents if d["kind"] == "Role")
    verbs = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert {"create", "get", "list", "watch", "delete"} <= verbs[("batch", "jobs")]
    assert verbs[("", "pods/log")] == {"get"}
    assert verbs[("kueue.x-k8s.io", "workloads")] == {"get", "list", "watch"}


def test_a_manifest_the_schemas_refuse_is_caught() -> None:
    manifest = job_manifest(_job(), ENV, namespace="ns", image="img")
    manifest["spec"]["backoffLimit"] = "none"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(manifest)


def _pod(
    phase: str, *, reason: str = "", terminated: dict[str, Any] | None = None
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if reason:
        status["reason"], status["message"] = reason, "The node was low on resource: memory."
    if terminated is not None:
        status["containerStatuses"] = [{"name": "job", "state": {"terminated": terminated}}]
    return {"metadata": {"name": "p-0"}, "status": status}


FAILED = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}


@pytest.mark.parametrize(
    ("pod", "exit_code", "signal", "end_reason"),
    [
        (
            _pod("Failed", terminated={"exitCode": 137, "reason": "OOMKilled"}),
            -1,
            9,
            EndReason.OOM_KILLED,
        ),
        (_pod("Failed", reason="Evicted"), -1, 0, EndReason.EVICTED),
        (_pod("Failed", terminated={"exitCode": 3, "reason": "Error"}), 3, 0, EndReason.EXITED),
        (_pod("Failed", terminated={"exitCode": 143, "reason": "Error"}), -1, 15, EndReason.EXITED),
    ],
)
def test_pod_status_maps_to_end_reasons(
    pod: dict[str, Any], exit_code: int, signal: int, end_reason: EndReason
) -> None:
    status = _ended(FAILED, [pod], {})
    assert (status.exit_code, status.signal, status.end_reason) == (exit_code, signal, end_reason)


def test_job_conditions_map_to_success_deadline_and_lost() -> None:
    assert _ended({"type": "Complete", "status": "True"}, [], {}).succeeded
    deadline = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}
    assert _ended(deadline, [], {"activeDeadlineSeconds": 60}).end_reason is (
        EndReason.RUN_TIME_EXCEEDED
    )
    assert _ended(FAILED, [], {}).end_reason is EndReason.EXECUTOR_LOST


def test_from_flavor_reads_labels_taints_and_options(tmp_path: Path) -> None:
    flavor = ResourceFlavor(
        name="gpu",
        labels={"pool": "gpu"},
        taints=(Taint(key="gpu"),),
        executor="kubernetes",
        executor_options={
            "namespace": "ml",
            "image": "img:1",
            "kueue": "true",
            "queue_name": "q",
            "host": "https://k8s.example:6443",
        },
    )
    executor = KubernetesExecutor.from_flavor(flavor, tmp_path, capacity=Resources())
    assert executor.namespace == "ml"
    bad = ResourceFlavor(name="gpu", executor="kubernetes", executor_options={"kueue": "true"})
    with pytest.raises(Exception, match="queue_name"):
        KubernetesExecutor.from_flavor(bad, tmp_path, capacity=Resources())
