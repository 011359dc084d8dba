"""The DeepSpeed training loop of the supernet: `train(cfg)`.

Built in order: process group and layout, the run's claim on its directory, data, engine
(`ufo/engine.py`), policies and weighting, resume, history and tracking. Then one loop: batch ->
forward -> per-task losses -> weights -> backward -> step -> log -> maybe eval -> maybe
checkpoint; `_finish` ends the run (plots, bad-data summary, final evaluation, metrics.json).

Gradient semantics (DESIGN.md): under replicated placement every rank passes a slice of every
task to the model, empty for the tasks it does not serve, so every rank calls the same modules in
the same order (what ZeRO-3 requires) and every parameter gets a gradient, zero where unused;
under task_sharded a rank holds and calls its own task only, whose gradients DeepSpeed reduces
among that task's ranks (`ufo/placement.py`). Rank r's loss is
`W * sum_t w_t * (sum of task t's sample losses on r) / N_t`, N_t the step's task t samples over
all ranks: DeepSpeed's average over the W ranks then gives every parameter the gradient of
`sum_t w_t * mean_t loss` over the global batch, exactly what one process would compute. The
weights w_t come from `ufo.weighting`, fed with every task's mean loss over all ranks (one
all-reduce of a few scalars per micro-step), so every rank uses the same weights.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

import ufo
from ufo.checkpoint import (
    MARKER,
    _marker,
    canonical_name,
    check_step_files,
    clean_checkpoints,
    find_training_checkpoint,
    load_centres,
    read_rank_state,
    rng_state,
    save_centres,
    save_training_checkpoint,
    set_rng_state,
    task_of,
)
from ufo.best import improved, read_best, record_best
from ufo.config import UfoConfig, config_changes, data_plan_changes, flatten
from ufo.data import MixedLoader, TaskLoader, endless, label_counts, task_loader
from ufo.data.shards import check_task_data, eval_sets
from ufo.diagnostics import Diagnostics, first_losses
from ufo.ema import FILE as EMA_FILE
from ufo.ema import Ema, save_whole
from ufo.ema import file_of as ema_file_of
from ufo.ema import read_whole as read_ema
from ufo.engine import build_engine
from ufo.errors import UfoError
from ufo.evaluate import evaluate_engine, primary, primary_key
from ufo.layout import Layout, init_distributed, make_layout, task_groups
from ufo.model import SupernetViT, TaskSlice
from ufo.model.paths import OPEN, ElasticPolicy, PathPolicy
from ufo.model.supernet import apply_heads
from ufo.plots import plot_diagnostics, plot_history, plot_paths
from ufo.progress import History, Meter, StepMean, eval_metrics, progress_line, record_metrics
from ufo.reshard import resume_elsewhere
from ufo.runlock import RunDirBusy, RunLock
from ufo.supervise import Stop, report_stopped
from ufo.tracking import Tracker
from ufo.weighting import Observation, Weighting, build_weighting, label_entropy

Log = Callable[[str], None]


@dataclass
class TrainResult:
    step: int
    stopped_by: str | None  # the signal that stopped the run early, after its checkpoint
    checkpoint: Path | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    engine: Any = None  # the DeepSpeed engine, for callers that go on with it (tests, notebooks)
    weighting: Weighting | None = None
    history: list[dict] = field(default_factory=list)  # this process's per-step records (history.jsonl)


@dataclass
class _Run:
    """What the loop's named steps share: the run's parts, built once by `train`."""

    cfg: UfoConfig
    layout: Layout
    rank: int
    out: Path
    say: Log
    loader: Any  # TaskLoader or MixedLoader
    engine: Any
    scheduler: Any
    group_names: list
    policy: PathPolicy
    weighting: Weighting
    dtype: torch.dtype
    tracker: Tracker | None = None
    history: History | None = None
    empty: Counter = field(default_factory=Counter)  # micro-batches with no sample on any rank, skipped alike
    bad_before: dict = field(default_factory=dict)  # the bad data of the run's earlier invocations (all ranks)
    best: dict = field(default_factory=dict)  # train.keep_best: each task's best checkpoint so far (rank 0)
    ema: Ema | None = None  # train.ema: this rank's share of the weights' moving average

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks)


def checkpoint_meta(cfg: UfoConfig, layout: Layout, group_names: list) -> dict:
    """What a checkpoint's marker says of the run that wrote it, for resuming and reading it."""
    d = cfg.deepspeed
    return {"config": cfg.to_dict(), "zero_stage": d.zero_stage, "precision": d.precision,
            "world_size": layout.world_size, "layout": layout.kind, "placement": layout.placement,
            "layout_groups": layout.groups,
            "param_group_names": group_names if d.zero_stage == 0 and d.precision != "fp32" else None}


