"""A task's evaluation: its eval sets (from the config and the shards' manifests), read on every
rank, measured on one by the task's protocol (`ufo/metrics.py`); a training engine's tasks
evaluated on its ranks (`evaluate_engine`); and `ufo eval`, the same for a checkpoint or an
exported subnet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ufo.checkpoint import load_supernet, read_checkpoint, trained_path
from ufo.distill import load_student
from ufo.config import UfoConfig, config_from_dict
from ufo.data.loader import task_loader
from ufo.data.shards import eval_sets
from ufo.errors import DataError
from ufo.subnet import load_subnet, onnx_forward, subnet_config
from ufo.layout import Layout, task_groups
from ufo.metrics import (PRIMARY, EvalSet, classification, default_protocol, pairs_of, reid, reid_skipped,
                         retrieval, verification)
from ufo.model import TaskSlice

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # outputs, labels, meta (n, len(META_KEYS))


def measure(protocol: str, parts: dict[str, Outputs]) -> dict[str, float]:
    """The protocol's metrics from every part's outputs (all ranks' samples, any order)."""
    if protocol == "reid":
        (q, qid, qm), (g, gid, gm) = parts["query"], parts["gallery"]
        return {**reid(q, qid, qm[:, 0], g, gid, gm[:, 0]), **reid_skipped(qid, qm[:, 0], gid, gm[:, 0]),
                "gallery": len(gid)}
    out, labels, meta = parts["all"]
    if protocol == "classification":
        return {**classification(out, labels), "samples": len(labels)}
    if protocol == "retrieval":
        return {**retrieval(out, labels), "samples": len(labels)}
    return verification(*pairs_of(out, labels, meta))


def primary(sets: Sequence[EvalSet], result: dict[str, float]) -> float:
    """The task's headline number: its protocol's primary metric, the mean over named sets."""
    values = [result[es.key(PRIMARY[es.protocol])] for es in sets]
    return sum(values) / len(values)


def primary_key(cfg, task: str) -> str:
    """The metric name a table of runs shows for `task`: its first eval set's primary metric."""
    sets = eval_sets(cfg, task)
    return sets[0].key(PRIMARY[sets[0].protocol]) if sets else PRIMARY[default_protocol(cfg.tasks[task].kind)]


def evaluate_task(cfg, task: str, forward: Callable[[torch.Tensor], torch.Tensor], *, rank: int = 0,
                  group_size: int = 1, gather: Callable[[Outputs], list | None] | None = None,
                  batch_size: int | None = None, num_workers: int | None = None,
                  sets: Sequence[EvalSet] | None = None, log=None) -> dict[str, float] | None:
    """Every eval set of `task` measured by its protocol. This rank reads its share (`rank` of
    `group_size`) of each part, `forward` maps a batch of images to outputs (called on every batch,
    an empty one included, so ranks stay in step), `gather` returns all ranks' outputs on the rank
    that measures and None on the others (None: one process). Returns the metrics (set-prefixed
    where sets are named), None on ranks that do not measure."""
    flip = cfg.tasks[task].flip_test
    result: dict[str, float] | None = {}
    for es in sets if sets is not None else eval_sets(cfg, task):
        parts: dict[str, Outputs] = {}
        for role, spec in es.parts.items():
            loader = task_loader(cfg, task, rank_in_group=rank, group_size=group_size, train=False,
                                 batch_size=batch_size or cfg.train.eval_batch_size, num_workers=num_workers,
                                 spec=spec, protocol=es.protocol, **({"log": log} if log else {}))
            outs, labels, metas = [], [], []
            for batch in loader:
                images = batch["images"]  # an empty batch keeps its shape (TaskLoader.input_shape)
                out = forward(images)
                if flip:
                    out = out + forward(torch.flip(images, dims=[3]))
                outs.append(out.float().cpu())
                labels.append(batch["labels"])
                metas.append(batch.get("meta", torch.zeros(len(batch["labels"]), 0, dtype=torch.long)))
            mine = (torch.cat(outs), torch.cat(labels), torch.cat(metas))
            everyone = [mine] if gather is None else gather(mine)
            if everyone is not None:
                parts[role] = tuple(torch.cat([p[i] for p in everyone]) for i in range(3))  # type: ignore
        if gather is not None and not parts:
            result = None
            continue
        if result is not None:
            result.update({es.key(k): v for k, v in measure(es.protocol, parts).items()})
    return result


@torch.no_grad()
def evaluate_engine(engine, cfg: UfoConfig, layout: Layout, rank: int, paths: dict[str, str], dtype: torch.dtype,
             say: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Each task on its eval sets and path, by its protocol .

    Replicated: every rank reads its share of every task's eval set (the same number of batches on
    each) and calls the model with a slice of every task, as in training, so ZeRO-3 can gather
    parameters. Task-sharded: each rank evaluates its own task, its share of it among the task's
    ranks. The outputs are gathered on the task's first rank, which measures; every rank gets every
    task's metrics.
    """
    world, tasks = layout.world_size, list(cfg.tasks)
    sharded = layout.placement == "task_sharded"
    module = engine.module
    was_training = module.training
    module.eval()
    results = {}
    for task in layout.tasks_of(rank) if sharded else tasks:
        here = [task] if sharded else tasks
        group = task_groups(layout)[task] if sharded else None
        size = layout.group_size(task) if sharded else world
        first = layout.groups[task][0] if sharded else 0

        def forward(images: torch.Tensor) -> torch.Tensor:
            slices = [TaskSlice(t, paths[t], len(images) if t == task else 0) for t in here]
            return module(images.to(engine.device, dtype=dtype), slices)[here.index(task)]

        def gather(mine):
            everyone: list = [None] * size
            dist.all_gather_object(everyone, mine, group=group)
            return everyone if rank == first else None

        measured = evaluate_task(cfg, task, forward, rank=layout.rank_in_group(task, rank) if sharded else rank,
                                 group_size=size, gather=gather)
        if measured:
            results[task] = measured
    everyone: list = [None] * world  # every rank learns every task's metrics, in config order
    dist.all_gather_object(everyone, results)
    merged = {k: v for part in everyone for k, v in part.items()}
    results = {task: merged[task] for task in tasks if task in merged}
    module.train(was_training)
    if results:
        say("eval: " + " | ".join(f"{task} " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items()) for task, r in results.items()))
    return results


def parse_shards(items: Sequence[str]) -> str | dict[str, str] | None:
    """`--shards SPEC` (one set) or `--shards NAME=SPEC` repeated (query=..., gallery=...; lfw=...)."""
    if not items:
        return None
    named = [i for i in items if "=" in i.split("/")[0]]
    if not named:
        if len(items) > 1:
            raise DataError("--shards: give one SPEC, or NAME=SPEC for each part (query=DIR --shards gallery=DIR)")
        return items[0]
    if len(named) != len(items):
        raise DataError("--shards: give every part as NAME=SPEC, or a single SPEC")
    return dict(i.split("=", 1) for i in items)


def eval_target(target: str | Path, task: str, shards: str | dict[str, str] | None = None,
                protocol: str | None = None, path: str | None = None, batch_size: int = 256, rank: int = 0,
                world: int = 1, log=print) -> dict:
    """`ufo eval`: a training checkpoint (the task's path through the supernet), an exported subnet
    directory (loaded with timm alone: what is deployed is what is measured) or one of its ONNX graphs
    (`model.onnx`, `model.int8.onnx`: run by onnxruntime) on the task's eval sets
    (`shards` replaces them), by its protocol. Under a launcher each rank embeds its share and rank 0
    measures; returns the report (on rank 0; {} elsewhere)."""
    target = Path(target)
    if target.suffix == ".onnx":  # one graph of an exported subnet (fp32 or INT8), run by onnxruntime
        if not target.is_file():
            raise DataError(f"{target}: no such ONNX file")
        config = subnet_config(target.parent)
        info = config["ufo"]
        if info["task"] != task:
            raise DataError(f"{target}: is a graph of task {info['task']!r}'s subnet, not {task!r}")
        raw = _subnet_config(config, task, target.parent)
        what, path = f"subnet {target.name} (onnxruntime)", info["path"]
        forward = onnx_forward(target)
    elif (target / "config.json").is_file() and not (target / "ufo.json").is_file():
        model, config = load_subnet(target)
        info = config["ufo"]
        if info["task"] != task:
            raise DataError(f"{target}: is the subnet of task {info['task']!r}, not {task!r}")
        raw = _subnet_config(config, task, target)
        what, path = "subnet", info["path"]

        def forward(images: torch.Tensor) -> torch.Tensor:
            return model(images)
    else:
        ckpt = read_checkpoint(target, tasks=[task])
        cfg = ckpt.config
        if task not in cfg.tasks:
            raise DataError(f"{ckpt.path}: has no task {task!r} (tasks: {', '.join(cfg.tasks)})")
        raw, what = cfg.to_dict(), f"checkpoint step {ckpt.step}"
        if cfg.distill is not None:  # a student's run: the student, no path
            path, what = None, f"student {cfg.distill.student}, checkpoint step {ckpt.step}"
            supernet = load_student(ckpt)
        else:
            path = (path or trained_path(ckpt, task)[0]).upper()
            supernet = load_supernet(ckpt, held=[task]).eval()

        def forward(images: torch.Tensor) -> torch.Tensor:
            return supernet.forward_task(images, task, path)
    if shards is not None:
        raw["tasks"][task]["eval_shards"] = shards
    if protocol is not None:
        raw["tasks"][task]["protocol"] = protocol
    cfg = config_from_dict(raw, f"ufo eval {target}")
    sets = eval_sets(cfg, task)
    if not sets:
        raise DataError(f"task {task}: no eval shards in {target}'s config; give --shards")
    log(f"ufo eval: {target} ({what}, task {task}, path {path}): "
        + ", ".join(f"{es.name or task} by {es.protocol}" for es in sets) + (f", {world} ranks" if world > 1 else ""))

    def gather(mine):
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        return everyone if rank == 0 else None

    with torch.no_grad():
        result = evaluate_task(cfg, task, forward, rank=rank, group_size=world, gather=gather if world > 1 else None,
                               batch_size=batch_size, num_workers=0, sets=sets)
    if result is None:
        return {}
    return {"target": str(target), "evaluated": what, "task": task, "path": path,
            "sets": {es.name or task: {"protocol": es.protocol, "shards": es.parts} for es in sets},
            "primary": primary(sets, result), "metrics": result}


def _subnet_config(config: dict, task: str, where: Path) -> dict:
    """The smallest ufo config that reads a subnet's eval shards as its training did: its image size
    and preprocessing, the task's kind and classes, the eval shards of the checkpoint it came from."""
    args, info = config["model_args"], config["ufo"]
    pre = info.get("preprocessing") or {}
    eval_shards = None
    source = info.get("source_checkpoint")
    marker = Path(source or "") / "ufo.json"
    if source and marker.is_file():  # the shards the run evaluated on, if that run is still here
        try:
            eval_shards = json.loads(marker.read_text())["config"]["tasks"][task].get("eval_shards")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            eval_shards = None  # an unreadable source only means: give --shards
    kind = info["kind"]
    classes = args.get("num_classes", 2) if kind == "classification" else 2
    depth = args.get("depth", 1)
    size = args.get("img_size", 224)  # an int, or [height, width]
    if "embed_dim" not in args:  # a student of another architecture: only its input matters here
        h, w = pre.get("input_size", [3, 224, 224])[1:]
        size = h if h == w else [h, w]
        args = {"img_size": size, "patch_size": 1, "in_chans": args.get("in_chans", 3), "embed_dim": 8, "depth": 1,
                "num_heads": 1}
        depth = 1
    return {
        "model": {"img_size": size if isinstance(size, int) else size[0], "patch_size": args.get("patch_size", 16),
                  "in_chans": args.get("in_chans", 3), "embed_dim": args["embed_dim"], "depth": depth,
                  "num_heads": args["num_heads"], "mlp_ratio": args.get("mlp_ratio", 4.0)},
        "tasks": {task: {"kind": kind, "num_classes": max(2, classes), "path": "S" * depth,
                         "eval_shards": eval_shards, "img_size": size}},
        "data": {k: pre[k] for k in ("mean", "std", "interpolation", "crop_pct") if k in pre},
    }


def report_path(target: str | Path, task: str) -> Path:
    """Where `ufo eval` writes its JSON by default: in the subnet directory (an ONNX graph: named for
    it), the training run's directory (for a run, or one of its step directories), or beside a
    supernet file."""
    target = Path(target)
    name = f"eval-{task}.json"
    if target.suffix == ".onnx":  # beside the subnet's own report: eval-TASK-model.int8.json
        return target.parent / f"eval-{task}-{target.stem}.json"
    if target.is_file():
        return target.parent / name
    if (target / "ufo.json").is_file():  # OUT/checkpoints/stepN
        return target.parent.parent / name
    return target / name


def format_report(report: dict) -> str:
    """The report as a table: one row per eval set, its protocol's metrics as columns."""
    lines = []
    metrics = report["metrics"]
    for name, s in report["sets"].items():
        prefix = "" if len(report["sets"]) == 1 and name == report["task"] else f"{name}/"
        row = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
        head = "  ".join(f"{k:>10}" for k in row)
        lines += [f"{name} ({s['protocol']})", f"  {head}",
                  "  " + "  ".join(f"{v:>10.4f}" if isinstance(v, float) else f"{v:>10}" for v in row.values())]
    return "\n".join(lines)
