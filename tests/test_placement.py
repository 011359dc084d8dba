"""Task-sharded placement: real DeepSpeed engines on 4 CPU ranks (gloo), each holding the shared
parts and its own task only, against one process on the union of the batches."""

from __future__ import annotations

import pytest
import torch

from test_train import init_params, reference_step, run_ranks, tiny_run
from ufo.checkpoint import read_checkpoint, task_of
from ufo.config import config_from_dict
from ufo.errors import ConfigError
from ufo.layout import make_layout

TASKS = ("face", "digits")  # a retrieval head (24-d embedding, 20 centers) and a 10-class one: unequal sizes


def sharded_run(tmp_path, stage: int, ranks: tuple[int, int], accumulation: int = 1, clipping: float = 0.0,
                **train) -> dict:
    raw = tiny_run(tmp_path, TASKS, steps=1, layout="task_parallel", placement="task_sharded", optimizer="sgd",
                   momentum=0.0, lr=0.5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                   gradient_clipping=clipping, gradient_accumulation_steps=accumulation, **train)
    for task, n in zip(TASKS, ranks):
        raw["tasks"][task]["ranks"] = n
    raw["tasks"]["digits"]["weight"] = 2.0
    raw["deepspeed"] = {"zero_stage": stage}
    return raw


@pytest.mark.dist
@pytest.mark.parametrize("stage,ranks,accumulation,clipping", [
    (0, (2, 2), 1, 0.0), (1, (2, 2), 1, 0.0), (2, (2, 2), 1, 0.0),
    # 3 + 1 ranks, heads of unequal size, two micro-steps and a clipping norm that bites
    (0, (3, 1), 2, 0.05), (1, (3, 1), 2, 0.05), (2, (3, 1), 2, 0.05)])
def test_a_sharded_step_equals_one_big_process(tmp_path, stage, ranks, accumulation, clipping):
    raw = sharded_run(tmp_path, stage, ranks, accumulation, clipping)
    replicas = run_ranks(raw, tmp_path, world=4)
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
    ckpt = read_checkpoint(tmp_path / "run")  # the consolidator reads shared + every task's expert files
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