def train(cfg: UfoConfig, log: Log = print) -> TrainResult:
    """Train the supernet of `cfg` on this process's rank; resume from `train.out_dir` if it holds a checkpoint."""
    first = os.environ.get("RANK", "0") == "0"
    # every shard pattern is checked before anything starts: not found at the first eval, hours later
    check_task_data(cfg, warn=(lambda line: log(f"warning: {line}")) if first else (lambda _: None))
    rank, world, _ = init_distributed(cfg.train.collective_timeout)
    say = log if rank == 0 else (lambda _: None)
    t = cfg.train
    tasks = list(cfg.tasks)
    out = Path(t.out_dir)
    layout = make_layout(cfg, world)
    lock = _claim(out, rank)
    run: _Run | None = None
    status = "FAILED"
    try:
        if rank == 0:
            (out / "config.yaml").write_text(cfg.to_yaml())
        say(f"ufo {ufo.__version__} train: {world} rank{'s' if world > 1 else ''}, "
            f"ZeRO {cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}, out {out}")
        say(layout.describe())

        loader = _make_loader(cfg, layout, rank)
        # a run that resumes takes its checkpoint's weights: the pretrained ones are not read (nor needed)
        resuming = any((out / "checkpoints").glob(f"step*/{MARKER}"))
        engine, scheduler, clip, group_names = build_engine(cfg, layout, rank, say, pretrained=not resuming)
        policy = PathPolicy(t.path_policy, {task: cfg.path_of(task) for task in tasks}, t.seed, t.path_sample_p,
                            steps=t.steps, temperature=(t.path.temperature.start, t.path.temperature.end),
                            decide_after=t.path.decide_after, confidence=t.path.confidence)
        elastic = _elastic_policy(cfg)
        weighting = _make_weighting(cfg, say)
        say(f"loss weighting: {weighting.name}")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.precision, torch.float32)
        run = _Run(cfg, layout, rank, out, say, loader, engine, scheduler, group_names, policy, weighting, dtype)
        features = _capture_features(engine.module) if weighting.needs_grad_norms else None
        diagnostics = _make_diagnostics(cfg, layout, engine, say)
        path_cost = _path_cost(cfg, layout, rank)
        held, device = layout.held(rank), engine.device

        if t.ema is not None:
            run.ema = Ema(engine, t.ema.decay, t.ema.every, t.ema.warmup)
        torch.manual_seed(t.seed + 1 + rank)  # drop path and the like differ between ranks
        step, resume = _resume(run)
        _resume_best(run, resume, step)
        if step >= t.steps:
            say(f"already trained {step} of {t.steps} steps")
        tokens = tokens_per_sample(cfg)
        batches = endless(loader)
        run.history = history = History(out / "history.jsonl", step, write=rank == 0)
        diagnostics.first = first_losses(out / "history.jsonl", tasks) if step > 0 and rank == 0 else None
        result = TrainResult(step, None, resume, engine=engine, weighting=weighting, history=history.records)
        if rank == 0 and cfg.tracking.enabled:
            run.tracker = _open_tracker(cfg, out, resume, layout, weighting, say,
                                        getattr(engine.module, "pretrained_note", ""))
        tracker = run.tracker
        meter = Meter(tasks)
        start_step, started = step, time.perf_counter()

        with Stop() as signals:
            while step < t.steps:
                paths, sizes, gates = policy.paths_at(step), elastic.sizes_at(step), policy.gates_at(step)
                seen = StepMean(len(tasks))
                if diagnostics.due(step + 1):
                    diagnostics.begin(device)
                for _ in range(t.gradient_accumulation_steps):
                    batch, slices, counts = _next_batch(batches, held, paths, sizes, tasks, device, run.empty, gates)
                    images, labels = _on_device(batch, device, dtype)
                    obs, weights, counts = micro_step(engine, images, labels, slices, weighting, world, features,
                                                      tasks, clip, counts, path_cost, diagnostics)
                    seen.add(obs, counts)
                    meter.add(obs, counts)
                step_obs = seen.mean()
                weighting.step(step_obs)
                step += 1
                grad_norm = diagnostics.after_step(engine)
                diagnostics.observe(step_obs.losses)
                measured = diagnostics.finish(step_obs.losses) if diagnostics.due(step) else {}
                if run.ema:
                    run.ema.update(engine, step)
                if policy.name == "learned":
                    _decide_paths(run, step)
                logged = step % t.log_every == 0 or step == t.steps
                record = {**history.record(step, step_obs, weights, weighting, scheduler, tasks),
                          **elastic.record(sizes), **policy.record(step, paths, logged),
                          "global_grad_norm": grad_norm, **measured}
                # any rank's signal stops every rank
                stop = all_ranks_sum(torch.tensor([signals.received or 0]), device, op=dist.ReduceOp.MAX).item()
                if logged:
                    losses = meter.take()
                    say(progress_line(step, t.steps, losses, dict(zip(tasks, weights.tolist())), meter.rate,
                                      scheduler, policy.shown(paths), policy.name,
                                      eta=(time.perf_counter() - started) / (step - start_step) * (t.steps - step),
                                      tokens=tokens, grad_norm=grad_norm))
                    record.update(samples_per_s=meter.rate, tokens_per_s=meter.rate * tokens)
                history.append(record)
                if tracker:
                    tracker.log_metrics(step, record_metrics(record))
                better = {}
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    result.metrics = _evaluate(run, step, policy.eval_paths(step))
                    better = _better(run, result.metrics)
                if step == t.steps or stop or better or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    result.checkpoint = _save(run, step, better)
                if stop:
                    result.step, result.stopped_by = step, _stopped(run, step, int(stop), signals)
                    status = "KILLED"
                    return result
        result.step = step
        result.metrics = _finish(run, step)
        status = "FINISHED"
        return result
    finally:
        _close(run, status)
        lock.release()


