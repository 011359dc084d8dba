"""Distributed training with real DeepSpeed engines in 2 CPU processes (gloo), real shards."""

from __future__ import annotations

import contextlib
import json
import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch
import torch.multiprocessing as mp

from tiny import TINY
from ufo.checkpoint import read_checkpoint
from ufo.config import config_from_dict
from ufo.data import open_source, write_task_shards

REPO = Path(__file__).resolve().parents[1]


def write_data(root: Path, tasks: dict) -> dict:
    """Small shards for each task; returns the config's tasks with their shard paths."""
    out = {}
    for name, task in tasks.items():
        # `person` is a re-identification task: evaluated on a query and a gallery with cameras (reid)
        generator = "persons" if name == "person" else "shapes" if task["kind"] == "classification" else "instances"
        source = open_source(f"synth:{generator}", name, classes=task["num_classes"], samples=60, image_size=16)
        write_task_shards(source, name, root / name, kind=task["kind"], maxcount=25, eval_fraction=0.0 if source.splits else 0.25,
                          log=lambda _: None)
        parts = {"query": str(root / name / "query"), "gallery": str(root / name / "gallery")}
        out[name] = {**task, "shards": str(root / name / "train"),
                     "eval_shards": parts if generator == "persons" else str(root / name / "eval")}
    return out


def tiny_run(tmp_path: Path, tasks: tuple[str, ...], **train) -> dict:
    raw = copy.deepcopy(TINY)
    raw["tasks"] = write_data(tmp_path / "data", {t: raw["tasks"][t] for t in tasks})
    raw["data"] = {"num_workers": 0, "hflip": 0.0, "scale": [1.0, 1.0], "shuffle_buffer": 8}
    raw["tracking"] = {"enabled": False}  # tests/test_tracking.py turns it on
    # no PNGs at each run's end (matplotlib's import and two plots, a second of every test run's rank 0);
    # the tests of the plots turn them on
    raw["train"] = {"seed": 3, "out_dir": str(tmp_path / "run"), "micro_batch_size": 6, "log_every": 1,
                    "plots": False, **train}
    return raw


