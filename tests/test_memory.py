"""The per-rank memory plan of `ufo info --world N --zero K`."""

from __future__ import annotations

import pytest
import torch

from ufo.config import load_config
from ufo.memory import format_plan, memory_plan
from ufo.model import SupernetViT, count_params


def counts(cfg):
    with torch.device("meta"):
        c = count_params(SupernetViT.from_config(cfg), {t: cfg.path_of(t) for t in cfg.tasks})
    return c.total, c.shared, {t.task: t.own for t in c.tasks}


def test_the_plan_follows_what_each_rank_holds(tiny_config_file):
    cfg = load_config(tiny_config_file, ["tasks.face.ranks=2", "tasks.person.ranks=1", "tasks.digits.ranks=1"])
    total, shared, own = counts(cfg)
    plans = memory_plan(cfg, 4, zero=0)
    (replicated,) = plans["replicated"]
    assert (replicated.params, replicated.weights, replicated.gradients) == (total, 4 * total, 4 * total)
    assert replicated.optimizer == 8 * total  # AdamW: two fp32 moments
    sharded = {r.task: r for r in plans["task_sharded"]}
    assert {t: (r.ranks, r.params) for t, r in sharded.items()} == {
        "face": (2, shared + own["face"]), "person": (1, shared + own["person"]), "digits": (1, shared + own["digits"])}
    # ZeRO-1: optimizer state partitioned, shared over the world, a task's over its ranks
    face = {r.task: r for r in memory_plan(cfg, 4, zero=1)["task_sharded"]}["face"]
    assert face.optimizer == pytest.approx(8 * shared / 4 + 8 * own["face"] / 2)
    assert face.weights == 4 * (shared + own["face"])
    # ZeRO-2 with bf16: bf16 weights and partitioned bf16 gradients, fp32 masters with the optimizer state
    bf16 = load_config(tiny_config_file, ["deepspeed.precision=bf16"])
    (row,) = memory_plan(bf16, 3, zero=2)["replicated"]
    assert row.weights == 2 * total and row.gradients == pytest.approx(2 * total / 3)
    assert row.optimizer == pytest.approx(12 * total / 3)


def test_what_cannot_run_says_why(tiny_config_file):
    cfg = load_config(tiny_config_file)
    assert "ZeRO-3" in memory_plan(cfg, 3, zero=3)["task_sharded"]
    assert "mixed" in memory_plan(cfg, 2, zero=1)["task_sharded"]  # 2 ranks for 3 tasks
    text = format_plan(cfg, 6, 1, memory_plan(cfg, 6, zero=1))
    assert "largest rank: replicated" in text and "task_sharded  face" in text


def test_info_prints_the_plan(tiny_config_file, capsys):
    from ufo.cli import main

    assert main(["info", str(tiny_config_file), "--world", "6", "--zero", "2"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per rank: 6 ranks, ZeRO 2" in out and "task_sharded  person" in out
    assert "activations per rank per micro-step" in out and "mixed rank" in out
    assert main(["info", str(tiny_config_file), "--zero", "2"]) == 2
    assert "--zero applies to the memory plan" in capsys.readouterr().err


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_keeps_the_gradients_and_the_plan_counts_what_it_saves(every):
    import copy

    from tiny import TINY
    from ufo.checkpoint import init_supernet
    from ufo.config import config_from_dict
    from ufo.memory import activation_plan, format_activations, saved_activation_bytes
    from ufo.model import TaskSlice

    raw = copy.deepcopy(TINY)
    raw["model"].update(drop_path_rate=0.2, ffns="all")  # drop path: its random draws are replayed
    raw["tasks"]["person"]["img_size"] = [16, 8]
    raw["train"] = {"micro_batch_size": 6}
    counted, grads = {}, {}
    for k in (0, every):
        raw["train"]["activation_checkpointing"] = k
        cfg = config_from_dict(raw, "test")
        model = init_supernet(cfg).train()
        torch.manual_seed(5)
        x = [torch.randn(6, 3, *cfg.size_of(t)) for t in cfg.tasks]
        y = torch.cat([torch.randint(cfg.tasks[t].num_classes, (6,)) for t in cfg.tasks])
        slices = [TaskSlice("face", "SSTT", 6), TaskSlice("person", "STST", 6, depth=3),  # an elastic depth
                  TaskSlice("digits", "TSSS", 6, hidden=40)]  # and width
        torch.manual_seed(7)
        sum(model(x, slices, y)).backward()
        grads[k] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        for t in cfg.tasks:  # what the backward keeps, each task alone
            images = torch.randn(6, 3, *cfg.size_of(t))
            counted[k, t], _ = saved_activation_bytes(
                lambda: model.forward_features(images, [TaskSlice(t, cfg.path_of(t), 6)]), model.parameters())
    assert grads[0].keys() == grads[every].keys()
    for name, g in grads[0].items():
        assert torch.equal(g, grads[every][name]), name
    plan = {a.task: a for a in activation_plan(cfg)}
    for t in cfg.tasks:  # the plan's figures are what autograd keeps (to drop path's per-sample masks)
        assert plan[t].full == pytest.approx(counted[0, t], rel=0.01)
        assert plan[t].checkpointed - plan[t].recompute == pytest.approx(counted[every, t], rel=0.01)
        assert counted[every, t] < counted[0, t] / (1.5 if every == 2 else 4)
    assert plan["person"].size == (16, 8) and plan["person"].batch == 6
    text = format_activations(cfg, list(plan.values()))
    assert f"  {'person':<12} {'16x8 px x 6':>17} {plan['person'].full / 2**20:8.2f} M" in text