def _claim(out: Path, rank: int) -> RunLock:
    """The run's hold on its out_dir (rank 0's lock); a directory a live run holds is refused on every rank."""
    lock = RunLock(out)
    refused = ""
    if rank == 0:
        try:
            lock.acquire()
        except RunDirBusy as e:
            refused = str(e)
    verdict = [refused]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise RunDirBusy(verdict[0])
    return lock


def _on_device(batch: dict, device, dtype: torch.dtype) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """The batch's images (one tensor, or one per slice when the tasks' input sizes differ; an empty
    batch keeps its task's shape, `TaskLoader.input_shape`) and labels."""
    images = batch["images"]
    moved = [x.to(device=device, dtype=dtype) for x in images] if isinstance(images, list) else \
        images.to(device=device, dtype=dtype)
    return moved, batch["labels"].to(device)


def tokens_per_sample(cfg: UfoConfig) -> float:
    """Tokens (patches + class token) per sample, averaged over the tasks by their micro-batches."""
    m, tasks = cfg.model, list(cfg.tasks)
    tokens = [cfg.size_of(t)[0] // m.patch_size * (cfg.size_of(t)[1] // m.patch_size) + 1 for t in tasks]
    batches = [cfg.batch_of(t) for t in tasks]
    return sum(n * b for n, b in zip(tokens, batches)) / sum(batches)


def _decide_paths(run: _Run, step: int) -> None:
    """learned paths: every task's probabilities after this step, and the blocks they decide."""
    probs = path_probs(run.engine.module, run.layout, run.rank, run.tasks, run.engine.device)
    for task, block, letter, p in run.policy.observe(step, probs):
        run.say(f"path: task {task} block {block} decided {letter} (p {p:.3f}) at step {step}: "
                f"from now on only its {'FFN-task' if letter == 'T' else 'FFN-shared'} runs there")


def _sync_running_stats(run: _Run) -> None:
    """Each task's BNNeck running statistics made the mean over the ranks that serve the task, a
    student's BatchNorms' over every rank (each rank's BatchNorm normalizes its own slice, as
    fast-reid's per-GPU BN does, and so tracks its own statistics): what is evaluated and
    checkpointed is the same on every rank."""
    layout, sharded = run.layout, run.layout.placement == "task_sharded"
    buffers = sorted((canonical_name(name), b) for name, b in run.engine.module.named_buffers()
                     if name.endswith(("running_mean", "running_var")))
    if not buffers:
        return
    groups = task_groups(layout) if sharded else {}
    for key, buffer in buffers:
        task = task_of(key)  # None: a shared part's (a student's BatchNorms), every rank's
        serving = layout.groups[task] if task is not None else range(layout.world_size)
        if sharded:  # only the task's ranks hold it
            dist.all_reduce(buffer, group=groups[task])
        else:  # every rank holds it: the others add nothing
            if run.rank not in serving:
                buffer.zero_()
            dist.all_reduce(buffer)
        buffer /= len(serving)


def _evaluate(run: _Run, step: int, paths: dict[str, str]) -> dict[str, dict[str, float]]:
    """Every task's metrics; with train.ema, the moving average's too (as `ema/<metric>`)."""
    _sync_running_stats(run)
    metrics = evaluate_engine(run.engine, run.cfg, run.layout, run.rank, paths, run.dtype, run.say)
    if run.ema:
        with run.ema.applied(run.engine):
            averaged = evaluate_engine(run.engine, run.cfg, run.layout, run.rank, paths, run.dtype,
                                       lambda line: run.say(line.replace("eval:", "eval (ema):", 1)))
        for task, values in averaged.items():
            metrics.setdefault(task, {}).update({f"ema/{k}": v for k, v in values.items()})
    if run.tracker:
        run.tracker.log_metrics(step, eval_metrics(metrics))
    return metrics


def _better(run: _Run, metrics: dict[str, dict[str, float]]) -> dict[str, tuple[str, float]]:
    """train.keep_best: the tasks whose headline metric beats their best so far, the same on every
    rank (rank 0 decides: it holds the metrics)."""
    if not run.cfg.train.keep_best:
        return {}
    better = [improved(run.best, {task: (primary_key(run.cfg, task), primary(eval_sets(run.cfg, task), m))
                                  for task, m in metrics.items()}) if run.rank == 0 else {}]
    dist.broadcast_object_list(better, src=0)
    return better[0]


def _resume_best(run: _Run, resume: Path | None, step: int) -> None:
    """train.keep_best: the bests of the run's earlier invocations, compared with as before (rank 0);
    a best checkpoint whose record a kill prevented is recorded from its marker."""
    if not run.cfg.train.keep_best or run.rank != 0:
        return
    run.best = read_best(run.out / "checkpoints")
    late = {task: (b["metric"], b["value"]) for task, b in
            ((_marker(resume).get("best_of") or {}) if resume else {}).items()
            if run.best.get(task, {}).get("checkpoint") != resume.name}
    if late:
        run.best = record_best(resume.parent, run.best, late, step, resume.name)


def _record_best(run: _Run, step: int, better: dict[str, tuple[str, float]], checkpoint: Path) -> None:
    """After the checkpoint of `step` is complete: best.json names it for the tasks that improved."""
    if not better or run.rank != 0:
        return
    run.best = record_best(checkpoint.parent, run.best, better, step, checkpoint.name)
    run.say("best: " + ", ".join(f"{task} {metric} {value:.4f}" for task, (metric, value) in better.items())
            + f" at step {step} ({checkpoint.name} kept)")
    if run.tracker:
        run.tracker.set_tags({f"ufo.best.{task}.step": step for task in better})
        run.tracker.log_metrics(step, {f"best/{task}/{metric}": value for task, (metric, value) in better.items()})


def _save(run: _Run, step: int, better: dict[str, tuple[str, float]] | None = None) -> Path:
    """A checkpoint of the step: the engine's state, every rank's own state (data position, RNG,
    weighting, the run's bad data so far) and the marker's meta (config, layout, paths, MLflow run,
    the tasks it is the best of); then best.json names it for those tasks."""
    t = run.cfg.train
    _sync_running_stats(run)
    state = {"step": step, "data": run.loader.state_dict(), "rng": rng_state(),
             "weighting": {"name": run.weighting.name, "state": run.weighting.state_dict()},
             "param_groups": run.group_names,  # what resuming on other ranks matches by name
             "bad_data": _bad_data(run), "ema": run.ema.state_dict() if run.ema else None}
    centres = _centres(run)
    writers: list[Callable[[Path], None]] = []
    if run.ema:  # the whole average by name (export --ema, resume elsewhere), assembled by every rank;
        # Partial FC centre shards' averages stay in the ranks' partitions (nothing deploys or evaluates them)
        names = {id(p): canonical_name(n) for n, p in run.engine.module.named_parameters()}
        whole = run.ema.whole(run.engine, names,
                              keep=lambda name: _ema_writer(run.layout, name) == run.rank and name not in centres)
        writers.append(partial(save_whole, whole, ema_file_of(run.rank)))
    if centres:  # each rank's shards of the Partial FC tasks' centres (DeepSpeed's files do not hold them)
        writers.append(partial(save_centres, run.engine, centres, rank=run.rank))
    extra = (lambda where: [write(where) for write in writers]) if writers else None
    meta = {**checkpoint_meta(run.cfg, run.layout, run.group_names),
            "path_policy": run.policy.state_dict(), "weighting": run.weighting.name,
            "mlflow_run_id": run.tracker.run_id if run.tracker else None,
            "mlflow_uri": run.tracker.uri if run.tracker else None,
            "best_of": {task: {"metric": metric, "value": value} for task, (metric, value) in (better or {}).items()},
            "ema_updates": run.ema.updates if run.ema else None}
    saved = save_training_checkpoint(run.engine, run.out / "checkpoints", step, meta, state, run.rank,
                                     t.keep_checkpoints, extra)
    run.say(f"checkpoint {saved}")
    _record_best(run, step, better or {}, saved)
    return saved


def _stopped(run: _Run, step: int, signum: int, signals: Stop) -> str:
    """A run stopped by a signal, after its checkpoint: say so, tell the launch script."""
    name = signal.Signals(signum).name
    why = f" ({signals.reason})" if signals.reason and signals.reason != name else ""
    run.say(f"stopped by {name}{why} at step {step}; rerun the same command to resume")
    report_stopped()
    return name


def _finish(run: _Run, step: int) -> dict[str, dict[str, float]]:
    """The end of a run: history plots (`train.plots`), learned paths, the bad-data summary, the final evaluation
    (`metrics.json`) and their MLflow records. Returns the final metrics ({} for a run of no steps)."""
    out, policy, tracker, say = run.out, run.policy, run.tracker, run.say
    run.history.close()
    if run.rank == 0 and run.history.path.is_file() and run.cfg.train.plots:
        plot_history(run.history.path, out / "weighting.png", title=f"{out.name}: {run.weighting.name} weighting")
        plot_diagnostics(run.history.path, out / "diagnostics.png", title=f"{out.name}: negative-transfer diagnostics")
    if policy.name == "learned":
        say("learned paths: " + " ".join(f"{task}={path}" for task, path in policy.best_paths().items()))
        if run.rank == 0 and run.cfg.train.plots:
            plot_paths(policy, out / "paths.png", title=f"{out.name}: learned paths at step {step}")
        if tracker:
            tracker.set_tags({f"ufo.learned_path.{task}": p for task, p in policy.best_paths().items()})
    bad = _bad_data(run)
    _say_bad_data(bad, say)
    metrics: dict[str, dict[str, float]] = {}
    if run.cfg.train.steps > 0:
        metrics = _evaluate(run, step, policy.eval_paths(max(step - 1, 0)))
        final = run.out / "checkpoints" / f"step{step:08d}"
        if (final / MARKER).is_file():  # the last step's checkpoint, saved by the loop (or an earlier run)
            _record_best(run, step, _better(run, metrics), final)
        if run.rank == 0:
            (out / "metrics.json").write_text(json.dumps({"step": step, "eval": metrics, "bad_data": bad},
                                                         indent=2) + "\n")
    if tracker:
        tracker.log_metrics(step, {f"data/bad/{task}/{reason.replace(' ', '_')}": n
                                   for task, reasons in bad["samples"].items() for reason, n in reasons.items()}
                            | {"data/empty_micro_batches": bad["empty_micro_batches"]})
    return metrics


def _close(run: _Run | None, status: str) -> None:
    """Whatever way the loop ended: the history file closed, MLflow's run given its files and status."""
    if run is None or run.history is None:
        return
    run.history.close()
    if run.tracker:
        for name in ("history.jsonl", "weighting.png", "diagnostics.png", "paths.png", "metrics.json"):
            if (run.out / name).is_file():
                run.tracker.log_artifact(run.out / name)
        run.tracker.close(status)


def _resume(run: _Run) -> tuple[int, Path | None]:
    """Continue from the newest whole checkpoint under OUT/checkpoints, if any: (step, checkpoint)."""
    ckpt_dir = run.out / "checkpoints"
    if run.rank == 0:  # what a save that died left behind
        clean_checkpoints(ckpt_dir, run.say)
    dist.barrier()
    tag_dir = find_training_checkpoint(ckpt_dir, say=lambda line: run.say(f"warning: {line}"))
    if tag_dir is None:
        return 0, None
    layout, rank, world = run.layout, run.rank, run.layout.world_size
    marker = _marker(tag_dir)
    # DeepSpeed's loader unpickles anything: its files are opened weights-only first, a share on each rank
    try:
        check_step_files(tag_dir, rank, world)
        refused = ""
    except UfoError as e:
        refused = str(e)
    verdicts: list = [None] * world
    dist.all_gather_object(verdicts, refused)
    if any(verdicts):
        raise UfoError(next(v for v in verdicts if v))
    replan = _config_changes(run, tag_dir, marker)
    saved = (marker["world_size"], marker.get("placement", "replicated"),
             {t: list(r) for t, r in marker.get("layout_groups", {}).items()})
    if saved == (world, layout.placement, {t: list(r) for t, r in layout.groups.items()}):
        own_lrs = list(run.engine.lr_scheduler.base_lrs)
        run.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=True)
        _own_schedule(run.engine.lr_scheduler, own_lrs)
        load_centres(run.engine, _centres(run), tag_dir, rank)
        state = read_rank_state(tag_dir, rank)
        set_rng_state(state["rng"])
        if run.ema and not run.ema.load_state_dict(state.get("ema") or {}):
            _ema_from_whole(run, tag_dir, marker)
        data = state["data"]
        positions = {task: (data["tasks"][task] if "tasks" in data else data, None) for task in _loaders(run.loader)}
    else:
        state = resume_elsewhere(run.engine, tag_dir, marker, run.cfg, layout, rank, run.say)
        positions = state["data"]
        if run.ema:  # the whole average, re-partitioned as the masters are now
            _ema_from_whole(run, tag_dir, marker)
    next_epoch = {}
    for task, loader in _loaders(run.loader).items():
        position, group_size = positions[task]
        if task in replan:  # the saved position names other samples now: the task starts its next epoch
            next_epoch[task] = int(position["epoch"]) + 1
            loader.load_state_dict({"epoch": next_epoch[task], "batches": 0})
        else:
            loader.load_state_dict(position, group_size=group_size)
    if isinstance(run.loader, MixedLoader):
        mixed = state["data"] if "tasks" in state["data"] else {"epoch": 0, "batches": 0}
        run.loader.epoch, run.loader.position = int(mixed["epoch"]), int(mixed["batches"])
        if replan:
            run.loader.epoch, run.loader.position = run.loader.epoch + 1, 0
    for task, keys in replan.items():
        run.say(f"resume: {', '.join(keys)} changed: task {task}'s saved data position no longer applies; it is "
                f"re-planned from the start of its epoch {next_epoch[task]}")
    saved_weighting = state.get("weighting") or {"name": "static", "state": {}}
    if saved_weighting["name"] == run.weighting.name:
        run.weighting.load_state_dict(saved_weighting["state"])
    else:
        run.say(f"warning: {tag_dir} was trained with {saved_weighting['name']} weighting, this run uses "
                f"{run.weighting.name}: its weighting starts afresh")
    run.bad_before = read_rank_state(tag_dir, 0).get("bad_data") or {}
    run.policy.load_state_dict(marker.get("path_policy") or {})
    step = int(state["step"])
    run.say(f"resumed from {tag_dir} at step {step}")
    return step, tag_dir


