"""slurm/train.sbatch under a real Slurm: a one-node cluster on localhost (slurmctld, slurmd, munge).

The fixture installs Debian's packages when they are missing (root and apt needed), starts the
daemons on free ports with a config of its own, and shuts them down afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from test_launch import demo_overrides
from test_train import LAUNCHER_ENV
from ufo.checkpoint import complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _run(*args: str, env=None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, check=check)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install() -> str | None:
    """Why Slurm cannot be had here, or None once slurmctld, slurmd, sbatch and munged are installed."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")) and Path("/usr/sbin/munged").exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "Slurm is not installed, and installing it needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        done = subprocess.run(install, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on localhost; yields the environment that talks to it."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs Linux and root (slurmd runs jobs as their user)")
    why = _install()
    if why:
        pytest.skip(why)
    if _run("munge", "-n", check=False).returncode != 0:  # munged is not running: start it as its user
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=ufotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
SlurmUser=root
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/d
SlurmctldPidFile={root}/ctld.pid
SlurmdPidFile={root}/d.pid
SlurmctldLogFile={root}/ctld.log
SlurmdLogFile={root}/d.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
MpiDefault=none
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=ufo Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    (root / "ctld").mkdir()
    (root / "d").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(conf), UFO_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    _run("slurmctld", "-f", str(conf), env=env)
    _run("slurmd", "-f", str(conf), "-N", host, env=env)
    try:
        deadline = time.time() + 60
        while "idle" not in _run("sinfo", "-h", "-o", "%T", env=env, check=False).stdout:
            if time.time() > deadline:
                pytest.fail("the local Slurm node never became idle:\n" + (root / "ctld.log").read_text()[-2000:])
            time.sleep(0.5)
        yield env
    finally:
        _run("scancel", "--user", "root", env=env, check=False)
        _run("scontrol", "shutdown", env=env, check=False)


def submit(env: dict, out: Path, log: Path, *train_args: str) -> str:
    """sbatch the repository's script on this one-node, CPU-only cluster: 2 ranks, no GPUs."""
    done = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                           "--cpus-per-task=1", f"--output={log}", "slurm/train.sbatch",
                           str(REPO / "configs" / "demo.yaml"), *train_args],
                          capture_output=True, text=True, env={**env, "UFO_OUT": str(out)}, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job(env: dict, job_id: str) -> dict[str, str]:
    text = _run("scontrol", "show", "job", job_id, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def wait_for(env: dict, job_id: str, done, what: str, log: Path, timeout: float = 600) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job(env, job_id)
        if done(state):
            return state
        time.sleep(1)
    pytest.fail(f"job {job_id} never got {what}: {job(env, job_id)}\n" + (log.read_text()[-3000:] if log.exists()
                                                                            else ""))


def mlflow_steps(out: Path, metric: str) -> tuple[str, list[int]]:
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ufo").experiment_id])
    return run.info.status, [m.step for m in client.get_metric_history(run.info.run_id, metric)]


@pytest.mark.dist
def test_sbatch_trains_the_demo_config_and_a_preempted_job_is_requeued_and_resumes(slurm, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    args = demo_overrides(tmp_path, out)[2:] + ["--set", "train.steps=16"]
    job_id = submit(slurm, out, log, *args)
    deadline = time.time() + 300
    while not (log.exists() and "step 3/" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    _run("scancel", "--signal=USR1", job_id, env=slurm)  # what Slurm sends at --signal=USR1@T or preemption
    wait_for(slurm, job_id, lambda s: s["Restarts"] == "1", "requeued", log)
    requeued = time.time()

    def nudged(s: dict) -> bool:  # Slurm holds a requeued job two minutes before it may start again
        # not within the second of the requeue: slurmd refuses a credential made in the second its job's
        # last one was revoked ("Job credential revoked", the restart fails)
        if s["JobState"] == "PENDING" and time.time() - requeued > 3:
            _run("scontrol", "update", f"JobId={job_id}", "StartTime=now", env=slurm, check=False)
        return s["JobState"] != "PENDING"

    wait_for(slurm, job_id, nudged, "started again", log)
    state = wait_for(slurm, job_id, lambda s: s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                     and s["Restarts"] == "1", "to an end after its restart", log)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-3000:]
    assert f"ufo slurm job {job_id} start 1: 1 node(s), 2 ranks" in text and "2 ranks, ZeRO 0" in text
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", text)
    assert stopped, text[-3000:]
    assert "checkpointed on a signal, requeueing" in text and f"ufo slurm job {job_id} start 2" in text
    assert f"resumed from {out}/checkpoints/step{int(stopped.group(1)):08d} at step {stopped.group(1)}" in text
    run_ids = re.findall(r"mlflow: (?:started|continues) run (\w+)", text)
    assert len(run_ids) == 2 and run_ids[0] == run_ids[1] and "continues run" in text
    assert complete_checkpoints(out / "checkpoints")[-1].name == "step00000016"
    assert mlflow_steps(out, "loss/digits") == ("FINISHED", list(range(1, 17)))  # continued, not restarted
