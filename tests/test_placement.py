"""Task-sharded placement: real DeepSpeed engines on 4 CPU ranks (gloo), each holding the shared
parts and its own task only, against one process on the union of the batches."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from test_train import SharedRuns, init_params, reference_step, tiny_run
from ufo.checkpoint import read_checkpoint, task_of
from ufo.config import config_from_dict
from ufo.errors import ConfigError
from ufo.layout import make_layout

TASKS = ("face", "digits")  # a retrieval head (24-d embedding, 20 centers) and a 10-class one: unequal sizes


def sharded_run(tmp_path, stage: int, ranks: tuple[int, int], accumulation: int = 1, clipping: float = 0.0,
                learned: bool = False, **train) -> dict:
    train = {"steps": 1, "layout": "task_parallel", "placement": "task_sharded", "optimizer": "sgd", "momentum": 0.0,
             "lr": 0.5, "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "gradient_clipping": clipping,
             "gradient_accumulation_steps": accumulation, **train}
    if learned:  # each task's path logits live on its ranks, reduced among them
        train.update(path_policy="learned", path={"lr": 0.3, "task_block_cost": 0.05})
    raw = tiny_run(tmp_path, TASKS, **train)
    for task, n in zip(TASKS, ranks):
        raw["tasks"][task]["ranks"] = n
    raw["tasks"]["digits"]["weight"] = 2.0
    raw["deepspeed"] = {"zero_stage": stage}
    return raw


STEP_CASES = [
    (0, (2, 2), 1, 0.0), (1, (2, 2), 1, 0.0), (2, (2, 2), 1, 0.0),
    # 3 + 1 ranks, heads of unequal size, two micro-steps and a clipping norm that bites
    (0, (3, 1), 2, 0.05), (1, (3, 1), 2, 0.05), (2, (3, 1), 2, 0.05),
    # learned paths
    (0, (2, 2), 1, 0.05, True), (2, (3, 1), 2, 0.0, True)]


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory):
    # the cases of 2 + 2 ranks are trained by one set of 4 processes
    return SharedRuns(tmp_path_factory.mktemp("sharded"), lambda where, case: sharded_run(where, *case),
                      lambda case: [c for c in STEP_CASES if c[1] == case[1]], world=4)


@pytest.fixture(scope="module")
def three_one(tmp_path_factory):
    """Every run of 3 + 1 ranks in this module, trained in turn by one set of 4 processes (the imports
    and the process group paid once): the sharded step cases, the Partial FC step cases, the bf16
    gradnorm run, and the Partial FC resume runs (a straight run, its two halves, a ZeRO-2 one)."""
    cases = ([("step", *c) for c in STEP_CASES if c[1] == (3, 1)] + [("pfc", *c) for c in PFC_CASES]
             + [("gradnorm",)] + [("resume", name) for name in ("zero0", "cut", "resumed", "zero2")])
    return SharedRuns(tmp_path_factory.mktemp("three-one"), _three_one_run, lambda case: cases, world=4)


def _three_one_run(where, case: tuple) -> dict:
    kind, *rest = case
    if kind == "step":
        return sharded_run(where, *rest)
    if kind == "pfc":
        return pfc_run(where, *rest)
    if kind == "gradnorm":
        return gradnorm_run(where)
    return _resume_runs(where.parent / "resume")[rest[0]]


_RESUME_RUNS: dict = {}


def _resume_runs(root) -> dict[str, dict]:
    """The Partial FC resume runs, made once: ZeRO-0 fp32 straight, the same in two halves (the second
    resumes the first's step-2 checkpoint; a constant lr, so the halves' schedule is the straight run's),
    ZeRO-2 bf16 straight."""
    if root not in _RESUME_RUNS:
        zero0, zero2 = partial_fc_run(root / "zero0", 0, "fp32"), partial_fc_run(root / "zero2", 2, "bf16")
        cut = {**zero0, "train": {**zero0["train"], "out_dir": str(root / "zero0" / "cut"), "steps": 2}}
        _RESUME_RUNS[root] = {"zero0": zero0, "cut": cut, "resumed": {**cut, "train": {**cut["train"], "steps": 4}},
                              "zero2": zero2}
    return _RESUME_RUNS[root]


@pytest.mark.dist
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"zero{c[0]}-ranks{c[1][0]}+{c[1][1]}-accum{c[2]}"
                         + ("-learned" if len(c) > 4 else ""))
def test_a_sharded_step_equals_one_big_process(step_runs, three_one, case):
    stage, ranks, accumulation, clipping = case[:4]
    raw, replicas = three_one.get(("step", *case)) if ranks == (3, 1) else step_runs.get(case)
    expected = reference_step(raw, 4, accumulation)
    layout = make_layout(config_from_dict(raw, "test"), 4)
    assert layout.placement == "task_sharded" and [len(r) for r in layout.groups.values()] == list(ranks)
    initial = init_params(raw)
    for rank, params in enumerate(replicas):
        (own,) = layout.tasks_of(rank)
        # the rank holds exactly the shared parts and its own task
        want = {name for name in expected if task_of(name) in (None, own)}
        assert set(params) == want, f"rank {rank}: {sorted(set(params) ^ want)[:4]}"
        assert sum(p.numel() for p in params.values()) == sum(expected[n].numel() for n in want)
        for name in want:
            diff = (params[name] - expected[name].detach()).abs().max().item()
            assert diff < 2e-5, f"{name} on rank {rank} differs by {diff}"
            twin = layout.groups[own][0] if task_of(name) else 0  # a replica of the same tensor
            assert torch.equal(params[name], replicas[twin][name]), f"{name}: rank {rank} vs {twin}"
    moved = sum(not torch.equal(replicas[0][n], initial[n]) for n in replicas[0])
    assert moved > len(replicas[0]) // 2  # the step really moved most parameters
    if clipping:  # the clipping norm bit: the unclipped step lands elsewhere
        unclipped = reference_step({**raw, "train": {**raw["train"], "gradient_clipping": 0.0}}, 4, accumulation)
        assert (unclipped["norm.weight"] - expected["norm.weight"]).abs().max() > 1e-3
    ckpt = read_checkpoint(raw["train"]["out_dir"])  # the consolidator reads shared + every task's expert files
    assert set(ckpt.state_dict) == set(expected)
    for name, want in expected.items():
        assert (ckpt.state_dict[name] - want.detach()).abs().max().item() < 2e-5, name


def test_zero3_is_refused_or_replicated_with_the_reason(tiny_config_file):
    from ufo.config import load_config

    with pytest.raises(ConfigError, match=r"train\.placement: task_sharded is not possible here: DeepSpeed refuses "
                                          r"expert parameters under ZeRO-3"):
        load_config(tiny_config_file, ["train.placement=task_sharded", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"train\.placement: task_sharded needs train\.layout task_parallel"):
        load_config(tiny_config_file, ["train.placement=task_sharded", "train.layout=mixed"])
    with pytest.raises(ConfigError, match=r"bf16 under ZeRO-0"):
        load_config(tiny_config_file, ["train.placement=task_sharded", "deepspeed.precision=bf16"])
    auto = make_layout(load_config(tiny_config_file, ["deepspeed.zero_stage=3"]), 3)
    assert auto.placement == "replicated" and "ZeRO-3" in auto.placement_note
    assert "placement replicated (auto: DeepSpeed refuses" in auto.describe()
    assert make_layout(load_config(tiny_config_file), 3).placement == "task_sharded"
    assert make_layout(load_config(tiny_config_file), 2).placement == "replicated"  # mixed: 2 ranks, 3 tasks
    assert make_layout(load_config(tiny_config_file, ["train.placement=replicated"]), 3).placement == "replicated"


def test_a_subset_supernet_starts_as_the_whole_one(tiny_cfg):
    from ufo.model import SupernetViT

    torch.manual_seed(1)
    whole = SupernetViT.from_config(tiny_cfg).state_dict()
    torch.manual_seed(1)
    part = SupernetViT.from_config(tiny_cfg, held=["person"])
    assert {task_of(k) for k in part.state_dict()} == {None, "person"}
    for key, tensor in part.state_dict().items():
        assert torch.equal(tensor, whole[key]), key
    with pytest.raises(KeyError, match="not held here"):
        from ufo.model import TaskSlice

        part(torch.zeros(1, 3, 16, 16), [TaskSlice("face", "SSTT", 1)])


def launch4(config, out, *sets: str):
    import os
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
            str(29100 + os.getpid() % 400), "-m", "ufo.cli", "train", str(config),
            "--set", f"train.out_dir={out}", *[a for s in sets for a in ("--set", s)]]


@pytest.mark.dist
def test_a_sharded_run_resumed_under_the_replicated_placement_ends_alike_and_exports_alike(tmp_path):
    """4 ranks, 2 tasks x 2, ZeRO 1, task_sharded: 8 steps straight, and from a copy of its step-4
    checkpoint resumed under the replicated placement (its weights and Adam state read by name from
    the task ranks' partitions, not by DeepSpeed's loader): both end alike (within 1e-5), and every
    task's subnet exported from each is the same. (Resume after kill -9: test_train's; bit-for-bit
    resume on the same ranks under task_sharded: the Partial FC resume test.)"""
    import shutil

    import yaml
    from safetensors.torch import load_file

    from test_train import launch
    from ufo.export import export_all_tasks

    raw = tiny_run(tmp_path, TASKS, steps=8, checkpoint_every=4, eval_every=0, layout="task_parallel",
                   keep_checkpoints=20, placement="task_sharded")
    for task in TASKS:
        raw["tasks"][task]["ranks"] = 2
    raw["model"]["drop_path_rate"] = 0.1  # RNG state must be restored too
    raw["deepspeed"] = {"zero_stage": 1}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))

    def run(out: str, log: str, *sets: str):
        proc = launch(launch4(config, tmp_path / out, *sets), tmp_path / log)
        assert proc.wait(timeout=600) == 0, (tmp_path / log).read_text()[-3000:]

    run("straight", "straight.log")
    assert "placement task_sharded" in (tmp_path / "straight.log").read_text()
    shutil.copytree(tmp_path / "straight", tmp_path / "moved")
    for later in (tmp_path / "moved" / "checkpoints").glob("step*"):
        if later.name != "step00000004":
            shutil.rmtree(later)
    run("moved", "moved.log", "train.placement=replicated")
    assert "placement replicated" in (tmp_path / "moved.log").read_text()
    assert "resuming step00000004 of 4 ranks, placement task_sharded" in (tmp_path / "moved.log").read_text()
    want, moved = read_checkpoint(tmp_path / "straight").state_dict, read_checkpoint(tmp_path / "moved").state_dict
    assert set(want) == set(moved)
    for name in want:
        assert (want[name] - moved[name]).abs().max().item() < 1e-5, name
    export_all_tasks(tmp_path / "straight", tmp_path / "sharded-subnets", log=lambda _: None)
    export_all_tasks(tmp_path / "moved", tmp_path / "replicated-subnets", log=lambda _: None)
    for task in TASKS:
        a = load_file(tmp_path / "sharded-subnets" / task / "model.safetensors")
        b = load_file(tmp_path / "replicated-subnets" / task / "model.safetensors")
        assert set(a) == set(b)
        for key in a:
            assert (a[key] - b[key]).abs().max().item() < 1e-5, f"{task}: {key}"


def gradnorm_run(where) -> dict:
    raw = sharded_run(where, 2, (3, 1), steps=3, weighting={"name": "gradnorm"})
    raw["train"].update(optimizer="adamw", lr=1e-3)
    raw["deepspeed"]["precision"] = "bf16"
    raw["tasks"]["face"]["elastic"] = {"depths": [2], "mlp_ratios": [1.0]}
    return raw


@pytest.mark.dist
def test_bf16_gradnorm_and_elastic_under_task_sharding(three_one):
    """3 + 1 ranks, ZeRO 2, bf16: learned gradnorm weights (from every task's gradient norm) agree on
    every rank, an elastic task trains at its sizes, and the consolidated checkpoint holds exactly
    the ranks' fp32 master weights."""
    import json

    raw, replicas = three_one.get(("gradnorm",))
    states = [torch.load(three_one.dirs[("gradnorm",)] / f"weighting{r}.pt") for r in range(4)]
    def same(a, b) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return torch.equal(a, b) if torch.is_tensor(a) else a == b

    assert states[0] and all(same(state, states[0]) for state in states[1:])
    run = Path(raw["train"]["out_dir"])
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"]["face"] > 0 and r["grad_norm"]["digits"] > 0 for r in history)
    assert len({tuple(r["weight"].values()) for r in history}) > 1  # the learned weights moved
    assert [r["elastic_depth"]["face"] for r in history[:2]] == [4, 2]
    ckpt = read_checkpoint(run)
    for rank, params in enumerate(replicas):
        for name, master in params.items():
            assert torch.equal(ckpt.state_dict[name], master.float()), f"{name} (rank {rank})"
    only_face = read_checkpoint(run, tasks=["face"]).state_dict
    assert {task_of(k) for k in only_face} == {None, "face"}


def bf16_run(tmp_path, case: tuple) -> dict:
    raw = tiny_run(tmp_path, ("face", "person", "digits"), steps=2, layout="mixed", lr=1e-3)
    raw["deepspeed"] = {"zero_stage": case[0], "precision": "bf16"}
    return raw


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    return SharedRuns(tmp_path_factory.mktemp("bf16"), bf16_run, lambda case: [(0,), (2,), (3,)], world=2)


@pytest.mark.dist
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_replicated_bf16_checkpoints_read_as_their_fp32_masters(bf16_runs, stage):
    """The one reader of every stage: module files and ZeRO fragment maps (0-2), DeepSpeed's
    consolidation (3), each giving exactly the fp32 masters the ranks train."""
    raw, replicas = bf16_runs.get((stage,))
    ckpt = read_checkpoint(raw["train"]["out_dir"])
    assert set(ckpt.state_dict) == set(replicas[0])
    finer = 0
    for name, master in replicas[0].items():
        got = ckpt.state_dict[name]
        assert got.dtype == torch.float32
        if master.dtype == torch.bfloat16:  # ZeRO-0 keeps its masters out of reach: they round to the weights
            assert torch.equal(got.bfloat16(), master), name
            finer += not torch.equal(got, master.float())
        else:
            assert torch.equal(got, master), name
    assert stage or finer > len(replicas[0]) // 2  # the fp32 masters, not the bf16 weights


# Partial FC: the face task's 20 centres split over its ranks (3 + 1: 7, 7 and 6 rows)
# (stage, sample rate, loss weighting): gradnorm_static reads every task's gradient norm on the pooled
# features (a second pass through the sharded head), dtp every task's training accuracy (its hits)
PFC_CASES = [(0, 1.0, "static"), (1, 1.0, "static"), (2, 1.0, "static"), (2, 0.5, "static"),
             (1, 1.0, "gradnorm_static"), (2, 0.5, "dtp")]


def pfc_run(tmp_path, stage: int, sample_rate: float, weighting: str = "static") -> dict:
    raw = sharded_run(tmp_path, stage, (3, 1), accumulation=2, clipping=0.05 if sample_rate == 1.0 else 0.0,
                      weighting={"name": weighting})
    raw["tasks"]["face"]["partial_fc"] = {"sample_rate": sample_rate}
    return raw


def dense(raw: dict) -> dict:
    """The same run with the dense margin softmax head."""
    out = copy.deepcopy(raw)
    del out["tasks"]["face"]["partial_fc"]
    return out


@pytest.mark.dist
@pytest.mark.parametrize("case", PFC_CASES, ids=lambda c: f"zero{c[0]}-rate{c[1]:g}-{c[2]}")
def test_partial_fc_step_equals_the_dense_head(three_one, case):
    """Each face rank holds its rows of the centres (and nothing of the others'): at sample_rate 1 the
    step (two micro-steps, a clipping norm that bites) equals one process with the whole dense head;
    at 0.5 a shard's rows outside the step's sample keep their values (plain SGD, no decay); the
    accuracies DTP weighs by agree on every rank."""
    stage, rate, weighting = case
    raw, replicas = three_one.get(("pfc", *case))
    if weighting == "dtp":
        kpis = [torch.load(three_one.dirs[("pfc", *case)] / f"weighting{r}.pt")["kpi"] for r in range(4)]
        assert all(torch.equal(k, kpis[0]) for k in kpis) and ((kpis[0] >= 0) & (kpis[0] <= 1)).all()
    cfg = config_from_dict(raw, "test")
    layout = make_layout(cfg, 4)
    name = "heads.face.margin.weight"
    initial = init_params(raw)
    shards = [replicas[r][name] for r in layout.groups["face"]]
    assert [s.shape[0] for s in shards] == [7, 7, 6] and name not in replicas[3]
    whole = torch.cat(shards)
    assert torch.equal(torch.cat([initial[name][:7], initial[name][7:14], initial[name][14:]]), initial[name])
    if rate == 1.0:
        expected = reference_step(dense(raw), 4, 2, initial=initial)
        assert (whole - expected[name].detach()).abs().max() < 2e-5
        for other in ("norm.weight", "blocks.0.attn.qkv.weight", "heads.face.embed.weight"):
            for rank in layout.groups["face"]:
                assert (replicas[rank][other] - expected[other].detach()).abs().max() < 2e-5, other
        assert (whole - initial[name]).abs().max() > 1e-4
    else:
        moved = (whole - initial[name]).abs().amax(dim=1) > 0
        for (start, count) in ((0, 7), (7, 7), (14, 6)):
            assert moved[start:start + count].sum() >= int(rate * count)  # positives and sampled negatives
        assert not moved.all()  # some centres sat the step out
    ckpt = read_checkpoint(raw["train"]["out_dir"])  # the rows put back together, by ufo's centre files
    assert torch.equal(ckpt.state_dict[name], whole)


def spawn(raw: dict, where, world: int) -> list[dict]:
    """Train `raw` on `world` in-process ranks; every rank's parameters and centre optimizer state."""
    import os

    import torch.multiprocessing as mp

    from test_train import _rank_main

    port = 29000 + (os.getpid() + 7 * world + len(str(where))) % 1000
    mp.start_processes(_rank_main, args=(world, port, raw, str(where)), nprocs=world, start_method="spawn")
    return [(torch.load(where / f"params{r}.pt"), torch.load(where / f"centre_states{r}.pt")) for r in range(world)]


def partial_fc_run(root, stage: int, precision: str) -> dict:
    raw = sharded_run(root, stage, (3, 1), steps=4, checkpoint_every=2, keep_checkpoints=5, optimizer="adamw",
                      lr=0.01, weight_decay=0.05, ema={"decay": 0.9})  # a constant lr: halves resume the same
    raw["deepspeed"]["precision"] = precision
    raw["tasks"]["face"]["partial_fc"] = {"sample_rate": 0.5}
    return raw


@pytest.mark.dist
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16")])
def test_partial_fc_resumes_exactly_and_on_other_ranks_and_exports(three_one, tmp_path, stage, precision):
    """Face on 3 ranks with sampled negatives and an EMA, Adam. ZeRO-0 (where DeepSpeed writes one
    optimizer file per task and ufo's centre files carry each shard's moments): resumed from its
    step-2 checkpoint on the same ranks it ends bit for bit where the straight run does (centres,
    their moments, the sampling's RNG). ZeRO-2 bf16 (the centres' masters and moments in DeepSpeed's
    partitions too): resumed on 2 face ranks, each rank's centres and moments are those rows of the
    checkpoint's; the face subnet exports."""
    import shutil

    from ufo.checkpoint import read_centres
    from ufo.export import export_all_tasks

    def trained(name: str) -> tuple[dict, list]:  # the run, and every rank's parameters and centre state
        raw, params = three_one.get(("resume", name))
        where = three_one.dirs[("resume", name)]
        return raw, [(p, torch.load(where / f"centre_states{r}.pt")) for r, p in enumerate(params)]

    root = tmp_path
    raw, straight = trained(f"zero{stage}")
    out = raw["train"]["out_dir"]
    step2 = Path(out) / "checkpoints" / "step00000002"
    assert sorted(p.name for p in step2.glob("centres_rank*")) == [f"centres_rank0000{r}.safetensors" for r in range(3)]
    saved = read_centres(step2, config_from_dict(raw, "test"), ["face"])["heads.face.margin.weight"]
    assert set(saved) == {"param", "exp_avg", "exp_avg_sq"} and saved["param"].shape == (20, 24)

    if stage == 0:
        resumed_raw, resumed = trained("resumed")
        assert (Path(resumed_raw["train"]["out_dir"]) / "checkpoints" / "step00000002").is_dir()
        for rank, ((want, want_states), (got, got_states)) in enumerate(zip(straight, resumed)):
            assert set(want) == set(got)
            for name in want:
                assert torch.equal(want[name], got[name]), f"{name} on rank {rank}"
            for name, states in want_states.items():
                for key in states:
                    assert torch.equal(states[key], got_states[name][key]), f"{name} {key} on rank {rank}"
        return

    shutil.copytree(out, root / "moved")
    shutil.rmtree(root / "moved" / "checkpoints" / "step00000004")
    moved = copy.deepcopy(raw)
    moved["train"].update(out_dir=str(root / "moved"), steps=2)  # already trained: the state as resumed
    moved["tasks"]["face"]["ranks"] = 2
    ranks = spawn(moved, root / "moved-ranks", 3)
    name = "heads.face.margin.weight"
    for rank, (start, count) in ((0, (0, 10)), (1, (10, 10))):
        params, states = ranks[rank]
        assert torch.equal(params[name], saved["param"][start:start + count])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(states[name][key], saved[key][start:start + count]), key

    export_all_tasks(out, root / "subnets", log=lambda _: None)  # the head stays behind, the embedding goes
    assert (root / "subnets" / "face" / "model.safetensors").is_file()