def _own_schedule(scheduler, base_lrs: list[float]) -> None:
    """DeepSpeed restores every rank's lr schedule from rank 0's file: under task_sharded a rank whose
    task has other optimizer groups (a Partial FC rank's centres, another task's lr scales) keeps its
    own base lrs, at the restored step."""
    scheduler.base_lrs = base_lrs
    scheduler.lr_lambdas = scheduler.lr_lambdas[:1] * len(base_lrs)
    lrs = [base * scheduler.lr_lambdas[0](scheduler.last_epoch) for base in base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _centres(run: _Run) -> dict:
    """This rank's Partial FC centre shards by name (none unless task_sharded)."""
    if run.layout.placement != "task_sharded":
        return {}
    from ufo.placement import sharded_centres

    return sharded_centres(run.engine.module)


def _ema_writer(layout: Layout, name: str) -> int:
    """The rank that writes a parameter's whole average: rank 0, or under task_sharded the first rank
    of the parameter's task."""
    task = task_of(name)
    return layout.groups[task][0] if layout.placement == "task_sharded" and task else 0


def _ema_from_whole(run: _Run, tag_dir: Path, marker: dict) -> None:
    """The moving average from a checkpoint's whole one (`ema*.safetensors`); without one (trained
    without train.ema) it starts again from the weights, and says so."""
    whole = read_ema(tag_dir)
    if not whole:
        run.say(f"warning: {tag_dir} holds no moving average ({EMA_FILE}): train.ema starts from its weights")
        return
    names = {id(p): canonical_name(n) for n, p in run.engine.module.named_parameters()}
    run.ema.load_whole(run.engine, whole, names, int(marker.get("ema_updates") or 0))


def _config_changes(run: _Run, tag_dir: Path, marker: dict) -> dict[str, list[str]]:
    """The settings changed since the checkpoint, listed in one line; returns the tasks whose data
    position they move (task -> keys), whose data is then re-planned."""
    changes = config_changes(marker.get("config") or {}, run.cfg.to_dict())
    if not changes:
        return {}
    saved_tasks = list((marker.get("config") or {}).get("tasks", {}))
    if saved_tasks and saved_tasks != run.tasks:
        raise UfoError(f"{tag_dir}: was trained on tasks {', '.join(saved_tasks)}, this config has "
                       f"{', '.join(run.tasks)}: a run's tasks cannot change on resume (start a new train.out_dir, "
                       "from it with train.init)")
    run.say(f"resume: the config changed since {tag_dir.name}: "
            + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items()))
    return data_plan_changes(changes, run.tasks)


