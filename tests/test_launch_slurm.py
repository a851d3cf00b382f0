"""launch/slurm.sbatch under a real single-host SLURM (munged, slurmctld, slurmd started here):
SIGUSR1 (what --signal=USR1@T sends before the time limit) -> checkpoint -> exit 0 -> requeue ->
resume -> the same losses as an uninterrupted run. Needs root and slurm-wlm + munge (Debian
packages slurmctld slurmd slurm-client munge); skipped with the reason where missing.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from dist_util import free_port
from launch_util import LAUNCH, SBIN, check, last_step, launch_env, run, wait_for, which
from train_util import losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-host SLURM cluster (munged, slurmctld, slurmd) with its own config, ports and state."""
    need = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo"]
    missing = [b for b in need if not which(b)]
    if os.geteuid() != 0 or missing:
        pytest.skip("SLURM test needs root and " + (", ".join(missing) or "root") +
                    " (Debian packages slurmctld slurmd slurm-client munge; .ci/run installs them)")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=pretraintest", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d}/munge.sock",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "MpiDefault=none", "ReturnToService=2", "KillWait=10", "MinJobAge=600", "InactiveLimit=0",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SBIN}
    pidfiles = [d / "slurmd.pid", d / "slurmctld.pid", d / "munged.pid"]
    try:
        subprocess.run([which("munged"), "-f", "-S", d / "munge.sock", f"--key-file={key}",
                        f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid",
                        f"--seed-file={d}/munged.seed"], check=True, env=env)
        subprocess.run([which("slurmctld"), "-c", "-i", "-f", conf], check=True, env=env)
        subprocess.run([which("slurmd"), "-f", conf], check=True, env=env)
        idle = lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env,  # noqa: E731
                                                capture_output=True, text=True).stdout
        wait_for(idle, 60, "the SLURM node to be idle", interval=0.5)
        yield d, env
    finally:
        subprocess.run(["scancel", "--full", "--partition=test"], env=env, capture_output=True)
        for pidfile in pidfiles:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm, config, tmp_path):
    d, slurm_env = slurm
    # The uninterrupted run to compare with: the same config on one process.
    ref = run([sys.executable, "-m", "pretrain.train", "--config", config, f"train.out_dir={tmp_path / 'ref'}"],
              launch_env(tmp_path / "ref_logs"))
    check(ref)

    out = tmp_path / "slurm.out"
    env = {**launch_env(tmp_path / "logs", NPROC_PER_NODE=1, MASTER_PORT=free_port(),
                        PRETRAIN_FAULTS="sleep=0.5"), "SLURM_CONF": slurm_env["SLURM_CONF"]}
    env["PATH"] = SBIN
    sub = run(["sbatch", "--parsable", "--nodes=1", "--exclusive", f"--output={out}", LAUNCH / "slurm.sbatch",
               config, f"train.out_dir={tmp_path / 'run'}"], env, timeout=60)
    job = check(sub).strip().split(";")[0]
    sq = lambda fmt: subprocess.run(["squeue", "-h", "-j", job, "-o", fmt], env=env,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    wait_for(lambda: last_step(tmp_path / "run") >= 2, 240, "step 2 under SLURM")
    # What `--signal=USR1@120` does 120 s before the time limit: SIGUSR1 to the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    wait_for(lambda: sq("%T") == "PENDING" and "stop requested" in out.read_text(), 120,
             "the job to checkpoint and requeue itself", interval=0.5)
    # SLURM holds a requeued job for 120 s (BeginTime); an operator's release, after the
    # old credential's second has passed (a start in the same second is refused).
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    wait_for(lambda: sq("%T") == "", 300, "the requeued job to finish", interval=0.5)
    info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    log = out.read_text()
    assert "JobState=COMPLETED" in info and "Restarts=1" in info, info + log[-5000:]
    assert "launch: got SIGUSR1" in log
    assert re.search(r"stop requested \(SIGTERM/SIGUSR1\): saved \S+ at step [2-7];", log), log[-5000:]
    assert "requeueing job" in log and f"job {job} (restart 1)" in log
    assert "resumed from" in log and "slurm.sbatch: training finished" in log
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