def _rank_main(rank: int, world: int, port: int, raws: dict | list[dict], out: str) -> None:
    """Train each config in turn (one set of processes for several runs: the imports and the process
    group's start are paid once) and save every rank's parameters and weighting state."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from deepspeed.utils import safe_get_full_fp32_param

    from ufo.checkpoint import canonical_name
    from ufo.train import train

    for i, raw in enumerate([raws] if isinstance(raws, dict) else raws):
        where = Path(out) if isinstance(raws, dict) else Path(out) / str(i)
        where.mkdir(parents=True, exist_ok=True)
        result = train(config_from_dict(raw, "test"), log=lambda _: None)
        params = {}
        for name, param in result.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)  # None without ZeRO: the parameter is whole
            params[canonical_name(name)] = (param if full is None else full).detach().clone()
        for name, buffer in result.engine.module.named_buffers():  # a BNNeck's running statistics
            params[canonical_name(name)] = buffer.detach().clone()
        torch.save(params, where / f"params{rank}.pt")
        torch.save(result.weighting.state_dict(), where / f"weighting{rank}.pt")
        if result.engine.optimizer is not None:  # Partial FC centre shards' optimizer state (test_placement)
            from ufo.ds_masters import full_optimizer_state

            torch.save({canonical_name(n): full_optimizer_state(result.engine, p)
                        for n, p in result.engine.module.named_parameters() if hasattr(p, "ufo_rows")},
                       where / f"centre_states{rank}.pt")
    leave()  # once: DeepSpeed keeps its groups of the first run for the next ones


def leave() -> None:
    from ufo.layout import leave_distributed

    leave_distributed()


class SharedRuns:
    """Runs of several parametrized cases trained by one set of `world` processes, on the first case
    that asks for one of them: `get(case)` -> (raw, every rank's parameters)."""

    def __init__(self, root: Path, make: Callable[[Path, tuple], dict], group: Callable[[tuple], list[tuple]],
                 world: int):
        self.root, self.make, self.group, self.world, self.done = root, make, group, world, {}
        self.dirs: dict[tuple, Path] = {}  # where each case's ranks left their files (weighting, centre states)

    def get(self, case: tuple) -> tuple[dict, list[dict]]:
        if case not in self.done:
            cases = self.group(case)
            base = self.root / f"group{len(self.done)}"
            raws = [self.make(base / f"case{i}", c) for i, c in enumerate(cases)]
            port = 29000 + (os.getpid() + 17 * len(self.done)) % 1000
            mp.start_processes(_rank_main, args=(self.world, port, raws, str(base)), nprocs=self.world,
                               start_method="spawn")
            for i, (c, raw) in enumerate(zip(cases, raws)):
                self.done[c] = raw, [torch.load(base / str(i) / f"params{r}.pt") for r in range(self.world)]
                self.dirs[c] = base / str(i)
        return self.done[case]


def reference_step(raw: dict, world: int, accumulation: int = 1, initial: dict | None = None,
                   observe: dict | None = None) -> dict:
    """One plain SGD step of a single process on the union of every rank's batches: with
    gradient accumulation, the mean of the micro-steps' losses (what DeepSpeed averages); with
    train.gradient_clipping, clipped by the global norm as torch clips. `initial`: initial weights
    (by name) in place of the config's. `observe` (one micro-step) receives each task's mean loss and
    its gradient on the shared parameters, unweighted, and the global gradient norm before clipping."""
    from ufo.checkpoint import init_supernet
    from ufo.layout import make_layout
    from ufo.model import TaskSlice
    from ufo.model.paths import PathPolicy
    from ufo.train import _make_loader

    cfg = config_from_dict(raw, "test")
    layout = make_layout(cfg, world)
    micro = [{t: [] for t in cfg.tasks} for _ in range(accumulation)]
    mixed = [{t: [] for t in cfg.tasks} for _ in range(accumulation)]  # mixup/cutmix soft targets
    for rank in range(world):
        stream = iter(_make_loader(cfg, layout, rank))
        for rows, soft in zip(micro, mixed):
            batch = next(stream)
            if "slices" in batch:
                start = 0
                for i, (task, n) in enumerate(batch["slices"]):
                    # one batch, or one tensor per task when the tasks' input sizes differ
                    images = batch["images"][i] if isinstance(batch["images"], list) else \
                        batch["images"][start:start + n]
                    rows[task].append((images, batch["labels"][start:start + n]))
                    if task in batch["targets"]:
                        soft[task].append(batch["targets"][task])
                    start += n
            else:
                rows[batch["task"]].append((batch["images"], batch["labels"]))
                if "targets" in batch:
                    soft[batch["task"]].append(batch["targets"])
    torch.manual_seed(cfg.train.seed)
    model = init_supernet(cfg)
    if initial is not None:
        model.load_state_dict({k: v.clone() for k, v in initial.items()}, strict=False)
    features: list = []
    model.head_drop.register_forward_hook(lambda _, __, out: features.append(out))
    t = cfg.train
    policy = PathPolicy(t.path_policy, {task: cfg.path_of(task) for task in cfg.tasks}, t.seed, steps=t.steps,
                        temperature=(t.path.temperature.start, t.path.temperature.end))
    paths, gates = policy.paths_at(0), policy.gates_at(0)
    coupled = any(tc.neck != "none" or tc.triplet is not None for tc in cfg.tasks.values())
    for rows, soft in zip(micro, mixed):
        images = [torch.cat([x for x, _ in rows[t]]) for t in cfg.tasks]  # a tensor per task: sizes may differ
        labels = torch.cat([y for t in cfg.tasks for _, y in rows[t]])
        slices = [TaskSlice(t, paths[t], sum(len(y) for _, y in rows[t]), gate=gates.get(t),
                            targets=torch.cat(soft[t]) if soft[t] else None) for t in cfg.tasks]
        if coupled:  # a BNNeck normalizes, and the triplet loss mines, one rank's slice at a time
            losses = [sum(model(x, [TaskSlice(t, paths[t], len(y))], y, reduction="sum")[0]
                          for x, y in rows[t] if len(y)) / sum(len(y) for _, y in rows[t]) for t in cfg.tasks]
        else:
            losses = model(images, slices, labels)
        weights = reference_weights(cfg, losses, features.pop())
        loss = sum(w * loss for w, loss in zip(weights, losses))
        if gates:  # every block is open: the expected task-specific blocks of every task, at their cost
            loss = loss + cfg.train.path.task_block_cost * sum(p[:, 1].sum() for p in model.path_probs.values())
        if observe is not None:
            from ufo.checkpoint import task_of

            shared = {n: p for n, p in model.named_parameters() if task_of(n) is None}
            observe["losses"] = [float(x.detach()) for x in losses]
            observe["task_grads"] = [dict(zip(shared, torch.autograd.grad(x, list(shared.values()), retain_graph=True,
                                                                          allow_unused=True))) for x in losses]
        (loss / accumulation).backward()
        if observe is not None:
            observe["grad_norm"] = float(torch.stack([p.grad.double().pow(2).sum() for p in model.parameters()
                                                      if p.grad is not None]).sum().sqrt())
    if cfg.train.gradient_clipping:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                       cfg.train.gradient_clipping)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is not None:
                p -= (cfg.train.path.lr if name.startswith("path_logits.") else cfg.train.lr) * p.grad
    return dict(model.named_parameters())