def _loaders(loader) -> dict[str, TaskLoader]:
    return loader.loaders if isinstance(loader, MixedLoader) else {loader.task: loader}


def _bad_data(run: _Run) -> dict:
    """The run's bad samples per task and reason, summed over every rank (each reads its own part) and
    over the run's earlier invocations, and the empty micro-batches skipped (alike on every rank)."""
    mine = {task: dict(tl.bad_samples) for task, tl in _loaders(run.loader).items()}
    everyone: list = [None] * run.layout.world_size
    dist.all_gather_object(everyone, mine)
    samples: dict[str, Counter] = {}
    for part in everyone + [run.bad_before.get("samples", {})]:
        for task, reasons in part.items():
            samples.setdefault(task, Counter()).update(reasons)
    return {"samples": {task: dict(samples[task]) for task in run.layout.groups if samples.get(task)},
            "empty_micro_batches": run.empty["empty"] + run.bad_before.get("empty_micro_batches", 0)}


def _say_bad_data(bad: dict, say: Log) -> None:
    samples, empty = bad["samples"], bad["empty_micro_batches"]
    if samples or empty:
        say("bad data (all ranks): " + ("; ".join(f"{task}: " + ", ".join(f"{n} {reason}" for reason, n in
                                                                           sorted(r.items(), key=lambda x: -x[1]))
                                                  for task, r in samples.items()) or "no bad samples")
            + (f"; {empty} empty micro-batches skipped" if empty else ""))


