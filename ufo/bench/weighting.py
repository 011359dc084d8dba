"""`ufo bench weighting`: the config trained once per loss-weighting strategy and compared."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ufo.bench.harness import fresh_runs
from ufo.config import UfoConfig, config_from_dict
from ufo.errors import ConfigError
from ufo.plots import plot_strategies
from ufo.train import train
from ufo.evaluate import primary_key
from ufo.weighting import STRATEGIES


def bench_weighting(cfg: UfoConfig, strategies: Sequence[str], steps: int, out: Path, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the config once per weighting strategy (one process, `mixed` layout, same seed and data)
    and compare: each task's eval metric, seconds per step, weights and losses over time
    (`OUT/<strategy>/history.jsonl`, one figure `OUT/weighting.png`)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"--strategies: unknown {', '.join(unknown)} (known: {', '.join(STRATEGIES)})")
    fresh_runs(out, strategies, overwrite)
    result: dict[str, Any] = {"steps": steps, "tasks": {t: c.kind for t, c in cfg.tasks.items()},
                              "metrics": {t: primary_key(cfg, t) for t in cfg.tasks}, "strategies": {}}
    for name in strategies:
        raw = cfg.to_dict()
        raw["train"].update(steps=steps, out_dir=str(out / name), layout="mixed", eval_every=0, checkpoint_every=0,
                            warmup_steps=min(raw["train"]["warmup_steps"], steps // 2),
                            weighting={"name": name})
        raw["tracking"]["enabled"] = False
        log(f"== {name}")
        start = time.perf_counter()
        run = train(config_from_dict(raw, f"bench weighting ({name})"),
                    log=lambda line: log("   " + line) if line.startswith(("step", "eval")) else None)
        seconds = time.perf_counter() - start
        result["strategies"][name] = {
            "s_per_step": seconds / steps, "eval": run.metrics,
            "final_weight": run.history[-1]["weight"], "final_loss": run.history[-1]["loss"]}
    plot_strategies(out, list(strategies), out / "weighting.png")
    (out / "weighting.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_weighting_bench(r: dict[str, Any]) -> str:
    tasks = list(r["tasks"])
    key = r["metrics"]
    head = f"{'strategy':<16} {'s/step':>7}  " + "  ".join(f"{t + ' ' + key[t]:>18}" for t in tasks) + "  final weights"
    lines = [f"ufo bench weighting: {r['steps']} steps per strategy, one process, mixed layout", head]
    for name, s in r["strategies"].items():
        metrics = "  ".join(f"{s['eval'].get(t, {}).get(key[t], float('nan')):>18.4f}" for t in tasks)
        weights = " ".join(f"{t}={s['final_weight'][t]:.3g}" for t in tasks)
        lines.append(f"{name:<16} {s['s_per_step']:>7.3f}  {metrics}  {weights}")
    return "\n".join(lines)
