"""`train.ema`: the moving average kept in each rank's share of the fp32 masters equals timm's
ModelEmaV3 over the run's weights, step by step; it is evaluated beside them, resumed on another
number of ranks, and exported with `ufo export --ema`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from test_train import SharedRuns, launch, tiny_run
from tiny import write_yaml
from ufo.checkpoint import load_supernet, read_checkpoint
from ufo.cli import main
from ufo.ema import read_whole


def timm_ema(run, steps: range, decay: float, start: ModelEmaV3 | None = None) -> ModelEmaV3:
    """timm's ModelEmaV3 fed the weights of every step's checkpoint, as timm's train.py feeds it."""
    model = load_supernet(read_checkpoint(run / "checkpoints" / f"step{steps[0]:08d}"))
    ema = start or ModelEmaV3(model, decay=decay)
    for step in steps:
        model.load_state_dict(read_checkpoint(run / "checkpoints" / f"step{step:08d}").state_dict)
        ema.update(model, step=step)
    return ema


def assert_ema(run, step: int, ema: ModelEmaV3) -> None:
    saved = read_whole(run / "checkpoints" / f"step{step:08d}")  # every writer's file
    want = dict(ema.module.named_parameters())
    assert set(saved) == {n for n, p in want.items() if p.requires_grad}
    for name, tensor in saved.items():
        assert (tensor - want[name]).abs().max() <= 1e-6, (step, name)


CASES = [(1, "bf16", "replicated"), (3, "bf16", "replicated"), (0, "fp32", "replicated"), (1, "bf16", "task_sharded")]


def ema_run(where, case: tuple) -> dict:
    stage, precision, placement = case
    # task_sharded: a rank per task, each holding the shared parts and its task's (and their average)
    raw = tiny_run(where, ("face", "digits"), steps=4, layout="mixed" if placement == "replicated" else
                   "task_parallel", checkpoint_every=1, keep_checkpoints=50, eval_every=2, ema={"decay": 0.8},
                   placement=placement)
    # ZeRO 1 and 3: each rank holds half of the fp32 masters (ZeRO-3 in sub-groups); fp32 ZeRO 0: the weights
    raw["deepspeed"] = {"zero_stage": stage, "precision": precision}
    return raw


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory):
    # every case's first 4 steps, trained in turn by one pair of processes (task_sharded last)
    return SharedRuns(tmp_path_factory.mktemp("ema"), ema_run, lambda case: CASES, world=2)


@pytest.mark.dist
@pytest.mark.parametrize("stage,precision,placement", CASES)
def test_the_moving_average_is_timms_and_survives_resume_and_export(ema_runs, tmp_path, capsys, stage, precision,
                                                                     placement):
    raw, _ = ema_runs.get((stage, precision, placement))
    run = Path(raw["train"]["out_dir"])
    metrics = json.loads((run / "metrics.json").read_text())["eval"]
    assert "ema/top1" in metrics["digits"] and "top1" in metrics["digits"]  # evaluated beside the weights
    ema = timm_ema(run, range(1, 5), 0.8)
    assert_ema(run, 4, ema)
    # the average is not the weights (decay 0.8 over four steps)
    weights = read_checkpoint(run).state_dict
    assert (read_whole(run / "checkpoints" / "step00000004")["blocks.0.attn.qkv.weight"]
            - weights["blocks.0.attn.qkv.weight"]).abs().max() > 1e-5
    if placement == "task_sharded":  # each task's first rank wrote its task's part
        assert (run / "checkpoints" / "step00000004" / "ema_rank00001.safetensors").is_file()
    if (stage, placement) != (1, "replicated"):
        return  # resume and export: once

    config = write_yaml(tmp_path / "c.yaml", raw)
    proc = launch([sys.executable, "-m", "ufo.cli", "train", str(config), "--set", "train.steps=6"],
                  tmp_path / "b.log")  # resumed on one rank: ema.safetensors re-partitioned
    assert proc.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    log = (tmp_path / "b.log").read_text()
    assert "resuming step00000004 of 2 ranks" in log and "eval (ema): face" in log
    ema = timm_ema(run, range(5, 7), 0.8, start=ema)
    assert_ema(run, 6, ema)

    assert main(["export", str(run), "--task", "digits", "--ema", "--out", str(tmp_path / "subnet")]) == 0
    assert "moving average" in capsys.readouterr().out
    exported = load_file(str(tmp_path / "subnet" / "model.safetensors"))
    averaged = load_file(str(run / "checkpoints" / "step00000006" / "ema.safetensors"))
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], averaged["blocks.0.attn.qkv.weight"])
    assert main(["export", str(tmp_path / "subnet"), "--task", "digits", "--ema", "--out", str(tmp_path / "x")]) == 2
