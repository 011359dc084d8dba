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
    assert main(["info", str(tiny_config_file), "--zero", "2"]) == 2
    assert "--zero applies to the memory plan" in capsys.readouterr().err