def reference_weights(cfg, losses: list, z: torch.Tensor) -> list[float]:
    """The weights of the strategies the step test covers, from the whole batch's losses (by hand)."""
    name = cfg.train.weighting.name
    if name == "static":
        return [cfg.tasks[t].weight for t in cfg.tasks]
    if name == "realtime":
        return [1.0 / loss.item() for loss in losses]
    assert name == "gradnorm_static"
    return [1.0 / torch.autograd.grad(loss, z, retain_graph=True)[0].norm().item() for loss in losses]


TP, MIXED = ("task_parallel", ("face", "digits")), ("mixed", ("face", "person", "digits"))
STEP_CASES = [
    (0, *TP, 1, "static"), (1, *TP, 1, "static"), (2, *TP, 1, "static"), (3, *TP, 1, "static"),
    (0, *MIXED, 1, "static"), (1, *MIXED, 1, "static"), (2, *MIXED, 1, "static"), (3, *MIXED, 1, "static"),
    (2, *MIXED, 2, "static"),
    # weights from every task's loss or gradient norm, all-reduced across ranks
    (1, *TP, 1, "realtime"), (0, *TP, 1, "gradnorm_static"), (3, *TP, 1, "gradnorm_static"),
    (2, *MIXED, 2, "gradnorm_static"),
    # learned paths: every block open, Gumbel straight-through gates, the logits' own lr, a path cost
    (0, *MIXED, 1, "learned"), (3, *MIXED, 2, "learned"), (1, *TP, 1, "learned"),
    # the re-id recipe: BNNeck and batch-hard triplet loss, each rank normalizing and mining its own slice
    (0, *TP, 1, "reid"), (1, *MIXED, 1, "reid"), (3, *MIXED, 2, "reid"),
    # every task its own micro-batch and input size; mixup and cutmix for the classification task
    (0, *TP, 1, "batches"), (3, *MIXED, 2, "batches"),
    # from a pretrained ViT: every rank's start is timm's weights (ZeRO-3: loaded into the partitions)
    (1, *TP, 1, "pretrained"), (3, *MIXED, 1, "pretrained"),
    # activation checkpointing under ZeRO-3 (the recompute fetches the blocks' partitions again)
    (3, *MIXED, 2, "checkpointing"),
    # torch.compile (inductor on CPU) under ZeRO 2
    (2, *MIXED, 1, "compile")]


