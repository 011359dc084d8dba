"""launch/train.sh across two hosts for real: two network namespaces joined by a veth pair, one rank in each."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import LAUNCHER_ENV
from ufo.checkpoint import read_checkpoint
from ufo.data import open_source, write_task_shards

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "train.sh"
DEMO_TASKS = {"digits": ("classification", 10), "shapes": ("classification", 8), "persons": ("retrieval", 50),
              "shoppers": ("retrieval", 50)}


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, **kw)


def needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (`ip netns`) to make two test hosts")


@pytest.fixture
def two_hosts():
    """Two network namespaces, 10.77.x.1 and 10.77.x.2, joined by a veth pair; removed afterwards."""
    needs_root()
    tag = f"{os.getpid() % 10000}"
    a, b, net = f"ufo{tag}a", f"ufo{tag}b", f"10.77.{os.getpid() % 250}"
    made = sh("ip", "netns", "add", a, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {made.stderr.strip()}")
    try:
        for cmd in (["ip", "netns", "add", b],
                    ["ip", "link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"],
                    ["ip", "link", "set", f"v{tag}a", "netns", a], ["ip", "link", "set", f"v{tag}b", "netns", b],
                    ["ip", "-n", a, "addr", "add", f"{net}.1/24", "dev", f"v{tag}a"],
                    ["ip", "-n", b, "addr", "add", f"{net}.2/24", "dev", f"v{tag}b"],
                    ["ip", "-n", a, "link", "set", f"v{tag}a", "up"], ["ip", "-n", b, "link", "set", f"v{tag}b", "up"],
                    ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]):
            sh(*cmd)
        yield [(a, f"v{tag}a", f"{net}.1"), (b, f"v{tag}b", f"{net}.2")]
    finally:
        sh("ip", "netns", "del", a, check=False)  # takes its end of the veth pair, and so the pair, with it
        sh("ip", "netns", "del", b, check=False)


def demo_overrides(tmp_path: Path, out: Path) -> list[str]:
    """configs/demo.yaml on small shards of its four tasks, a few steps."""
    sets = [f"train.out_dir={out}", "train.steps=6", "train.eval_every=0", "train.checkpoint_every=0",
            "train.log_every=1", "train.plots=false"]
    for task, (kind, classes) in DEMO_TASKS.items():
        root = tmp_path / "data" / task
        if not root.exists():
            source = open_source("synth:shapes" if kind == "classification" else "synth:persons", task,
                                 classes=classes, samples=4 * classes + 40, image_size=32)
            write_task_shards(source, task, root, kind=kind, maxcount=60, eval_fraction=0.0 if source.splits else 0.25, log=lambda _: None)
        sets.append(f"tasks.{task}.shards={root / 'train'}")
        if kind == "classification":
            sets.append(f"tasks.{task}.eval_shards={root / 'eval'}")
        else:  # the demo's re-identification task: a query and a gallery
            sets += [f"tasks.{task}.eval_shards.{part}={root / part}" for part in ("query", "gallery")]
    return [a for s in sets for a in ("--set", s)]


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    # one thread per rank on either layout, so that one host and two hosts compute bit for bit alike
    return {**clean, "UFO_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def test_launch_script_refuses_bad_arguments_in_one_line(tmp_path):
    bad = sh(str(SCRIPT), "--launcher", "mpi", str(REPO / "configs" / "demo.yaml"), check=False, env=env())
    assert bad.returncode == 2 and bad.stderr.strip() == "launch/train.sh: --launcher mpi: use torchrun or deepspeed"
    missing = sh(str(SCRIPT), str(tmp_path / "nope.yaml"), check=False, env=env())
    assert missing.returncode == 2 and "nope.yaml: no such config file" in missing.stderr
    multi = sh(str(SCRIPT), "--launcher", "deepspeed", "--nodes", "2", str(REPO / "configs" / "demo.yaml"),
               check=False, env=env())
    assert multi.returncode == 2 and "needs --hostfile" in multi.stderr
    assert "--launcher torchrun|deepspeed" in sh(str(SCRIPT), "--help").stdout


@pytest.fixture(scope="module")
def one_host(tmp_path_factory) -> Path:
    """The demo config's few steps on this host (2 ranks, the script's default launcher): the run
    both launchers' two-host runs are compared with; its data is theirs too."""
    needs_root()  # (a module's fixtures come before a test's: skip before training for nothing)
    root = tmp_path_factory.mktemp("one_host")
    one = subprocess.run([str(SCRIPT), "--procs-per-node", "2", "--master-port", str(29700 + os.getpid() % 100),
                          str(REPO / "configs" / "demo.yaml"), *demo_overrides(root, root / "one")],
                         capture_output=True, text=True, env=env(), cwd=REPO, timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    return root


@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_hosts_train_the_demo_config_like_one_host(tmp_path, two_hosts, one_host, launcher):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{addr} slots=1\n" for _, _, addr in two_hosts))
    master = two_hosts[0][2]
    procs = []
    for rank, (ns, iface, _) in enumerate(two_hosts):
        args = ["ip", "netns", "exec", ns, str(SCRIPT), "--launcher", launcher, "--nodes", "2", "--node-rank",
                str(rank), "--master-addr", master, "--master-port", "29555", "--iface", iface]
        if launcher == "deepspeed":
            args += ["--hostfile", str(hostfile)]
        args += [str(REPO / "configs" / "demo.yaml"), *demo_overrides(one_host, tmp_path / "two")]  # its shards
        procs.append(subprocess.Popen(args, stdout=open(tmp_path / f"host{rank}.log", "w"),
                                      stderr=subprocess.STDOUT, env=env(), cwd=REPO))
    for rank, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"host{rank}.log").read_text()[-3000:]
    log0 = (tmp_path / "host0.log").read_text()
    assert "2 ranks" in log0 and "step 6/6" in log0 and "eval:" in log0

    # the same checkpoint layout as one host, and the same weights: the ranks met over the veth pair
    step = "checkpoints/step00000006"
    assert sorted(p.name for p in (one_host / "one" / step).iterdir()) == \
        sorted(p.name for p in (tmp_path / "two" / step).iterdir())
    want, got = read_checkpoint(one_host / "one").state_dict, read_checkpoint(tmp_path / "two").state_dict
    for name in want:
        assert torch.equal(want[name], got[name]), name
