"""`ufo bench deploy`: each way a trained run's task can be deployed small, side by side: its metric (the
task's protocol on its eval sets), parameters and CPU latency (onnxruntime, batch 1 and 32) of the
supernet on the task's path, the exported subnet, its smaller elastic sizes (fewer blocks, fewer heads),
students of two sizes distilled from the subnet and the same students trained alone on the same steps,
and the best of them in INT8; a Pareto plot (metric against latency) and an MLflow run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from ufo.bench.ufo import _train_runs
from ufo.checkpoint import load_supernet, read_checkpoint, trained_path
from ufo.config import UfoConfig
from ufo.distill import distill_config
from ufo.errors import UfoError
from ufo.evaluate import eval_target, primary_key
from ufo.export import export_subnet
from ufo.plots import plot_deploy
from ufo.search import torch_latency_ms
from ufo.subnet import FILES, onnx_session

Log = Callable[[str], None]
BATCHES = (1, 32)


def parse_student(spec: str) -> tuple[str, dict[str, Any]]:
    """`NAME` or `NAME:key=value,key=value` (timm arguments, YAML values) -> (name, arguments)."""
    name, _, rest = spec.partition(":")
    args = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UfoError(f"--student {spec}: give NAME or NAME:key=value,... (e.g. "
                           "vit_tiny_patch16_224:depth=3,embed_dim=64,num_heads=2,patch_size=4)")
        args[key.strip()] = yaml.safe_load(value)
    return name.strip(), args


def default_students(cfg: UfoConfig) -> list[str]:
    """Two ViT students of the supernet's patch size: half its width and depth, and a quarter of its width."""
    m = cfg.model
    half = max(1, m.num_heads // 2)
    return [f"vit_tiny_patch16_224:depth={max(1, m.depth // 2)},embed_dim={m.embed_dim // 2},num_heads={half},"
            f"patch_size={m.patch_size},mlp_ratio={m.mlp_ratio:g}",
            f"vit_tiny_patch16_224:depth={max(1, m.depth // 2)},embed_dim={max(half, m.embed_dim // 4)},"
            f"num_heads={half},patch_size={m.patch_size},mlp_ratio={m.mlp_ratio:g}"]


def onnx_latency_ms(file: Path, shape: Sequence[int], batch: int, runs: int | None = None) -> float:
    """Milliseconds per batch of `batch` images through an ONNX graph on this CPU (onnxruntime, all
    cores): the fastest of `runs` (default 100 for one image, 20 for more) after 3 warm-up runs (other
    load only ever adds time)."""
    runs = runs or (100 if batch == 1 else 20)
    session = onnx_session(file)
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    times = []
    for i in range(runs + 3):
        start = time.perf_counter()
        session.run(None, {"images": x})
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * min(times)


_TIMING = """
import json, sys
from ufo.bench.deploy import BATCHES, onnx_latency_ms
files, shape = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({f: {f"ms_b{b}": onnx_latency_ms(f, shape, b) for b in BATCHES} for f in files}))
"""


def _onnx_latencies(files: Sequence[str], shape: Sequence[int]) -> dict[str, dict[str, float]]:
    """Every graph's latencies, measured in a process of their own: torch's worker threads, still
    spinning after this process's training and evaluation, would take the cores from onnxruntime's."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _TIMING, json.dumps(list(files)), json.dumps(list(shape))],
                         capture_output=True, text=True)
    if run.returncode:
        raise UfoError(f"timing the ONNX graphs failed: {run.stderr.strip().splitlines()[-1] if run.stderr else ''}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def bench_deploy(run: Path, task: str, out: Path, students: Sequence[str] | None = None, steps: int | None = None,
                 launcher: str | None = None, jobs: int = 1, log: Log = print,
                 track_uri: str | None = None) -> dict[str, Any]:
    """The deployment table of `task` from the trained run `run` (a run directory or checkpoint); the
    students' runs, exports and the table's files go to `out`."""
    ckpt = read_checkpoint(run, tasks=[task])
    cfg = ckpt.config
    if task not in cfg.tasks:
        raise UfoError(f"{ckpt.path}: has no task {task!r} (tasks: {', '.join(cfg.tasks)})")
    if cfg.distill is not None:
        raise UfoError(f"{ckpt.path}: is a student's run; give the supernet's run")
    if not cfg.tasks[task].eval_shards:
        raise UfoError(f"task {task}: tasks.{task}.eval_shards is not set; the table measures every model on them")
    out.mkdir(parents=True, exist_ok=True)
    shape = (cfg.model.in_chans, *cfg.size_of(task))
    metric = primary_key(cfg, task)
    path = trained_path(ckpt, task)[0]
    rows: dict[str, dict[str, Any]] = {}
    quiet: Log = lambda _: None  # noqa: E731

    def measured(target: Path) -> float:  # every model on the run's eval sets, by the task's protocol
        return eval_target(target, task, cfg.tasks[task].eval_shards, log=quiet)["primary"]

    def deployed(name: str, directory: Path, source: str, **extra) -> None:
        onnx = directory / FILES["onnx"]
        config = json.loads((directory / "config.json").read_text())
        rows[name] = {"kind": "onnx", "source": source, "params": config["ufo"]["param_count"],
                      "metric": measured(onnx), "file": str(onnx), "dir": str(directory), **extra}
        log(f"  {name:<28} {rows[name]['params'] / 1e6:7.3f} M  {metric} {rows[name]['metric']:.4f}")

    log(f"ufo bench deploy: task {task} of {ckpt.path} (step {ckpt.step}, path {path}), {metric} on its eval sets")
    supernet = load_supernet(ckpt, held=[task]).eval()
    rows["supernet (task path)"] = {
        "kind": "torch", "source": str(ckpt.path), "params": sum(p.numel() for p in supernet.parameters()),
        "metric": measured(Path(run)),
        **{f"ms_b{b}": torch_latency_ms(lambda x: supernet.forward_task(x, task, path), shape, b) for b in BATCHES}}
    export_subnet(ckpt, task, out / "subnet", formats=["safetensors", "onnx"], overwrite=True, log=quiet)
    deployed("subnet", out / "subnet", str(ckpt.path))
    for name, size in _smaller_sizes(cfg, task).items():
        directory = out / name.split(" (")[0].replace(" ", "-")
        export_subnet(ckpt, task, directory, formats=["safetensors", "onnx"], overwrite=True, log=quiet, **size)
        deployed(name, directory, str(ckpt.path), size=size)

    specs = list(students or default_students(cfg))
    planned: dict[str, tuple[dict, dict, UfoConfig]] = {}
    spec_of: dict[str, str] = {}
    for i, spec in enumerate(specs, 1):
        name, args = parse_student(spec)
        sets = [f"distill.student_args={json.dumps(args)}", "train.eval_every=0", "train.keep_best=false",
                "tracking.enabled=false"] + ([f"train.steps={steps}"] if steps else [])
        for how, weights in (("distilled", []), ("alone", ["distill.logits_weight=0", "distill.embedding_weight=0",
                                                          "distill.relation_weight=0"])):
            label = f"student{i}-{how}"
            teacher = f"distill.teacher={(out / 'subnet').resolve()}"  # the subnet: the supernet's outputs, leaner
            student = distill_config(ckpt.path, task, name, out / label, overrides=sets + weights + [teacher])
            planned[label], spec_of[label] = (student.to_dict(), {}, student), spec
    fresh = {k: v for k, v in planned.items() if not (Path(v[2].train.out_dir) / "metrics.json").is_file()}
    log(f"training {len(fresh)} student runs ({len(planned) - len(fresh)} found done in {out})")
    took = _train_runs(fresh, out, launcher, jobs, log) if fresh else {}
    for label, (_, _, student) in planned.items():
        directory = out / f"{label}-export"
        export_subnet(student.train.out_dir, task, directory, formats=["safetensors", "onnx"], overwrite=True, log=quiet)
        deployed(label, directory, student.train.out_dir, student=spec_of[label], seconds=took.get(label))

    best = max((n for n, r in rows.items() if r["kind"] == "onnx"), key=lambda n: rows[n]["metric"])
    source = rows[best]["source"]
    int8 = export_subnet(source, task, out / "best-int8", formats=["onnx-int8"], overwrite=True, log=quiet,
                         int8={"max_drop": 1.0}, **rows[best].get("size", {}))
    file = out / "best-int8" / FILES["onnx-int8"]
    rows[f"{best} INT8 ({int8.int8.mode})"] = {"kind": "onnx-int8", "source": source, "params": rows[best]["params"],
                                               "metric": int8.int8.int8, "drop": int8.int8.drop, "file": str(file),
                                               "dir": str(out / "best-int8")}
    timed = _onnx_latencies([row["file"] for row in rows.values() if "file" in row], shape)
    for row in rows.values():
        if "file" in row:
            row.update(timed[row["file"]])
    result = {"task": task, "run": str(ckpt.path), "step": ckpt.step, "metric": metric, "path": path,
              "shape": list(shape), "rows": rows, "best": best, "students": specs,
              "distillation_beats_alone": {spec: rows[f"student{i}-distilled"]["metric"] - rows[f"student{i}-alone"]["metric"]
                                           for i, spec in enumerate(specs, 1)}}
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_deploy(result, out / "deploy.png")
    if track_uri is not None:
        _log_deploy(cfg, result, out, track_uri)
    return result


def _smaller_sizes(cfg: UfoConfig, task: str) -> dict[str, dict[str, Any]]:
    """The subnet's smaller sizes the table shows: the task's smallest elastic depth and head count where
    it trained them, else half the blocks and half the heads (exported as they are: not trained at that
    size, which the table says)."""
    m, e = cfg.model, cfg.tasks[task].elastic
    depth = min(e.depths) if e and e.depths else max(1, m.depth // 2)
    heads = min(e.num_heads) if e and e.num_heads else next(n for n in range(max(1, m.num_heads // 2), 0, -1)
                                                            if m.embed_dim % n == 0)
    sizes = {}
    if depth < m.depth:
        sizes[f"subnet depth {depth}" + ("" if e and e.depths else " (untrained)")] = {"depth": depth}
    if heads < m.num_heads:
        sizes[f"subnet heads {heads}" + ("" if e and e.num_heads else " (untrained)")] = {"num_heads": heads}
    return sizes


def _log_deploy(cfg: UfoConfig, r: dict[str, Any], out: Path, uri: str) -> None:
    from ufo.tracking import Tracker, metric_name

    tracking = cfg.tracking.model_copy(update={"enabled": True, "uri": uri, "run_name": f"bench-deploy-{r['task']}",
                                               "experiment": "ufo-bench-deploy", "system_metrics_every": 0})
    tracker = Tracker(cfg.model_copy(update={"tracking": tracking}), out, say=lambda _: None,
                      params={"task": r["task"], "run": r["run"], "students": ";".join(r["students"])})
    tracker.log_metrics(r["step"], {metric_name(f"{name}/{key}"): float(row[key]) for name, row in r["rows"].items()
                                    for key in ("metric", "params", "ms_b1", "ms_b32")})
    for file in ("deploy.json", "deploy.png"):
        tracker.log_artifact(out / file)
    tracker.close()


def format_deploy_bench(r: dict[str, Any]) -> str:
    lines = [f"ufo bench deploy: task {r['task']} of {r['run']} (step {r['step']}), {r['metric']} on its eval sets; "
             f"latency on this CPU ({r['shape'][1]}x{r['shape'][2]} images)",
             f"  {'model':<34} {'runtime':<10} {'params (M)':>10} {r['metric']:>9} {'ms b1':>8} {'ms b32':>8}"]
    for name, row in r["rows"].items():
        lines.append(f"  {name:<34} {row['kind']:<10} {row['params'] / 1e6:>10.3f} {row['metric']:>9.4f} "
                     f"{row['ms_b1']:>8.2f} {row['ms_b32']:>8.2f}")
    for spec, gain in r["distillation_beats_alone"].items():
        lines.append(f"  distilled - alone, {spec}: {gain:+.4f} {r['metric']}")
    return "\n".join(lines)