def step_run(tmp_path: Path, case: tuple) -> dict:
    stage, layout, tasks, accumulation, weighting = case
    # replicated: every rank holds every task (tests/test_placement.py covers task_sharded)
    raw = tiny_run(tmp_path, tasks, steps=1, layout=layout, optimizer="sgd", momentum=0.0, lr=0.5,
                   warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, gradient_clipping=0.0,
                   gradient_accumulation_steps=accumulation, weighting={"name": weighting}, placement="replicated")
    raw["tasks"]["digits"]["weight"] = 2.0
    raw["deepspeed"] = {"zero_stage": stage}
    if weighting == "learned":
        raw["train"].update(weighting={"name": "static"}, path_policy="learned",
                            path={"lr": 0.3, "task_block_cost": 0.05})
    if weighting == "batches":
        raw["train"]["weighting"] = {"name": "static"}
        for task, batch in (("face", 4), ("person", 9), ("digits", 5)):
            if task in raw["tasks"]:
                raw["tasks"][task]["micro_batch_size"] = batch
        raw["tasks"]["digits"].update(augment={"mixup": 0.8, "cutmix": 1.0}, label_smoothing=0.1, img_size=12)
        if "person" in raw["tasks"]:  # and its own input size: face 16 x 16, person 16 x 8, digits 12 x 12
            raw["tasks"]["person"]["img_size"] = [16, 8]
    if weighting == "pretrained":  # the start: a timm ViT's weights, read as released ones are (tests/test_pretrained.py)
        from test_pretrained import released

        name = "vit_tiny_patch16_224.augreg_in21k"
        file = released(name, tmp_path / "released.safetensors")
        raw["model"] = {"pretrained": name, "pretrained_file": str(file), "depth": 4, "img_size": 16, "patch_size": 4,
                        "task_ffn_init": "random"}
        raw["train"].update(weighting={"name": "static"}, lr=0.05)  # 192 wide: a smaller step, same test
    if weighting == "compile":  # every block's attention and FFNs through torch.compile, in the engine
        raw["train"].update(weighting={"name": "static"}, compile=True, lr=0.05)  # fused kernels: other rounding
    if weighting == "checkpointing":  # blocks 0 and 2 recomputed in the backward, two input sizes
        raw["train"].update(weighting={"name": "static"}, activation_checkpointing=2)
        raw["tasks"]["person"]["img_size"] = [16, 8]
    if weighting == "reid":  # a BNNeck over a slice of 6 rows scales gradients up: a smaller step, same test
        raw["train"].update(weighting={"name": "static"}, lr=0.05)
        for task, margin in (("face", 0.3), ("person", 0.0)):  # a hard margin and the soft one
            if task in raw["tasks"]:
                raw["tasks"][task].update(neck="bnneck", triplet={"weight": 1.5, "margin": margin},
                                          id_loss_weight=0.5, sampler="pk", instances=3)  # P 2 x K 3
    return raw


ELASTIC = ("elastic",)  # the ZeRO-3 elastic run below, trained with the step cases


def elastic_run(tmp_path: Path) -> dict:
    raw = tiny_run(tmp_path, ("face", "digits"), steps=3, layout="task_parallel")
    raw["tasks"]["face"]["elastic"] = {"depths": [2], "mlp_ratios": [1.0], "num_heads": [1]}  # only face is elastic
    raw["deepspeed"] = {"zero_stage": 3}
    return raw


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory):
    # every 2-rank run of this module's step cases (both layouts) and the elastic run, trained in turn by
    # one pair of processes
    return SharedRuns(tmp_path_factory.mktemp("steps"),
                      lambda where, case: elastic_run(where) if case == ELASTIC else step_run(where, case),
                      lambda case: STEP_CASES + [ELASTIC], world=2)


