"""`ufo bench elastic`: each task's subnet at a quarter, half and all of its size, inherited from one
elastic supernet against the same size trained from scratch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from ufo.bench.harness import fresh_runs
from ufo.checkpoint import load_supernet, read_checkpoint
from ufo.config import UfoConfig, config_from_dict
from ufo.search import PathEvaluator, subnet_params
from ufo.train import train


def bench_elastic(cfg: UfoConfig, steps: int, out: Path, fractions: Sequence[float] = (0.25, 0.5, 1.0),
                  overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Each task's metric at about 25 %, 50 % and 100 % of its full subnet's parameters: inherited from
    one elastic supernet (sandwich training, no retraining) against the same size trained from scratch
    for the same steps (one process, `mixed` layout, same seed and data)."""
    m = cfg.model
    task0 = next(iter(cfg.tasks))
    grid = sorted({(d, r) for d in range(1, m.depth + 1) for r in (m.mlp_ratio / 4, m.mlp_ratio / 2, m.mlp_ratio)},
                  key=lambda z: subnet_params(cfg, task0, *z))
    full = subnet_params(cfg, task0, m.depth, m.mlp_ratio)
    sizes = []
    for f in fractions:  # the grid size whose parameters come closest to the fraction (ties: deeper)
        d, r = min(grid, key=lambda z: (abs(subnet_params(cfg, task0, *z) / full - f), -z[0]))
        sizes.append({"fraction": f, "depth": d, "mlp_ratio": r})
    fresh_runs(out, ["elastic"] + [f"scratch-{s['depth']}-{s['mlp_ratio']:g}" for s in sizes], overwrite)

    def run(raw: dict, name: str) -> Path:
        raw["train"].update(steps=steps, out_dir=str(out / name), layout="mixed", eval_every=0, checkpoint_every=0,
                            warmup_steps=min(raw["train"]["warmup_steps"], steps // 2))
        raw["tracking"]["enabled"] = False
        raw["model"]["ffns"] = "all"  # every FFN, as before model.ffns: the elastic run is what `ufo search` takes
        for task in raw["tasks"].values():
            task["partial_fc"] = None  # mixed: dense heads (Partial FC needs a rank per task)
        log(f"== {name}")
        train(config_from_dict(raw, f"bench elastic ({name})"),
              log=lambda line: log("   " + line) if line.startswith(("step", "eval")) else None)
        return out / name

    raw = cfg.to_dict()
    for task in raw["tasks"].values():
        task["elastic"] = {"depths": sorted({s["depth"] for s in sizes}),
                           "mlp_ratios": sorted({s["mlp_ratio"] for s in sizes})}
    elastic = read_checkpoint(run(raw, "elastic"))
    supernet = load_supernet(elastic)
    result: dict[str, Any] = {"steps": steps, "sizes": sizes, "tasks": {}}
    for s in sizes:
        d, r = s["depth"], s["mlp_ratio"]
        raw = cfg.to_dict()
        raw["model"].update(depth=d, mlp_ratio=r)
        for task in raw["tasks"].values():
            task["path"] = task["path"][:d]
        scratch = read_checkpoint(run(raw, f"scratch-{d}-{r:g}"))
        small = load_supernet(scratch)
        hidden = int(m.embed_dim * r)
        for task in cfg.tasks:
            inherited = PathEvaluator(supernet, elastic.config, task)
            row = result["tasks"].setdefault(task, {"metric": inherited.metric, "sizes": []})
            row["sizes"].append({
                **s, "params": subnet_params(cfg, task, d, r),
                "elastic": inherited(cfg.path_of(task), None if d == m.depth else d,
                                     None if r == m.mlp_ratio else hidden),
                "scratch": PathEvaluator(small, scratch.config, task)(scratch.config.path_of(task))})
    (out / "elastic.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_elastic_bench(r: dict[str, Any]) -> str:
    lines = [f"ufo bench elastic: {r['steps']} steps each; inherited from the elastic supernet vs trained "
             "from scratch at that size",
             f"{'task':<12} {'size':>6} {'depth':>5} {'mlp_ratio':>9} {'params (M)':>10} {'metric':>9} "
             f"{'elastic':>8} {'scratch':>8}"]
    for task, t in r["tasks"].items():
        for s in t["sizes"]:
            lines.append(f"{task:<12} {s['fraction']:>6.0%} {s['depth']:>5} {s['mlp_ratio']:>9g} "
                         f"{s['params'] / 1e6:>10.3f} {t['metric']:>9} {s['elastic']:>8.4f} {s['scratch']:>8.4f}")
    return "\n".join(lines)
