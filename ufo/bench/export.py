"""`ufo bench export`: the peak memory of exporting a task's subnet from a task-sharded and from a
replicated checkpoint, against the subnet's own size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ufo.bench.harness import join_rank, rank_done, spawn_ranks
from ufo.checkpoint import save_training_checkpoint
from ufo.config import UfoConfig, config_from_dict
from ufo.engine import build_engine
from ufo.layout import init_distributed, leave_distributed, make_layout
from ufo.train import checkpoint_meta


def _checkpoint_rank(rank: int, world: int, port: int, raw: dict, directory: str, out: str) -> None:
    """Write a real training checkpoint of a freshly built engine (no data, no step)."""

    join_rank(rank, world, port)

    init_distributed()
    cfg = config_from_dict(raw, "bench")
    layout = make_layout(cfg, world)
    engine, _, _, names = build_engine(cfg, layout, rank, say=lambda _: None, pretrained=False)
    save_training_checkpoint(engine, Path(directory), 0, checkpoint_meta(cfg, layout, names), {}, rank, keep=1)
    rank_done(out, rank, {})
    leave_distributed()


_EXPORT_PEAK = """
import json, resource, sys
import ufo.export, ufo.checkpoint, ufo.layout
ufo.layout.import_deepspeed()
import deepspeed.runtime.fp16.loss_scaler, deepspeed.runtime.zero.config, deepspeed.utils.tensor_fragment
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
base = rss()
r = ufo.export.export_subnet(sys.argv[1], sys.argv[2], sys.argv[3], formats=["safetensors"], log=lambda _: None)
print(json.dumps({"baseline": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "subnet_params": r.param_count, "diff": r.max_abs_diff["safetensors"]}))
"""


def bench_export(cfg: UfoConfig, task: str | None = None, world: int | None = None, zero: int = 1) -> dict[str, Any]:
    """Peak RSS of exporting one task (safetensors, verified) from a task-sharded and from a
    replicated checkpoint of the same config (fp32, ZeRO `zero`, one rank per task by default),
    above the interpreter's baseline with ufo, torch, timm and deepspeed imported."""
    task = task or next(iter(cfg.tasks))
    world = world or len(cfg.tasks)
    result: dict[str, Any] = {"task": task, "world": world, "zero_stage": zero, "placements": {}, "target": 2.0}
    with tempfile.TemporaryDirectory() as tmp:
        for placement in ("task_sharded", "replicated"):
            raw = cfg.to_dict()
            raw["train"].update(layout="task_parallel", placement=placement)
            raw["deepspeed"].update(zero_stage=zero, precision="fp32")
            directory = Path(tmp) / placement
            spawn_ranks(_checkpoint_rank, (raw, str(directory)), world)
            files = sum(f.stat().st_size for f in next(directory.glob("step*")).iterdir())
            run = subprocess.run([sys.executable, "-c", _EXPORT_PEAK, str(directory), task,
                                  str(Path(tmp) / f"{placement}-subnet")], capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"export from the {placement} checkpoint failed: {run.stderr.strip()[-2000:]}")
            got = json.loads(run.stdout.strip().splitlines()[-1])
            subnet = 4 * got["subnet_params"]
            result["placements"][placement] = {**got, "checkpoint_bytes": files, "subnet_bytes": subnet,
                                               "above_baseline": got["peak"] - got["baseline"],
                                               "ratio": (got["peak"] - got["baseline"]) / subnet}
    return result


def format_export_bench(r: dict[str, Any]) -> str:
    gib = 2 ** 30
    lines = [f"ufo bench export: task {r['task']}, checkpoints of {r['world']} ranks, ZeRO {r['zero_stage']}, fp32; "
             f"peak RSS above the interpreter's baseline, against the subnet's fp32 size (target <= "
             f"{r['target']:g}x)"]
    for placement, p in r["placements"].items():
        verdict = "meets" if p["ratio"] <= r["target"] else "MISSES"
        lines.append(f"  {placement:<13} checkpoint {p['checkpoint_bytes'] / gib:6.2f} GiB  subnet "
                     f"{p['subnet_bytes'] / gib:5.2f} GiB  baseline {p['baseline'] / gib:5.2f} GiB  peak "
                     f"{p['peak'] / gib:5.2f} GiB  above {p['above_baseline'] / gib:5.2f} GiB = {p['ratio']:.2f}x "
                     f"({verdict})")
    return "\n".join(lines)