@pytest.mark.dist
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"zero{c[0]}-{c[1]}-accum{c[3]}-{c[4]}")
def test_one_distributed_step_equals_one_big_process(step_runs, case):
    raw, replicas = step_runs.get(case)
    accumulation = case[3]
    expected = reference_step(raw, 2, accumulation)
    moved = 0
    for name, want in expected.items():
        for rank, params in enumerate(replicas):
            diff = (params[name] - want.detach()).abs().max().item()
            assert diff < 2e-5, f"{name} on rank {rank} differs by {diff}"
        # replicas identical, task-specific parameters included
        assert torch.equal(replicas[0][name], replicas[1][name]), name
        moved += int(not torch.equal(replicas[0][name], init_params(raw)[name]))
    assert moved > len(expected) // 2  # the step really moved most parameters
    ckpt = read_checkpoint(raw["train"]["out_dir"])  # and export's reader consolidates the same weights
    for name, want in expected.items():
        assert (ckpt.state_dict[name] - want.detach()).abs().max().item() < 2e-5, name


@pytest.mark.dist
@pytest.mark.parametrize("case", [c for c in STEP_CASES if c[4] == "reid"],
                         ids=lambda c: f"zero{c[0]}-{c[1]}-accum{c[3]}")
def test_a_bnnecks_running_statistics_are_the_same_on_every_rank_and_checkpointed(step_runs, case):
    raw, replicas = step_runs.get(case)
    ckpt = read_checkpoint(raw["train"]["out_dir"])
    stats = [k for k in replicas[0] if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:  # each rank normalized its own slice; their statistics were averaged before the save
        assert torch.equal(replicas[0][key], replicas[1][key]), key
        assert torch.allclose(ckpt.state_dict[key], replicas[0][key]), key
        assert not torch.equal(replicas[0][key], torch.zeros_like(replicas[0][key]) if "mean" in key
                               else torch.ones_like(replicas[0][key])), key  # and they moved


_init_cache: dict = {}


def init_params(raw: dict) -> dict:
    from ufo.checkpoint import init_supernet

    key = str(raw["tasks"]) + str(raw["model"]) + raw["train"].get("path_policy", "fixed")
    if key not in _init_cache:
        cfg = config_from_dict(raw, "test")
        torch.manual_seed(cfg.train.seed)
        _init_cache[key] = {n: p.detach() for n, p in init_supernet(cfg).named_parameters()}
    return _init_cache[key]


# what an in-process one-rank run leaves in this process's environment (GLOO_SOCKET_IFNAME: lo)
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GLOO_SOCKET_IFNAME")


def launch(args: list[str], log: Path) -> subprocess.Popen:
    # in-process training in earlier tests left this process's one-rank group in the environment
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)


def torchrun(config: Path, out: Path, *sets: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(29500 + os.getpid() % 400), "-m", "ufo.cli", "train", str(config),
            "--set", f"train.out_dir={out}", *[a for s in sets for a in ("--set", s)]]


def final_weights(out: Path) -> dict:
    return read_checkpoint(out).state_dict


def kill_9_at(args: list[str], log: Path, marker: Path) -> None:
    """Launch, and once `marker` exists kill the launcher's process group and its ranks (torchrun
    starts them in sessions of their own) with SIGKILL: no goodbye."""
    first = launch(args, log)
    deadline = time.time() + 600
    while not marker.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), log.read_text()[-3000:]
    ranks = psutil.Process(first.pid).children(recursive=True)
    os.killpg(first.pid, signal.SIGKILL)
    for proc in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    first.wait()


