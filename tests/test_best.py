"""`train.keep_best`: each task's best checkpoint kept through the rotation, named in best.json,
measured again to the same value, resumed, and exported with `ufo export --best`."""

from __future__ import annotations

import json
import re

import pytest

from test_train import tiny_run
from ufo.best import read_best
from ufo.checkpoint import MARKER, complete_checkpoints
from ufo.cli import main
from ufo.config import config_from_dict
from ufo.errors import ConfigError
from ufo.evaluate import eval_target
from ufo.train import train


def evals(lines: list[str]) -> list[dict[str, float]]:
    """Each evaluation's headline per task, from the run's eval lines (rank1 / top1 / recall@1)."""
    out = []
    for line in lines:
        if line.startswith("eval:"):
            out.append({m.group(1): float(m.group(2)) for m in
                        re.finditer(r"(\w+) (?:rank1|top1|recall@1) ([0-9.]+)", line)})
    return out


def test_each_tasks_best_checkpoint_is_kept_measured_again_resumed_and_exported(tmp_path, capsys):
    raw = tiny_run(tmp_path, ("person", "digits"), steps=6, eval_every=1, checkpoint_every=0, keep_checkpoints=1,
                   keep_best=True, lr=3e-3, layout="mixed")
    lines: list[str] = []
    train(config_from_dict(raw, "test"), log=lines.append)
    checkpoints = tmp_path / "run" / "checkpoints"
    best = read_best(checkpoints)
    seen = evals(lines)
    assert len(seen) == 6 and set(best) == {"person", "digits"}  # five in the loop, one at the end
    for task, entry in best.items():
        values = [e[task] for e in seen]
        assert entry["value"] == pytest.approx(max(values), abs=5e-5)  # the eval lines round to 4 places
        assert entry["step"] == values.index(max(values)) + 1  # the first step it peaked
        assert (checkpoints / entry["checkpoint"] / MARKER).is_file()
        marker = json.loads((checkpoints / entry["checkpoint"] / MARKER).read_text())
        assert marker["best_of"][task]["value"] == entry["value"]
        # the kept checkpoint really is the one that scored it
        again = eval_target(checkpoints / entry["checkpoint"], task, log=lambda _: None)
        assert again["primary"] == pytest.approx(entry["value"], abs=1e-6), task
    # the rotation kept the newest one and the bests, nothing else
    assert {p.name for p in complete_checkpoints(checkpoints)} == \
        {"step00000006"} | {e["checkpoint"] for e in best.values()}

    # resumed for more steps: compared with the same bests, which only ever rise
    raw["train"]["steps"] = 8
    lines = []
    train(config_from_dict(raw, "test"), log=lines.append)
    later = read_best(checkpoints)
    for task in best:
        assert later[task]["value"] >= best[task]["value"]
        assert later[task]["value"] == pytest.approx(max([best[task]["value"]] + [e[task] for e in evals(lines)]),
                                                     abs=5e-5)

    # every task's subnet from its own best checkpoint
    assert main(["export", str(tmp_path / "run"), "--all-tasks", "--best", "--out", str(tmp_path / "subnets")]) == 0
    out = capsys.readouterr().out
    for task, entry in later.items():
        assert f"{task} from {entry['checkpoint']}" in out
        config = json.loads((tmp_path / "subnets" / task / "config.json").read_text())
        assert config["ufo"]["source_checkpoint"].endswith(entry["checkpoint"])
    assert main(["export", str(tmp_path / "data"), "--task", "person", "--best", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoints/best.json" in capsys.readouterr().err


def test_keep_best_needs_every_tasks_eval_shards(tmp_path):
    raw = tiny_run(tmp_path, ("digits",), keep_best=True)
    raw["tasks"]["digits"]["eval_shards"] = None
    with pytest.raises(ConfigError, match=r"tasks\.digits\.eval_shards: train\.keep_best keeps each task's best"):
        config_from_dict(raw, "test")
