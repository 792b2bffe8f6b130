"""SlurmCluster: a real one-node SLURM cluster (Debian's slurm-wlm + munge, as root).

Skipped, with how to enable it, where the packages or root are missing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from plinth_common.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.integration

_OK, _REASON = SlurmCluster.available()


def _pids_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker.encode() in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not _OK, reason=_REASON)
def test_a_job_runs_to_completion_and_stop_leaves_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with SlurmCluster(cluster_name="test") as cluster:
        conf = cluster.conf_path
        daemons = _pids_with(f"SLURM_CONF={conf}")
        assert len(daemons) >= 2, "slurmctld and slurmd carry the cluster's SLURM_CONF"
        # --wait returns once the job ended, with its exit code.
        done = subprocess.run(
            ["sbatch", "--wait", "--output=/dev/null", "--wrap", f"echo $SLURM_JOB_ID > {marker}"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr + cluster.log_tail()
        job_id = done.stdout.split()[-1]
        assert marker.read_text().strip() == job_id
        info = subprocess.run(
            ["sinfo", "-h", "-o", "%P %D %t"],
            env=cluster.env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert info.stdout.split() == ["main*", "1", "idle"]
        root = cluster.root
    assert _pids_with(f"SLURM_CONF={conf}") == []
    assert not root.exists()


@pytest.mark.skipif(not _OK, reason=_REASON)
def test_stop_is_idempotent_and_a_failed_start_cleans_up(tmp_path: Path) -> None:
    cluster = SlurmCluster(extra_config={"SelectType": "select/no-such-plugin"}, root_dir=tmp_path)
    with pytest.raises((TimeoutError, RuntimeError)) as caught:
        cluster.start(timeout=15)
    assert "slurmctld" in str(caught.value)
    assert _pids_with(f"SLURM_CONF={tmp_path / 'slurm.conf'}") == []
    cluster.stop()
    cluster.stop()


def test_available_says_how_to_enable() -> None:
    ok, reason = SlurmCluster.available()
    assert ok or "apt-get install slurm-wlm munge" in reason