@pytest.mark.dist
def test_kill_9_and_resume_equals_the_straight_run(tmp_path):
    import yaml

    raw = tiny_run(tmp_path, ("face", "person", "digits"), steps=16, checkpoint_every=4, eval_every=0,
                   layout="mixed", keep_checkpoints=20)
    raw["model"]["drop_path_rate"] = 0.1  # RNG state must be restored too
    raw["data"]["num_workers"] = 1
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))

    straight = launch(torchrun(config, tmp_path / "straight"), tmp_path / "straight.log")
    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    kill_9_at(torchrun(config, tmp_path / "cut"), tmp_path / "cut.log",
              tmp_path / "cut" / "checkpoints" / "step00000004" / "ufo.json")
    assert not (tmp_path / "cut" / "checkpoints" / "step00000016" / "ufo.json").exists()

    second = launch(torchrun(config, tmp_path / "cut"), tmp_path / "resume.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", (tmp_path / "resume.log").read_text())
    assert resumed and 4 <= int(resumed.group(1)) < 16
    want, got = final_weights(tmp_path / "straight"), final_weights(tmp_path / "cut")
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_sigusr1_checkpoints_stops_and_resumes(tmp_path):
    import yaml

    raw = tiny_run(tmp_path, ("face", "digits"), steps=400, log_every=1, eval_every=0)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    args = [sys.executable, "-m", "ufo.cli", "train", str(config)]
    run = launch(args, tmp_path / "run.log")
    deadline = time.time() + 300
    while "step 3/" not in (tmp_path / "run.log").read_text() and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGUSR1)
    assert run.wait(timeout=300) == 3
    text = (tmp_path / "run.log").read_text()
    assert "stopped by SIGUSR1" in text
    stopped_at = read_checkpoint(tmp_path / "run").step
    assert 3 <= stopped_at < 400
    again = launch(args + ["--set", f"train.steps={stopped_at + 2}"], tmp_path / "again.log")
    assert again.wait(timeout=300) == 0
    assert f"at step {stopped_at}" in (tmp_path / "again.log").read_text()
    assert read_checkpoint(tmp_path / "run").step == stopped_at + 2


def test_deepspeed_config_from_the_run_config(tiny_cfg):
    from ufo.engine import deepspeed_config

    cfg = config_from_dict({**tiny_cfg.to_dict(), "deepspeed": {
        "zero_stage": 2, "precision": "bf16", "overrides": {"zero_optimization": {"overlap_comm": True}}}}, "t")
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 1.0 and ds["train_micro_batch_size_per_gpu"] == 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA")
def test_fp16_on_a_cpu_is_refused(tiny_cfg):
    from ufo.errors import ConfigError
    from ufo.engine import deepspeed_config

    cfg = config_from_dict({**tiny_cfg.to_dict(), "deepspeed": {"precision": "fp16"}}, "t")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        deepspeed_config(cfg)


