"""Faults of a real cluster: signals to any launcher, a hung rank, damaged or planted checkpoint files,
a full disk. Real launchers, real signals, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from test_launch import SCRIPT, env
from test_train import launch, tiny_run
from ufo.checkpoint import _inventory, read_checkpoint
from ufo.cli import main
from ufo.config import config_from_dict
from ufo.errors import UfoError
from ufo.train import train

REPO = Path(__file__).resolve().parents[1]


def ufo_processes(tag: str) -> list[psutil.Process]:
    """Every live process whose command line names `tag` (the test's own directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and tag in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text not in (log.read_text() if log.exists() else "") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert text in log.read_text(), log.read_text()[-3000:]


def long_run(tmp_path: Path, **train_args) -> Path:
    raw = tiny_run(tmp_path, ("face", "digits"), steps=2000, eval_every=0, **train_args)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def one_process_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A plain `ufo train` (one process, no launcher) of a long run, started and past its second step."""
    config = long_run(tmp_path)
    log = tmp_path / "run.log"
    run = launch([sys.executable, "-m", "ufo.cli", "train", str(config)], log)
    try:
        wait_for(log, "step 2/", run)
    except BaseException:
        run.kill()
        raise
    return run, config


def assert_nothing_left(tag: str) -> None:
    deadline = time.time() + 60
    while ufo_processes(tag) and time.time() < deadline:
        time.sleep(0.2)
    assert not ufo_processes(tag), [p.info["cmdline"] for p in ufo_processes(tag)]


@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigterm_to_the_launch_script_checkpoints_every_rank_and_exits_3(tmp_path, launcher):
    config = long_run(tmp_path)
    log = tmp_path / "run.log"
    e = {**env(), "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([str(SCRIPT), "--launcher", launcher, "--procs-per-node", "2", "--master-port",
                            str(29300 + os.getpid() % 150 + (150 if launcher == "deepspeed" else 0)), str(config)],
                           stdout=open(log, "w"), stderr=subprocess.STDOUT, env=e, cwd=REPO, start_new_session=True)
    wait_for(log, "step 2/", run)
    run.send_signal(signal.SIGTERM)  # the outermost process only, as a supervisor does
    assert run.wait(timeout=300) == 3, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGTERM (SIGTERM to the launch script)" in text, text[-3000:]
    assert 2 <= read_checkpoint(tmp_path / "run").step < 2000
    assert_nothing_left(str(tmp_path))


@pytest.mark.dist
def test_sigterm_to_the_deepspeed_launcher_leaves_no_rank_training(tmp_path):
    # DeepSpeed's runner dies on SIGTERM without a word to its ranks: they see it gone and stop
    config = long_run(tmp_path)
    log = tmp_path / "run.log"
    args = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
            str(29600 + os.getpid() % 100), "--module", "ufo.cli", "train", str(config)]
    run = launch(args, log)
    wait_for(log, "step 2/", run)
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=60)
    assert_nothing_left(str(tmp_path))
    text = log.read_text()
    assert "gone" in text and "stopped by SIGTERM" in text, text[-3000:]
    assert 2 <= read_checkpoint(tmp_path / "run").step < 2000


@pytest.mark.dist
def test_a_stopped_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    # two ranks started by hand (what any launcher does), so that what is timed is ufo's part alone: the
    # live rank must fail within the timeout; a launcher then kills the rest (torchrun, DeepSpeed: 30 s)
    config = long_run(tmp_path, collective_timeout=5)
    port = str(29750 + os.getpid() % 100)
    ranks = []
    for rank in range(2):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONUNBUFFERED": "1"}
        ranks.append(subprocess.Popen([sys.executable, "-m", "ufo.cli", "train", str(config)], env=e, cwd=REPO,
                                      stdout=open(tmp_path / f"rank{rank}.log", "w"), stderr=subprocess.STDOUT))
    log = tmp_path / "rank0.log"
    try:
        wait_for(log, "step 2/", ranks[0])
        stopped_at = time.time()
        ranks[1].send_signal(signal.SIGSTOP)  # hung, as a rank on a partitioned node looks to the others
        rc = ranks[0].wait(timeout=120)
        took = time.time() - stopped_at
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert rc == 4 and "lost another rank" in text and "train.collective_timeout 5 s" in text, text[-3000:]
    assert took < 5 + 10, took  # the timeout, and the step in flight


def one_rank(tmp_path: Path, **train_args) -> dict:
    raw = tiny_run(tmp_path, ("face", "digits"), eval_every=0, **train_args)
    return raw


def steps_of(raw: dict, steps: int):
    return config_from_dict({**raw, "train": {**raw["train"], "steps": steps}}, "test")


def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_whole_one(tmp_path):
    raw = one_rank(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=5)
    train(steps_of(raw, 6), log=lambda _: None)
    ckpts = tmp_path / "run" / "checkpoints"
    # step 6: a rank's file deleted; step 4: the model file truncated; step 2 whole
    (ckpts / "step00000006" / "ufo_rank00000.pt").unlink()
    model = ckpts / "step00000004" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])
    lines: list[str] = []
    result = train(steps_of(raw, 8), log=lines.append)
    text = "\n".join(lines)
    assert "skipping checkpoint step00000006: " in text and "ufo_rank00000.pt: missing" in text
    assert "skipping checkpoint step00000004: " in text and "1000 bytes, the marker says" in text
    assert "resumed from" in text and "at step 2" in text, text
    assert result.step == 8
    # a malformed marker: a warning, the run goes on from another step
    (ckpts / "step00000008" / "ufo.json").write_text("[]")
    lines.clear()
    result = train(steps_of(raw, 9), log=lines.append)
    assert any("malformed marker" in line for line in lines) and result.step == 9


def test_every_checkpoint_damaged_is_one_line_not_a_fresh_start(tmp_path):
    raw = one_rank(tmp_path, steps=2)
    train(steps_of(raw, 2), log=lambda _: None)
    (tmp_path / "run" / "checkpoints" / "step00000002" / "ufo_rank00000.pt").write_bytes(b"x")
    with pytest.raises(UfoError, match="every checkpoint in it is damaged"):
        train(steps_of(raw, 4), log=lambda _: None)
    assert (tmp_path / "run" / "checkpoints" / "step00000002").is_dir()  # nothing removed


def test_unfinished_checkpoints_and_stale_temporaries_are_removed_at_start(tmp_path):
    raw = one_rank(tmp_path, steps=2)
    train(steps_of(raw, 2), log=lambda _: None)
    ckpts = tmp_path / "run" / "checkpoints"
    torn = ckpts / "step00000003"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"half")
    stale = ckpts / "step00000002" / ".ufo_rank00000.pt.tmp-999999"
    stale.write_bytes(b"x")
    lines: list[str] = []
    train(steps_of(raw, 3), log=lines.append)
    assert any("removed" in line and "step00000003" in line for line in lines)
    assert not stale.exists() and (ckpts / "step00000003" / "ufo.json").is_file()


def plant(file: Path) -> Path:
    """Replace a torch file by one whose unpickling runs code (touches a file), and make the step's marker
    agree with it, as someone who can write the checkpoint directory can."""
    proof = file.parent.parent.parent / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    torch.save({"module": Evil()}, file)
    marker = file.parent / "ufo.json"
    meta = json.loads(marker.read_text())
    meta["files"] = _inventory(file.parent)
    marker.write_text(json.dumps(meta))
    return proof


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "ufo_rank00000.pt"])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, name, capsys):
    raw = one_rank(tmp_path, steps=2)
    train(steps_of(raw, 2), log=lambda _: None)
    proof = plant(tmp_path / "run" / "checkpoints" / "step00000002" / name)
    with pytest.raises(UfoError, match=rf"{name}: refused: it holds pickled objects .*GLOBAL posix.system"):
        train(steps_of(raw, 4), log=lambda _: None)
    if name.startswith("mp_rank"):
        assert main(["export", str(tmp_path / "run"), "--task", "face", "--out", str(tmp_path / "sub")]) == 2
        err = capsys.readouterr().err
        assert "refused" in err and len(err.strip().splitlines()) == 1, err
    assert not proof.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for one tiny checkpoint, not two."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small filesystem")
    where = tmp_path / "disk"
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)])


def test_a_full_disk_names_the_path_keeps_the_last_checkpoint_and_leaves_no_torn_step(tmp_path, small_disk):
    raw = one_rank(tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=3)
    raw["train"]["out_dir"] = str(small_disk / "run")
    with pytest.raises(UfoError) as failed:
        train(steps_of(raw, 4), log=lambda _: None)
    message = str(failed.value)
    assert "No space left on device" in message and str(small_disk / "run" / "checkpoints") in message, message
    assert "\n" not in message
    ckpts = small_disk / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step00000002"]
    assert read_checkpoint(small_disk / "run").step == 2


def test_export_never_creates_or_calls_a_store_its_checkpoint_names(tmp_path, capsys):
    import socket

    raw = one_rank(tmp_path, steps=1)
    train(steps_of(raw, 1), log=lambda _: None)
    step = tmp_path / "run" / "checkpoints" / "step00000001"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    for uri in (f"sqlite:///{tmp_path / 'cluster' / 'mlflow.db'}", f"http://127.0.0.1:{listener.getsockname()[1]}"):
        meta = json.loads((step / "ufo.json").read_text())
        (step / "ufo.json").write_text(json.dumps({**meta, "mlflow_run_id": "0" * 32, "mlflow_uri": uri}))
        capsys.readouterr()
        assert main(["export", str(tmp_path / "run"), "--task", "face", "--out", str(tmp_path / "sub"),
                     "--overwrite"]) == 0
        out = capsys.readouterr().out
        assert f"mlflow: not logging to {uri}" in out and "--track URI" in out, out
    assert not (tmp_path / "cluster").exists()
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody called


@pytest.mark.dist
def test_a_one_process_run_listens_on_no_network_address(tmp_path):
    run, _ = one_process_run(tmp_path)
    try:
        listening = [c.laddr for c in psutil.Process(run.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=120)
    assert all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening


# bad data: found before anything starts, or counted, skipped alike on every rank and summed at the end

def test_shards_that_do_not_exist_are_refused_before_anything_starts(tmp_path):
    raw = one_rank(tmp_path, steps=2)
    raw["tasks"]["digits"]["eval_shards"] = str(tmp_path / "nowhere")
    with pytest.raises(UfoError, match=r"^tasks.digits.eval_shards: task digits: shards .*nowhere.* match no shard"):
        train(steps_of(raw, 2), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_task_without_eval_shards_and_a_short_shard_are_reported(tmp_path):
    raw = one_rank(tmp_path, steps=2)
    raw["tasks"]["digits"]["eval_shards"] = None
    shard = sorted(Path(raw["tasks"]["face"]["shards"]).glob("*.tar"))[0]
    shard.write_bytes(b"")  # an empty tar whose manifest says it holds samples
    lines: list[str] = []
    train(steps_of(raw, 2), log=lines.append)
    text = "\n".join(lines)
    assert "tasks.digits.eval_shards is not set: it is never evaluated" in text
    assert f"{shard}: 0 bytes, its manifest says" in text


def test_a_shard_cut_short_is_counted_per_sample_without_object_reprs(tmp_path):
    from data.shardtools import write_synth
    from ufo.data import TaskLoader

    out = write_synth(tmp_path / "s", samples=20, maxcount=10)
    shard = out / "shapes-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    lines: list[str] = []
    loader = TaskLoader("shapes", str(out), batch_size=5, transform=lambda im: torch.zeros(3, 16, 16),
                        num_classes=5, log=lines.append)
    read = sum(len(batch["labels"]) for batch in loader)
    assert read + sum(loader.bad_samples.values()) == 20, (read, loader.bad_samples)
    assert loader.bad_samples["missing"] >= 4
    assert not any(" at 0x" in line or "object" in line for line in lines), lines


def write_half_bad(root: Path, task: str, samples: int, bad_first: int, classes: int) -> str:
    """One shard whose first `bad_first` samples have no image."""
    import io

    from PIL import Image
    from data.shardtools import write_tar

    members = []
    for i in range(samples):
        members.append((f"{task}{i:04d}.cls", str(i % classes).encode()))
        if i >= bad_first:
            png = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 7 % 255, 0, 0)).save(png, format="png")
            members.append((f"{task}{i:04d}.png", png.getvalue()))
    (root / task).mkdir(parents=True)
    write_tar(root / task / f"{task}-000000.tar", members)
    return str(root / task)


def test_a_micro_batch_empty_on_every_task_is_skipped_counted_and_summarised(tmp_path):
    raw = one_rank(tmp_path, steps=3, layout="mixed")
    raw["data"]["shuffle_buffer"] = 0
    for task in ("face", "digits"):
        raw["tasks"][task]["shards"] = write_half_bad(tmp_path / "bad", task, 12, 6, raw["tasks"][task]["num_classes"])
    lines: list[str] = []
    result = train(steps_of(raw, 3), log=lines.append)  # each epoch: an empty micro-batch, then a full one
    assert result.step == 3
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_data"]
    assert summary["empty_micro_batches"] == 3
    assert summary["samples"] == {"face": {"no image member": 18}, "digits": {"no image member": 18}}
    assert any(line.startswith("bad data (all ranks): face: 18 no image member") and "3 empty micro-batches" in line
               for line in lines), lines


@pytest.mark.dist
def test_a_zero3_run_continues_on_one_rank_then_on_two_with_its_state_schedule_and_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    from test_train import torchrun
    from ufo.engine import lr_schedule

    raw = tiny_run(tmp_path, ("face", "digits"), steps=6, eval_every=0, layout="mixed")
    raw["deepspeed"] = {"zero_stage": 3}
    raw["tracking"] = {"enabled": True}
    raw["train"]["weighting"] = {"name": "uncertainty", "lr": 0.5}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"

    def run(args: list[str], log: str) -> str:
        proc = launch(args, tmp_path / log)
        assert proc.wait(timeout=600) == 0, (tmp_path / log).read_text()[-3000:]
        return (tmp_path / log).read_text()

    run(torchrun(config, out, "train.steps=2"), "two.log")
    one = run([sys.executable, "-m", "ufo.cli", "train", str(config), "--set", "train.steps=4"], "one.log")
    assert "resuming step00000002 of 2 ranks, placement replicated, digits:0,1 face:0,1 on 1 rank, placement " \
           "replicated, digits:0 face:0" in one
    assert "resumed from" in one and "at step 2" in one
    again = run(torchrun(config, out, "train.steps=6"), "again.log")
    assert "resuming step00000004 of 1 rank, placement replicated, digits:0 face:0 on 2 ranks" in again
    assert "at step 4" in again
    # each task's epoch goes on where the ranks before left it: 2 ranks took 2 batches, then 1 rank 2 more
    from ufo.checkpoint import safe_load

    moved = safe_load(out / "checkpoints" / "step00000004" / "ufo_rank00000.pt")["data"]["tasks"]
    assert moved["face"] == {"epoch": 0, "batches": 2, "splits": [[2, 2]]}, moved

    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    cfg = config_from_dict(raw, "test")
    factor = lr_schedule(cfg)
    for r in history:  # the schedule of one straight run, through both moves
        assert r["lr"] == pytest.approx(cfg.train.lr * factor(r["step"]), rel=1e-9), r
    # the learned log-variances carry on (started afresh they would be back near +-lr after one step)
    for task in ("face", "digits"):
        s2, s3 = history[1]["log_variance"][task], history[2]["log_variance"][task]
        assert abs(s2) > 0.8 and abs(s3 - s2) < 0.6, (task, s2, s3)
    markers = [json.loads((out / "checkpoints" / f"step0000000{s}" / "ufo.json").read_text()) for s in (6,)]
    run_id = markers[0]["mlflow_run_id"]
    steps = [m.step for m in MlflowClient(markers[0]["mlflow_uri"]).get_metric_history(run_id, "lr")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]


@pytest.mark.dist
def test_a_full_disk_under_two_ranks_fails_every_rank_alike_with_the_reason(tmp_path, small_disk):
    from test_train import torchrun

    config = long_run(tmp_path, checkpoint_every=2)
    log = tmp_path / "run.log"
    run = launch(torchrun(config, small_disk / "run", "train.steps=4"), log)
    assert run.wait(timeout=300) != 0
    text = log.read_text()
    failed = "ufo train: error: checkpoint at step 2 not written"
    lines = [line for line in text.splitlines() if line.startswith(failed)]
    assert len(lines) == 2 and all("No space left on device" in line for line in lines), text[-3000:]
    assert not [p for p in (small_disk / "run" / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert_nothing_left(str(tmp_path))


# two runs on one out_dir, a full disk during export, resuming with a changed config, bad data over resumes

def test_a_second_run_on_a_live_runs_out_dir_is_refused_and_a_killed_one_blocks_nothing(tmp_path):
    first, config = one_process_run(tmp_path)
    log = tmp_path / "run.log"
    try:
        raw = yaml.safe_load(config.read_text())
        with pytest.raises(UfoError) as refused:
            train(steps_of(raw, 4), log=lambda _: None)
        message = str(refused.value)
        assert f"{tmp_path / 'run'}: another run trains here" in message and f"pid {first.pid}" in message, message
        assert "\n" not in message
        assert first.poll() is None  # the live run goes on
        seen = len((tmp_path / "run" / "history.jsonl").read_text().splitlines())
        wait_for(log, f"step {seen + 2}/", first)  # still writing its own history
    finally:
        first.kill()  # kill -9: its lock stays behind
        first.wait()
    assert (tmp_path / "run" / ".ufo-run.lock").exists()
    result = train(steps_of(raw, 3), log=lambda _: None)  # the dead run's lock is no obstacle
    assert result.step == 3
    assert not (tmp_path / "run" / ".ufo-run.lock").exists()  # given back at the end


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path, small_disk, capsys):
    raw = one_rank(tmp_path, steps=1)
    train(steps_of(raw, 1), log=lambda _: None)
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 16 * 1024))  # 16 KiB left: less than the subnet's weights
    out = small_disk / "subnet"
    assert main(["export", str(tmp_path / "run"), "--task", "face", "--out", str(out), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and str(out) in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no subnet, no hidden temporary


def test_resuming_with_a_changed_config_lists_the_change_and_replans_the_data_it_moves(tmp_path):
    raw = one_rank(tmp_path, steps=2)
    train(steps_of(raw, 2), log=lambda _: None)
    harmless = {**raw, "train": {**raw["train"], "log_every": 2, "eval_every": 3}}
    lines: list[str] = []
    assert train(steps_of(harmless, 4), log=lines.append).step == 4
    text = "\n".join(lines)
    assert ("resume: the config changed since step00000002: train.eval_every 0 -> 3, train.log_every 1 -> 2, "
            "train.steps 2 -> 4") in text, text
    assert "re-planned" not in text
    moved = json.loads(json.dumps(harmless))
    moved["tasks"]["face"]["shards"] = str(Path(raw["tasks"]["face"]["shards"]).resolve()) + "/"  # the same files
    moved["train"]["micro_batch_size"] = 4
    lines.clear()
    assert train(steps_of(moved, 6), log=lines.append).step == 6
    text = "\n".join(lines)
    assert "tasks.face.shards" in text and "train.micro_batch_size 6 -> 4" in text, text
    assert "resume: tasks.face.shards, train.micro_batch_size changed: task face's saved data position no longer " \
           "applies; it is re-planned from the start of its epoch" in text, text
    assert "resume: train.micro_batch_size changed: task digits's saved data position" in text, text
    other = {**moved, "tasks": {"face": moved["tasks"]["face"]}}
    with pytest.raises(UfoError, match="was trained on tasks face, digits, this config has face: a run's tasks "
                                       "cannot change on resume"):
        train(steps_of(other, 8), log=lambda _: None)


def test_the_bad_data_summary_counts_the_whole_run_across_resumes(tmp_path):
    def run(where: Path, stops: list[int]) -> dict:
        raw = one_rank(where, steps=4, layout="mixed")
        raw["data"]["shuffle_buffer"] = 0
        for task in ("face", "digits"):
            raw["tasks"][task]["shards"] = write_half_bad(where / "bad", task, 12, 6,
                                                          raw["tasks"][task]["num_classes"])
        for steps in stops:
            train(steps_of(raw, steps), log=lambda _: None)
        return json.loads((where / "run" / "metrics.json").read_text())["bad_data"]

    straight, resumed = run(tmp_path / "straight", [4]), run(tmp_path / "resumed", [2, 4])
    assert straight == {"samples": {"face": {"no image member": 24}, "digits": {"no image member": 24}},
                        "empty_micro_batches": 4}
    assert resumed == straight