def _path_cost(cfg: UfoConfig, layout: Layout, rank: int) -> dict[str, float] | None:
    """learned paths: a task's path cost, added on each rank that holds its logits, so that the
    ranks' gradients average to it."""
    cost = cfg.train.path.task_block_cost if cfg.train.path_policy == "learned" else 0.0
    if not cost:
        return None
    world = layout.world_size
    return {task: cost * world / (layout.group_size(task) if layout.placement == "task_sharded" else world)
            for task in layout.held(rank)}


def _open_tracker(cfg: UfoConfig, out: Path, resume: Path | None, layout: Layout, weighting: Weighting,
                  say: Log, pretrained: str = "") -> Tracker:
    """Rank 0's MLflow run: a resumed training run continues the run its checkpoint names; `pretrained`:
    where the start's weights came from and what was adapted (tag `ufo.pretrained`)."""
    run_id = json.loads((resume / "ufo.json").read_text()).get("mlflow_run_id") if resume else None
    tracker = Tracker(cfg, out, run_id=run_id, say=say, params=flatten(cfg.to_dict()),
                      artifacts=[out / "config.yaml"])
    tracker.set_tags({"ufo.version": ufo.__version__, "ufo.layout": layout.kind, "ufo.world_size": layout.world_size,
                      "ufo.weighting": weighting.name, "ufo.out_dir": str(out.resolve()),
                      "ufo.path_policy": cfg.train.path_policy, **({"ufo.pretrained": pretrained} if pretrained else {}),
                      **{f"ufo.path.{task}": cfg.path_of(task) for task in cfg.tasks},
                      **{f"ufo.ranks.{task}": ",".join(map(str, ranks)) for task, ranks in layout.groups.items()}})
    return tracker