def test_lr_schedule_warms_up_then_decays(tiny_cfg):
    from ufo.engine import lr_schedule

    cfg = config_from_dict({**tiny_cfg.to_dict(), "train": {"steps": 110, "warmup_steps": 10,
                                                            "min_lr_ratio": 0.1}}, "t")
    f = lr_schedule(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_param_groups_skip_decay_on_norms_and_apply_layer_decay(tiny_cfg):
    from ufo.model import SupernetViT
    from ufo.engine import param_groups

    cfg = config_from_dict({**tiny_cfg.to_dict(), "train": {"lr": 1.0, "layer_decay": 0.5}}, "t")
    model = SupernetViT.from_config(cfg)
    groups = param_groups(model, cfg)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert lr_of[id(model.pos_embed)] == (0.5 ** 5, 0.0)
    assert lr_of[id(model.blocks[3].mlp.task["face"].fc1.weight)] == (0.5, 0.05)
    assert lr_of[id(model.blocks[3].norm1.weight)] == (0.5, 0.0)
    assert lr_of[id(model.heads["digits"].fc.weight)] == (1.0, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_elastic_policy_follows_the_sandwich_rule():
    from ufo.model.paths import ElasticPolicy

    policy = ElasticPolicy({"face": ((2, 3), (16,)), "digits": ((), ())}, depth=4, hidden=64, seed=1)
    assert policy.sizes_at(0) == {"face": (None, None, None)}  # largest: the full size; digits is not elastic
    assert policy.sizes_at(1) == {"face": (2, 16, None)}  # smallest
    drawn = [policy.sizes_at(s)["face"] for s in range(2, 60, 3)]
    assert set(drawn) <= {(d, h, None) for d in (2, 3, None) for h in (16, None)} and len(set(drawn)) > 2
    assert drawn == [ElasticPolicy({"face": ((2, 3), (16,))}, 4, 64, 1).sizes_at(s)["face"] for s in range(2, 60, 3)]
    # head counts: a third size, drawn after the other two (the depths and widths drawn stay as they were)
    heads = ElasticPolicy({"face": ((2, 3), (16,), (1,))}, 4, 64, 1, heads=2)
    assert heads.sizes_at(1) == {"face": (2, 16, 1)} and heads.sizes_at(0) == {"face": (None, None, None)}
    assert [heads.sizes_at(s)["face"][:2] for s in range(2, 60, 3)] == [d[:2] for d in drawn]
    assert {heads.sizes_at(s)["face"][2] for s in range(2, 60, 3)} == {1, None}
    assert heads.record(heads.sizes_at(1))["elastic_heads"] == {"face": 1}


def test_elastic_config_errors_name_the_key(tiny_config_file):
    from ufo.config import load_config
    from ufo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tasks\.digits\.elastic\.depths: depth 9 is not in 1\.\.4"):
        load_config(tiny_config_file, ["tasks.digits.elastic={depths: [2, 9]}"])
    with pytest.raises(ConfigError, match=r"tasks\.digits\.elastic\.mlp_ratios: ratio 3 is not in \(0, 2\]"):
        load_config(tiny_config_file, ["tasks.digits.elastic={mlp_ratios: [3.0]}"])
    with pytest.raises(ConfigError, match=r"did you mean tasks\.digits\.elastic\.depths"):
        load_config(tiny_config_file, ["tasks.digits.elastic={depth: [2]}"])
    with pytest.raises(ConfigError, match=r"tasks\.digits\.elastic\.num_heads: 3 heads: give 1\.\.2 \(model\.num_heads\)"):
        load_config(tiny_config_file, ["tasks.digits.elastic={num_heads: [3]}"])


@pytest.mark.dist
def test_elastic_training_under_zero3_and_export_at_a_smaller_size(step_runs, tmp_path):
    from ufo.export import export_subnet

    raw, replicas = step_runs.get(ELASTIC)
    run = Path(raw["train"]["out_dir"])
    for name in replicas[0]:
        assert torch.equal(replicas[0][name], replicas[1][name]), name
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["elastic_depth"]["face"] for r in history[:2]] == [4, 2]  # largest, then smallest
    assert [r["elastic_hidden"]["face"] for r in history[:2]] == [64, 32]
    assert [r["elastic_heads"]["face"] for r in history[:2]] == [2, 1]
    result = export_subnet(run, "face", tmp_path / "face-small", depth=2, mlp_ratio=1.0, num_heads=1,
                           log=lambda _: None)
    assert result.max_abs_diff["safetensors"] <= 1e-5


def test_the_step_slices_carry_each_tasks_elastic_size():
    from ufo.model import TaskSlice
    from ufo.train import _slices

    batch = {"slices": [("face", 3), ("digits", 2)], "labels": torch.zeros(5)}
    slices = _slices(batch, ["face", "person", "digits"], {"face": "SSTT", "person": "STST", "digits": "TSSS"},
                     {"face": (2, 16, 1), "digits": (None, None, None)})
    assert slices == [TaskSlice("face", "SSTT", 3, 2, 16, heads=1), TaskSlice("person", "STST", 0),
                      TaskSlice("digits", "TSSS", 2)]


def test_zero3_is_configured_to_the_model_and_overrides_win(tiny_config_file):
    from ufo.config import load_config
    from ufo.engine import deepspeed_config

    zero = deepspeed_config(load_config(tiny_config_file, ["deepspeed.zero_stage=3"]))["zero_optimization"]
    h = 32  # the tiny model's width
    assert zero["sub_group_size"] == zero["stage3_max_live_parameters"] == 16 * h * h
    assert zero["stage3_max_reuse_distance"] == zero["reduce_bucket_size"] == h * h
    mine = load_config(tiny_config_file, ["deepspeed.zero_stage=3",
                                          "deepspeed.overrides.zero_optimization.sub_group_size=1000000000"])
    assert deepspeed_config(mine)["zero_optimization"]["sub_group_size"] == 1_000_000_000
    assert "sub_group_size" not in deepspeed_config(load_config(tiny_config_file))["zero_optimization"]


def test_learned_paths_resume_exactly_are_tracked_and_exported(tmp_path):
    """One process, mixed: a learned run checkpointed at step 4 and resumed to 8 ends where the straight
    run ends (weights, logits, decided blocks); FFN lr scales of 0 freeze what they name; the paths are
    in history and MLflow, drawn in paths.png, and export takes each task's learned path."""
    import shutil

    from mlflow import MlflowClient

    from ufo.export import export_subnet
    from ufo.train import train

    raw = tiny_run(tmp_path, ("face", "digits"), steps=8, checkpoint_every=4, eval_every=0, layout="mixed",
                   keep_checkpoints=5, path_policy="learned", shared_ffn_lr_scale=0.0, log_every=2, plots=True,
                   path={"lr": 0.5, "decide_after": 3, "confidence": 0.6, "task_block_cost": 0.02})
    raw["tasks"]["face"]["ffn_lr_scale"] = 0.0
    raw["tracking"] = {"experiment": "tests", "system_metrics_every": 0}
    lines: list[str] = []
    straight = train(config_from_dict(raw, "test"), log=lines.append)
    assert any(re.match(r"path: task \w+ block \d decided [ST] \(p 0\.\d+\) at step \d", line) for line in lines)
    assert any(re.search(r"paths face=[STst]{4} digits=[STst]{4}", line) for line in lines)
    run = tmp_path / "run"
    cut = tmp_path / "cut"
    shutil.copytree(run, cut, ignore=shutil.ignore_patterns("step00000008", "mlflow.db", "mlartifacts"))
    resumed_raw = copy.deepcopy(raw)
    resumed_raw["train"]["out_dir"] = str(cut)
    resumed_raw["tracking"] = {"enabled": False}
    resumed_lines: list[str] = []
    train(config_from_dict(resumed_raw, "test"), log=resumed_lines.append)
    assert any("resumed from" in line and "at step 4" in line for line in resumed_lines)
    a, b = read_checkpoint(run).state_dict, read_checkpoint(cut).state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:3]
    marker = json.loads(next((run / "checkpoints").glob("step00000008/ufo.json")).read_text())["path_policy"]
    again = json.loads(next((cut / "checkpoints").glob("step00000008/ufo.json")).read_text())["path_policy"]
    assert marker["decided"] == again["decided"] and marker["best"] == again["best"]
    # lr scale 0: FFN-shared and face's FFN-tasks keep their initial values; digits' FFN-tasks learn
    initial = init_params(raw)
    for name, tensor in a.items():
        if ".mlp.shared." in name or ".mlp.task.face." in name:
            assert torch.equal(tensor, initial[name]), name
    assert not torch.equal(a["blocks.0.mlp.task.digits.fc1.weight"], initial["blocks.0.mlp.task.digits.fc1.weight"])
    assert not torch.equal(a["path_logits.face.logits"], initial["path_logits.face.logits"])
    # tracked: every log step's probabilities, the final paths as tags, the heatmap as an artifact
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "path_prob/face/block0")] == [2, 4, 6, 8]
    assert mlrun.data.tags["ufo.learned_path.face"] == marker["best"]["face"]
    assert "paths.png" in {f.path for f in client.list_artifacts(mlrun.info.run_id)}
    assert (run / "paths.png").stat().st_size > 1000
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert records[-1]["path"] == marker["best"] and set(records[-1]["path_prob"]) == {
        f"{t}/block{i}" for t in ("face", "digits") for i in range(4)}
    # export: each task's learned path, said so in its config.json
    logits = a["path_logits.digits.logits"]
    learned = "".join("T" if t > s else "S" for s, t in logits.tolist())
    assert learned == marker["best"]["digits"]
    result = export_subnet(run, "digits", tmp_path / "digits", log=lambda _: None)
    config = json.loads((tmp_path / "digits" / "config.json").read_text())
    assert result.path == learned and config["ufo"]["path"] == learned and config["ufo"]["path_from"] == "learned"
    assert straight.step == 8
