"""Path search: the evolutionary search, and a planted best path found on a real supernet."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tiny import TINY
from ufo.config import config_from_dict
from ufo.errors import UfoError
from ufo.search import evolve, read_path


def test_evolve_climbs_to_a_planted_path_within_its_budget():
    planted = "STTSSTTS"
    asked: list[str] = []

    def evaluate_many(paths):
        asked.extend(paths)
        return [sum(a == b for a, b in zip(p, planted)) / len(planted) for p in paths]

    tried = evolve(evaluate_many, 8, ["SSSSSSSS", "TTTTTTTT"], budget=60, seed=1, log=lambda _: None)
    assert max(tried, key=lambda t: t[1]) == (planted, 1.0)
    assert len(tried) <= 60 and len(asked) == len(set(asked)) == len(tried)  # no path evaluated twice
    again = evolve(evaluate_many, 8, ["SSSSSSSS", "TTTTTTTT"], budget=60, seed=1, log=lambda _: None)
    assert again == tried  # seeded


def test_evolve_stops_at_the_whole_space():
    tried = evolve(lambda ps: [0.0] * len(ps), 3, ["SSS"], budget=100, seed=0, log=lambda _: None)
    assert sorted(p for p, _ in tried) == sorted({f"{a}{b}{c}" for a in "ST" for b in "ST" for c in "ST"})


def planted_checkpoint(tmp_path, planted: str, noise: float = 0.05, ridge: float = 1.0,
                       elastic: dict | None = None):
    """A tiny supernet whose digits head reads the planted path's features well, and the features of
    paths the worse the more blocks they change (FFN-task perturbed by `noise`, a ridge-fitted head)."""
    from ufo.checkpoint import init_supernet, save_supernet
    from ufo.data import open_source, write_task_shards
    from ufo.model import TaskSlice

    source = open_source("synth:shapes", "digits", classes=10, samples=240, image_size=16)
    write_task_shards(source, "digits", tmp_path / "data", kind="classification", maxcount=100, eval_fraction=0.5,
                      log=lambda _: None)
    raw = copy.deepcopy(TINY)
    raw["model"]["depth"] = len(planted)
    if elastic:
        raw["tasks"]["digits"]["elastic"] = elastic
    half = len(planted) // 2  # the trained path: lower half shared
    raw["tasks"] = {"digits": {**raw["tasks"]["digits"], "path": "S" * half + "T" * (len(planted) - half),
                               "shards": str(tmp_path / "data" / "train"),
                               "eval_shards": str(tmp_path / "data" / "eval")}}
    raw["data"] = {"num_workers": 0}
    raw["model"]["ffns"] = "all"  # a supernet file to search: every FFN
    cfg = config_from_dict(raw, "test")
    torch.manual_seed(0)
    model = init_supernet(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:  # every FFN-task far from FFN-shared: each block's choice matters
            for p in block.mlp.task["digits"].parameters():
                p.add_(torch.randn_like(p) * noise)
        from ufo.data import task_loader

        batches = list(task_loader(cfg, "digits", train=False, batch_size=512, num_workers=0))
        x, y = torch.cat([b["images"] for b in batches]), torch.cat([b["labels"] for b in batches])
        z = model.forward_features(x, [TaskSlice("digits", planted, len(y))])
        z1 = torch.cat([z, torch.ones(len(z), 1)], 1)  # least squares onto one-hot labels, bias included
        targets = torch.nn.functional.one_hot(y, 10).float()
        w = torch.linalg.solve(z1.T @ z1 + ridge * torch.eye(z1.shape[1]), z1.T @ targets)
        model.heads["digits"].fc.weight.copy_(w[:-1].T)
        model.heads["digits"].fc.bias.copy_(w[-1])
    return save_supernet(model, cfg, tmp_path / "planted.safetensors")


def test_search_finds_a_planted_path_and_export_takes_it(tmp_path, capsys):
    from ufo.cli import main

    planted = "TSTTST"  # 3 blocks away from the trained path SSSTTT; 64 paths in all
    ckpt = planted_checkpoint(tmp_path, planted)
    out = tmp_path / "search.json"
    assert main(["search", str(ckpt), "--task", "digits", "--budget-evals", "28", "--out", str(out)]) in (0, None)
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["best_path"] == planted, text
    assert result["best"] > max(b["value"] for b in result["baselines"].values())
    assert {b["path"] for b in result["baselines"].values()} == {"SSSSSS", "TTTTTT", "SSSTTT"}
    assert len(result["evaluated"]) <= 28 and f"best path for digits: {planted}" in text
    assert read_path(out, "digits") == planted
    assert main(["export", str(ckpt), "--task", "digits", "--path-from", str(out), "--out",
                 str(tmp_path / "subnet")]) in (0, None)
    assert json.loads((tmp_path / "subnet" / "config.json").read_text())["ufo"]["path"] == planted
    with pytest.raises(UfoError, match="search result of task 'digits', not 'face'"):
        read_path(out, "face")


def test_a_supernet_with_only_its_paths_ffns_is_refused(tmp_path, tiny_cfg):
    from ufo.checkpoint import init_supernet, save_supernet
    from ufo.search import search_path

    ckpt = save_supernet(init_supernet(tiny_cfg), tiny_cfg, tmp_path / "on_path.safetensors")
    with pytest.raises(UfoError, match="holds only the FFNs on its configured paths .* train with "
                                       "train.path_policy: sample"):
        search_path(ckpt, "digits")


@pytest.mark.dist
def test_ranks_of_a_launched_job_share_the_evaluations(tmp_path):
    import os
    import subprocess
    import sys

    from test_train import LAUNCHER_ENV, REPO
    from ufo.cli import main

    ckpt = planted_checkpoint(tmp_path, "TSTTST")
    assert main(["search", str(ckpt), "--task", "digits", "--budget-evals", "28", "--out",
                 str(tmp_path / "one.json")]) in (0, None)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29400 + os.getpid() % 90), "-m", "ufo.cli", "search", str(ckpt), "--task", "digits",
                          "--budget-evals", "28", "--out", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    one, both = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert both["best_path"] == one["best_path"] == "TSTTST"
    assert [e["path"] for e in both["evaluated"]] == [e["path"] for e in one["evaluated"]]
    for a, b in zip(one["evaluated"], both["evaluated"]):
        assert a["value"] == pytest.approx(b["value"], abs=1e-6)


def test_a_budget_is_respected_and_the_pareto_front_exported(tmp_path, capsys):
    from ufo.cli import main
    from ufo.search import candidate_sizes, subnet_params

    ckpt = planted_checkpoint(tmp_path, "TSTT", elastic={"depths": [1, 2, 3], "mlp_ratios": [0.5, 1.0], "num_heads": [1]})
    cfg = __import__("ufo.checkpoint", fromlist=["x"]).read_checkpoint(ckpt).config
    full = subnet_params(cfg, "digits", 4, 2.0)
    budget = subnet_params(cfg, "digits", 2, 1.0)  # excludes the full size and every deeper or wider one
    out = tmp_path / "search.json"
    assert main(["search", str(ckpt), "--task", "digits", "--budget-evals", "30", "--max-params", str(budget),
                 "--out", str(out)]) in (0, None)
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["best_params"] <= budget < full and "Pareto front" in text
    assert all(e["params"] <= budget for e in result["evaluated"])
    fits = {(d, r, n) for d in (1, 2, 3, 4) for r in (0.5, 1.0, 2.0) for n in (1, 2)
            if subnet_params(cfg, "digits", d, r, None if n == 2 else n) <= budget}
    assert {(e["depth"], e["mlp_ratio"], e["num_heads"]) for e in result["evaluated"]} == fits
    assert (4, 2.0, 2) not in fits and (2, 1.0, 1) in fits  # one head of two: fewer parameters at a size
    front = result["pareto"]
    assert front and all(not (o["value"] >= f["value"] and o["params"] <= f["params"] and o["latency_ms"] <=
                                  f["latency_ms"] and o != f and (o["value"], -o["params"], -o["latency_ms"]) !=
                                  (f["value"], -f["params"], -f["latency_ms"]))
                         for f in front for o in result["evaluated"])
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main(["export", str(ckpt), "--task", "digits", "--path-from", str(out), "--out",
                 str(tmp_path / "subnet")]) in (0, None)
    config = json.loads((tmp_path / "subnet" / "config.json").read_text())
    assert config["ufo"]["param_count"] == result["best_params"] <= budget
    assert config["model_args"]["depth"] == result["best_depth"]
    assert config["model_args"]["num_heads"] == (result["best_num_heads"] or 2)

    capsys.readouterr()
    assert main(["search", str(ckpt), "--task", "digits", "--max-params", "1000"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no size fits --max-params 1000" in error
    sizes = candidate_sizes(cfg, "digits")
    assert len(sizes) == 4 * 3 * 2 and all(z.latency_ms > 0 for z in sizes)
    limit = sorted(z.latency_ms for z in sizes)[len(sizes) // 2]
    assert main(["search", str(ckpt), "--task", "digits", "--budget-evals", "12", "--max-latency-ms", str(limit),
                 "--out", str(tmp_path / "fast.json")]) in (0, None)
    fast = json.loads((tmp_path / "fast.json").read_text())
    assert fast["budget"]["max_latency_ms"] == limit
    assert all(e["latency_ms"] <= limit for e in fast["evaluated"]) and fast["best_latency_ms"] <= limit