def micro_step(engine, images: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, slices: list[TaskSlice],
               weighting: Weighting, world: int, features: list | None = None, tasks: list[str] | None = None,
               clip: Callable[[], object] | None = None, counts: torch.Tensor | None = None,
               path_cost: dict[str, float] | None = None,
               diagnostics: Diagnostics | None = None) -> tuple[Observation, torch.Tensor, torch.Tensor]:
    """Forward, per-task losses over all ranks, weights, weighted backward and (at the accumulation
    boundary) step.

    `slices` are the tasks this rank holds (all of them, or its own under task_sharded); `tasks`
    all of the run's, in config order (default: the slices'). Returns what the weighting observed
    (identical on every rank), the weights used, and each task's sample count over all ranks.
    `features` collects the pooled features (see `_capture_features`) when the weighting needs
    gradient norms; `clip` clips the reduced gradients before the step (ufo's own clipping).
    `path_cost` (learned paths, `train.path.task_block_cost`): per task, what this rank adds to its
    loss per expected task-specific open block, so that the ranks' gradients average to the cost.
    `diagnostics` takes each task's share of the gradient on the shared parameters (on its diagnostic
    steps) and the global gradient norm where the engine computes none.
    """
    tasks = tasks or [s.task for s in slices]
    T, device = len(tasks), labels.device
    at = torch.tensor([tasks.index(s.task) for s in slices], dtype=torch.long)

    def per_task(values: list) -> torch.Tensor:  # this rank's values of its slices, at their tasks' places
        out = torch.zeros(T, dtype=torch.float64, device=device)
        return out.index_copy(0, at.to(device), torch.stack(values).double().to(device)) if values else out

    # N_t: task t's samples in this micro-step, all ranks (the loop's, where it counted them already)
    if counts is None:
        counts = all_ranks_sum(per_task([torch.tensor(float(s.size)) for s in slices]), device)
    if diagnostics is not None and diagnostics.buffer is not None:  # each task's gradient, unweighted
        share = torch.where(counts > 0, 1.0 / counts.clamp_min(1), 0.0)[at] / engine.gradient_accumulation_steps()
        diagnostics.measure(engine.module, images, slices, labels, share.tolist())
    outputs = engine(images, slices, labels, reduction="sum", hits=weighting.needs_accuracy)
    sums = [o[0] for o in outputs] if weighting.needs_accuracy else outputs
    zeros = torch.zeros(T, dtype=torch.float64, device=device)
    hits = per_task([o[1].to(device) for o in outputs]) if weighting.needs_accuracy else zeros
    per_sample = torch.where(counts > 0, 1.0 / counts.clamp_min(1), 0.0)
    grad_sq = per_task(list(_feature_grad_sq(engine.module, features[0], slices, labels, per_sample[at]))) \
        if weighting.needs_grad_norms else zeros
    # one all-reduce of every task's loss sum, hits and squared gradient norm
    seen = all_ranks_sum(torch.cat([per_task([s.detach().to(device) for s in sums]), hits, grad_sq]), device)
    known = counts > 0
    nan = torch.full((T,), math.nan, dtype=torch.float64)
    obs = Observation(
        losses=torch.where(known, seen[:T] * per_sample, nan),
        grad_norms=torch.where(known, seen[2 * T:].sqrt(), nan) if weighting.needs_grad_norms else None,
        accuracies=torch.where(known, seen[T:2 * T] * per_sample, nan) if weighting.needs_accuracy else None)
    weights = weighting.weights(obs)
    scale = torch.where(known, world * weights * per_sample, 0.0)[at]
    loss = sum(float(c) * s.float() for c, s in zip(scale, sums))
    for s in slices if path_cost else ():  # the expected task-specific blocks among the open ones
        if s.gate is not None:
            is_open = torch.tensor([letter == OPEN for letter in s.path], device=device)
            loss = loss + path_cost[s.task] * engine.module.path_probs[s.task][:, 1].masked_select(is_open).sum()
    engine.backward(loss)
    if engine.is_gradient_accumulation_boundary():
        if diagnostics is not None:
            diagnostics.before_step()
        if clip is not None:
            clip()
    engine.step()
    return obs, weights, counts


def _feature_grad_sq(module: SupernetViT, z: torch.Tensor, slices: list[TaskSlice], labels: torch.Tensor,
                     per_sample: torch.Tensor) -> torch.Tensor:
    """This rank's share of ||d L_t / d z||^2 for every task, L_t its mean loss over all ranks.

    The rows of the pooled features z are the samples, so the ranks' squared row gradients add up
    to the global one. The heads run again on a detached z: a backward through them alone, apart
    from the engine's graph (DeepSpeed allows no second backward through its outputs).
    """
    z = z.detach().requires_grad_()
    losses = apply_heads(module.heads, z, slices, labels, reduction="sum")
    local = sum(float(c) * loss.float() for c, loss in zip(per_sample, losses))
    (grad,) = torch.autograd.grad(local, z, allow_unused=True)
    if grad is None:
        return torch.zeros(len(slices), dtype=torch.float64, device=z.device)
    return torch.stack([rows.double().pow(2).sum() for rows in grad.split([s.size for s in slices])])


def all_ranks_sum(values: torch.Tensor, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A small tensor reduced over all ranks on the engine's device (NCCL reduces no CPU tensors), back on the CPU."""
    values = values.to(device)
    dist.all_reduce(values, op=op)
    return values.cpu()


def _capture_features(module: SupernetViT) -> list:
    """Holds the pooled features every head reads (timm's `head_drop` output) of the latest forward."""
    captured: list = [None]
    module.head_drop.register_forward_hook(lambda _, __, out: captured.__setitem__(0, out))
    return captured


def _make_diagnostics(cfg: UfoConfig, layout: Layout, engine, say: Log) -> Diagnostics:
    """The run's diagnostics (ufo/diagnostics.py): per task under ZeRO 0-2 (ZeRO-3's parameters are
    partitions: not measured, and said so), the global gradient norm always."""
    d, every = cfg.deepspeed, cfg.train.diagnostics_every
    if every and d.zero_stage == 3:
        say("diagnostics: per-task gradients are not measured under ZeRO-3 (its parameters are partitions); "
            "the global gradient norm is")
        every = 0
    own_norm = None
    if d.zero_stage == 0 and d.precision == "fp32":  # the engine computes no norm: ufo's, before the step
        if layout.placement == "task_sharded":
            from ufo.placement import clip_grad_norm

            own_norm = partial(clip_grad_norm, engine.module, math.inf, layout)
        else:  # every rank holds the reduced gradients
            def own_norm() -> float:
                grads = [p.grad.detach().double().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
                return float(torch.stack(grads).sum().sqrt()) if grads else 0.0
    return Diagnostics(engine.module, list(cfg.tasks), every, own_norm)


def _make_weighting(cfg: UfoConfig, say: Log) -> Weighting:
    entropies = None
    if cfg.train.weighting.name == "prior":
        entropies = {}
        for task, tc in cfg.tasks.items():
            counts = label_counts(tc.shards, task)
            if len(counts) < 2:
                raise UfoError(f"task {task}: its shards hold {len(counts)} label(s); prior weighting needs a "
                               "label distribution with some entropy (use another train.weighting.name)")
            entropies[task] = label_entropy(counts)
        say("prior weighting: label entropy " + " ".join(f"{t} {h:.3f}" for t, h in entropies.items()))
    return build_weighting(cfg, entropies)


def _make_loader(cfg: UfoConfig, layout: Layout, rank: int):
    if layout.kind == "mixed":
        return MixedLoader({task: task_loader(cfg, task, rank_in_group=rank, group_size=layout.world_size)
                            for task in cfg.tasks})
    (task,) = layout.tasks_of(rank)
    return task_loader(cfg, task, rank_in_group=layout.rank_in_group(task, rank),
                       group_size=layout.group_size(task))


def _next_batch(batches, held: list[str], paths: dict, sizes: dict, tasks: list[str], device, skipped: Counter,
                gates: dict | None = None, limit: int = 1000):
    """The next micro-batch with a sample on some rank, its slices and every task's count over all ranks.

    A micro-batch that is empty on every rank (all its samples bad, in every task's slice) is skipped
    by every rank alike (the counts are all-reduced) and counted."""
    for _ in range(limit):
        batch = next(batches)
        slices = _slices(batch, held, paths, sizes, gates or {})
        counts = torch.zeros(len(tasks), dtype=torch.float64)
        for s in slices:
            counts[tasks.index(s.task)] = float(s.size)
        counts = all_ranks_sum(counts, device)
        if counts.sum() > 0:
            return batch, slices, counts
        skipped["empty"] += 1
    raise UfoError(f"{limit} micro-batches in a row held no readable sample on any rank: check the shards "
                   "(`ufo data inspect`)")


def _slices(batch: dict, tasks: list[str], paths: dict[str, str],
            elastic: dict[str, tuple[int | None, int | None, int | None]], gates: dict | None = None) -> list[TaskSlice]:
    """A slice of every task, in config order; empty for the tasks this batch does not hold."""
    rows = dict(batch["slices"]) if "slices" in batch else {batch["task"]: len(batch["labels"])}
    gates = gates or {}
    targets = batch.get("targets")  # mixup/cutmix soft targets: a task loader's, or a mixed batch's per task
    if isinstance(targets, torch.Tensor):
        targets = {batch["task"]: targets}
    targets = targets or {}
    slices = []
    for task in tasks:
        depth, hidden, heads = elastic.get(task, (None, None, None))
        slices.append(TaskSlice(task, paths[task], rows.get(task, 0), depth, hidden, gates.get(task),
                                targets.get(task), heads))
    return slices


@torch.no_grad()
def path_probs(module: SupernetViT, layout: Layout, rank: int, tasks: list[str], device) -> dict[str, list[float]]:
    """Every task's probability of FFN-task per block, softmax of its path logits, the same on every
    rank: each task's logits are read on one rank that holds them (the first of its group under
    task_sharded, rank 0 when replicated), and one all-reduce shares them."""
    depth = len(module.blocks)
    mine = torch.zeros(len(tasks), depth, dtype=torch.float64)
    for i, task in enumerate(tasks):
        reader = layout.groups[task][0] if layout.placement == "task_sharded" else 0
        if task in module.path_logits:
            param = module.path_logits[task].logits
            if hasattr(param, "ds_id"):  # ZeRO-3: every rank takes part in the gather
                import deepspeed

                with deepspeed.zero.GatheredParameters([param]):
                    value = param.detach().double().cpu().clone()
            else:
                value = param.detach().double().cpu()
            if rank == reader:
                mine[i] = torch.softmax(value, dim=-1)[:, 1]
    everyone = all_ranks_sum(mine, device)
    return {task: everyone[i].tolist() for i, task in enumerate(tasks)}


def _elastic_policy(cfg: UfoConfig) -> ElasticPolicy:
    m = cfg.model
    sizes = {task: (tc.elastic.depths, tuple(int(m.embed_dim * r) for r in tc.elastic.mlp_ratios),
                    tc.elastic.num_heads)
             for task, tc in cfg.tasks.items() if tc.elastic is not None}
    return ElasticPolicy(sizes, m.depth, int(m.embed_dim * m.mlp_ratio), cfg.train.seed, m.num_heads)
