"""`ufo bench ufo`: UFO's headline comparison on any config: every task alone, hard sharing, fixed,
sampled and learned paths, each a plain `ufo train` run measured by the task's protocol.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from ufo.bench.harness import fresh_runs
from ufo.best import read_best
from ufo.config import UfoConfig, config_from_dict
from ufo.diagnostics import summarize
from ufo.errors import ConfigError
from ufo.evaluate import eval_target, primary_key
from ufo.plots import plot_ufo
from ufo.tracking import Tracker, metric_name, tracking_uri
from ufo.train import train


UFO_SETTINGS = ("alone", "hard", "fixed", "sample", "learned", "learned_both")
UFO_LABELS = {"alone": "task alone (plain ViT)", "hard": "hard sharing (all S)", "fixed": "UFO, fixed paths",
              "sample": "UFO, sample (one-shot)", "learned": "UFO, learned paths",
              "learned_both": "learned, both FFNs always"}


def only_tasks(cfg: UfoConfig, tasks: Sequence[str]) -> UfoConfig:
    """The config with only `tasks` (in the config's order): a pair of a config's tasks benchmarked
    by itself (`ufo bench ufo --tasks a,b`)."""
    unknown = [t for t in tasks if t not in cfg.tasks]
    if unknown:
        raise ConfigError(f"--tasks: {', '.join(unknown)}: not a task of the config (its tasks: {', '.join(cfg.tasks)})")
    raw = cfg.to_dict()
    raw["tasks"] = {t: v for t, v in raw["tasks"].items() if t in tasks}
    return config_from_dict(raw, f"the config's tasks {', '.join(raw['tasks'])}")


def ufo_settings(cfg: UfoConfig, steps: int, out: Path, settings: Sequence[str] = UFO_SETTINGS,
                 uri: str | None = None, eval_every: int = 0) -> dict[str, dict]:
    """The runs of `ufo bench ufo`: run name -> a plain ufo config (same data, steps, model, seed).
    `alone-<task>`: the task by itself on a path of FFN-shared only (a plain ViT of its subnet's
    size); `hard`: every task on the all-shared path; `fixed`: the configured paths; `sample`:
    one-shot paths, evaluated on the configured ones; `learned`: `train.path_policy: learned`;
    `learned_both`: the same, never deciding (both FFNs of every block always run, as VIMER-UFO).
    `eval_every` > 0: every run evaluates every so many steps and keeps each task's best checkpoint
    (`train.keep_best`)."""
    base = cfg.to_dict()
    depth = cfg.model.depth
    base["train"].update(steps=steps, warmup_steps=min(base["train"]["warmup_steps"], steps // 2),
                         eval_every=eval_every, keep_best=eval_every > 0, checkpoint_every=0,
                         # ten readings a run at least (what `causes` reads)
                         diagnostics_every=min(base["train"]["diagnostics_every"] or steps, max(1, steps // 10)))
    runs: dict[str, dict] = {}

    def run(name: str, change) -> None:
        raw = copy.deepcopy(base)
        raw["train"]["out_dir"] = str(out / name)
        raw["tracking"].update(enabled=True, run_name=name, experiment=f"ufo-bench-{out.name}",
                               **({"uri": uri} if uri else {}))
        change(raw)
        runs[name] = raw

    for name in settings:
        setting, _, weighting = name.partition("+")
        if weighting:  # a setting under another loss weighting, e.g. fixed+uncertainty
            def weighted(raw, setting=setting, weighting=weighting):
                sub = ufo_settings(cfg, steps, out, [setting], uri, eval_every)
                (inner,) = sub.values()
                raw.update({k: v for k, v in inner.items() if k not in ("train", "tracking")})
                raw["train"] = {**inner["train"], "out_dir": raw["train"]["out_dir"],
                                "weighting": {"name": weighting}}
            if setting in ("alone", "") or setting not in UFO_SETTINGS:
                raise ConfigError(f"--settings: {name}: a weighting applies to hard, fixed, sample, learned or "
                                  "learned_both (a task alone has one loss)")
            run(name, weighted)
        elif name == "alone":
            for task in cfg.tasks:
                def alone(raw, task=task):
                    raw["tasks"] = {task: {**raw["tasks"][task], "path": "S" * depth, "ranks": None}}
                    raw["model"]["ffns"] = "auto"
                run(f"alone-{task}", alone)
        elif name == "hard":
            def hard(raw):
                for tc in raw["tasks"].values():
                    tc["path"] = "S" * depth
                raw["train"]["path_policy"], raw["model"]["ffns"] = "fixed", "auto"
            run(name, hard)
        elif name == "fixed":
            run(name, lambda raw: raw["train"].update(path_policy="fixed"))
        elif name == "sample":
            run(name, lambda raw: raw["train"].update(path_policy="sample"))
        elif name == "learned":
            run(name, lambda raw: raw["train"].update(path_policy="learned"))
        elif name == "learned_both":
            def both(raw):
                raw["train"]["path_policy"] = "learned"
                raw["train"]["path"]["decide_after"] = steps + 1
            run(name, both)
        else:
            raise ConfigError(f"--settings: unknown {name} (known: {', '.join(UFO_SETTINGS)})")
    return runs


def repeated(runs: dict[str, dict], seeds: int = 1, lrs: Sequence[float] = ()) -> dict[str, dict]:
    """Each run at every lr of `lrs` (none: the config's) and `seeds` seeds (train.seed, + 1, ...): run
    name -> config, each config's `_bench` key naming its base run, lr and seed (removed before training)."""
    out = {}
    for base, raw in runs.items():
        for lr in lrs or [raw["train"]["lr"]]:
            for k in range(seeds):
                name = base + (f"-lr{lr:g}" if len(lrs) > 1 else "") + (f"-seed{k}" if seeds > 1 else "")
                one = copy.deepcopy(raw)
                one["train"].update(lr=lr, seed=raw["train"]["seed"] + k,
                                    out_dir=str(Path(raw["train"]["out_dir"]).with_name(name)))
                one["tracking"]["run_name"] = name
                one["_bench"] = {"base": base, "lr": lr, "seed": one["train"]["seed"]}
                out[name] = one
    return out


def spike(records: list[dict], warmup: int) -> float:
    """How far a run's largest global gradient norm after warmup is above its median (a loss spike
    shows as a ratio of 10 and more; 0 without norms)."""
    norms = [r["global_grad_norm"] for r in records if r.get("global_grad_norm") is not None and r["step"] > warmup]
    return max(norms) / statistics.median(norms) if len(norms) > 2 and statistics.median(norms) > 0 else 0.0


SPIKE = 10.0  # a run whose gradient norm jumps this far above its median is flagged unstable


def bench_ufo(cfg: UfoConfig, steps: int, out: Path, settings: Sequence[str] = UFO_SETTINGS,
              launcher: str | None = None, overwrite: bool = False, log: Callable[[str], None] = print,
              seeds: int = 1, lrs: Sequence[float] = (), eval_every: int = 0, jobs: int = 1) -> dict[str, Any]:
    """UFO's headline comparison on any config: every task trained alone, with hard sharing, with
    fixed, sampled and learned paths (and learned with both FFNs always, for the cost), each a plain
    `ufo train` run (in this process, or under `launcher`, e.g. "torchrun --nproc_per_node 8"),
    each task then measured by its protocol on the path the run trained toward (`ufo eval`'s code).
    With `seeds` > 1 every run is repeated with other seeds (a cell is their mean, with their
    standard deviation); with several `lrs` every run is trained at each and each setting reported
    at its best lr on the eval sets. With `eval_every` > 0 every run evaluates every so many steps and
    each task is reported at its best step (its best checkpoint's metric, the step said in the JSON).
    Every run's gradient-norm history is checked for spikes. `jobs` > 1 trains that many runs at once,
    each a `ufo train` process with its share of the CPU threads (its s/step then shares the machine).
    Writes OUT/ufo.json, OUT/ufo.png and one MLflow run per setting plus a summary run."""
    out = out.resolve()
    uri = tracking_uri(cfg, out)  # the config's store, else MLFLOW_TRACKING_URI, else OUT/mlflow.db
    runs = repeated(ufo_settings(cfg, steps, out, settings, uri=uri, eval_every=eval_every), seeds, lrs)
    fresh_runs(out, list(runs), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"steps": steps, "tasks": list(cfg.tasks), "settings": {}, "launcher": launcher,
                              "metrics": {t: primary_key(cfg, t) for t in cfg.tasks}, "seeds": seeds,
                              "lrs": list(lrs), "eval_every": eval_every, "jobs": jobs}
    planned = {}
    for name, raw in runs.items():
        bench = raw.pop("_bench")
        planned[name] = (raw, bench, config_from_dict(raw, f"bench ufo ({name})"))
    took = _train_runs(planned, out, launcher, jobs, log)
    for name, (raw, bench, run_cfg) in planned.items():
        seconds = took[name]
        records = [json.loads(line) for line in (out / name / "history.jsonl").read_text().splitlines() if line]
        rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
        late = rates[len(rates) * 3 // 4:] or rates
        entry: dict[str, Any] = {"s_per_step": seconds / steps, "late_samples_per_s": statistics.mean(late)
                                 if late else None, "tasks": {}, **bench,
                                 "spike": spike(records, run_cfg.train.warmup_steps)}
        entry["diagnosis"] = summarize(records, list(run_cfg.tasks))
        best = read_best(out / name / "checkpoints") if eval_every else {}
        for task in run_cfg.tasks:
            report = eval_target(out / name, task, log=lambda _: None)
            entry["tasks"][task] = {"primary": report["primary"], "path": report["path"], "metrics": report["metrics"]}
            if task in best:  # the task's best step: what its best checkpoint measured when it was saved
                entry["tasks"][task].update(primary=best[task]["value"], best_step=best[task]["step"],
                                            last=report["primary"])
        if run_cfg.train.path_policy == "learned":
            # the last checkpoint's (with --eval-every, earlier best ones lie beside it)
            marker = json.loads(sorted((out / name / "checkpoints").glob("step*/ufo.json"))[-1].read_text())
            entry["open_blocks"] = {t: p.count("?") for t, p in marker["path_policy"]["decided"].items()}
        log("   " + "  ".join(f"{t} {v['primary']:.4f} ({v['path']})" for t, v in entry["tasks"].items()))
        result["settings"][name] = entry
    result.update(_ufo_table(result))
    (out / "ufo.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_ufo(result, labels(result["table"]), out / "ufo.png")
    _log_ufo(cfg, result, out, uri)
    return result


RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "GLOO_SOCKET_IFNAME")


def _train_runs(planned: dict[str, tuple[dict, dict, UfoConfig]], out: Path, launcher: str | None, jobs: int,
                log: Callable[[str], None]) -> dict[str, float]:
    """Train every run: in this process one after the other, or each as a `ufo train` subprocess
    (under `launcher`, or `jobs` at a time, each with its share of the CPU threads; its output in
    OUT/<run>.log); run name -> seconds it took."""
    def said(name: str, cfg: UfoConfig) -> str:
        return f"== {name}: " + ", ".join(f"{t} {cfg.train.path_policy if cfg.train.path_policy != 'fixed' else p}"
                                          for t, p in ((t, cfg.path_of(t)) for t in cfg.tasks))

    took: dict[str, float] = {}
    if not launcher and jobs == 1:
        for name, (_, _, cfg) in planned.items():
            log(said(name, cfg))
            start = time.perf_counter()
            train(cfg, log=lambda line: log("   " + line) if line.startswith(("step", "path:", "learned")) else None)
            took[name] = time.perf_counter() - start
        return took
    # a run is a job of its own, not a member of this process's group (which an in-process run made)
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    waiting, running = list(planned), {}
    try:
        while waiting or running:
            # the first run trains alone until its first step: by then it has built (or loaded) DeepSpeed's
            # compiled ops, which two first builds at once would deadlock on
            first = not took and len(running) == 1 and not _read(out / next(iter(running)) / "history.jsonl")
            while waiting and len(running) < jobs and not first:
                name = waiting.pop(0)
                raw, _, cfg = planned[name]
                config = out / f"{name}.yaml"
                config.write_text(yaml.safe_dump(raw, sort_keys=False))
                args = (launcher.split() if launcher else [sys.executable]) + ["-m", "ufo.cli", "train", str(config)]
                if args[0] in ("torchrun", "deepspeed"):
                    args[0] = str(Path(sys.executable).with_name(args[0]))
                log(said(name, cfg) + (f" ({len(running) + 1} of {jobs} at once)" if jobs > 1 else ""))
                with open(out / f"{name}.log", "w") as output:
                    running[name] = (subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, env=env),
                                     time.perf_counter(), args)
                first = not took and len(running) == 1
            time.sleep(0.5)
            for name, (proc, start, args) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode != 0:
                    lines = (out / f"{name}.log").read_text().strip().splitlines() or ["no output"]
                    raise ConfigError(f"bench ufo: the {name} run failed ({' '.join(args)}; {out / name}.log): "
                                      + lines[-1])
                took[name] = time.perf_counter() - start
                log(f"   {name}: trained in {took[name]:.0f} s")
    finally:
        for proc, *_ in running.values():  # a failed run stops the others
            proc.terminate()
            proc.wait()
    return took


def _read(file: Path) -> str:
    try:
        return file.read_text()
    except OSError:
        return ""


def _ufo_table(r: dict[str, Any]) -> dict[str, Any]:
    """The cells: setting -> task -> the mean of the task's headline metric over the seeds (`table`),
    their standard deviation (`table_std`, 0 for one seed), at each setting's best lr on the eval sets
    (`chosen_lr`: base run -> lr; the `alone` column from each task's own runs); `beyond_spread`:
    setting -> task -> whether its difference from the task alone exceeds the two seed spreads
    together; `unstable`: run -> its gradient-norm spike, for runs at SPIKE and above."""
    values: dict[tuple[str, float], dict[str, list[float]]] = {}
    for entry in r["settings"].values():
        for task, v in entry["tasks"].items():
            values.setdefault((entry["base"], entry["lr"]), {}).setdefault(task, []).append(v["primary"])
    chosen: dict[str, float] = {}
    for (base, lr), tasks in values.items():
        score = statistics.mean(statistics.mean(v) for v in tasks.values())
        best = chosen.get(base)
        if best is None or score > statistics.mean(statistics.mean(v) for v in values[(base, best)].values()):
            chosen[base] = lr
    table: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, float]] = {}
    for base, lr in chosen.items():
        setting = "alone" if base.startswith("alone-") else base
        for task, v in values[(base, lr)].items():
            table.setdefault(setting, {})[task] = statistics.mean(v)
            spread.setdefault(setting, {})[task] = statistics.stdev(v) if len(v) > 1 else 0.0
    alone = table.get("alone", {})
    beyond = {s: {t: abs(m - alone[t]) > spread[s][t] + spread["alone"][t] for t, m in row.items() if t in alone}
              for s, row in table.items() if s != "alone"}
    unstable = {n: e["spike"] for n, e in r["settings"].items() if e.get("spike", 0.0) >= SPIKE}
    return {"table": table, "table_std": spread, "chosen_lr": chosen, "beyond_spread": beyond, "unstable": unstable,
            "causes": causes(r, chosen, table, beyond)}


SLOW = 1.25  # a task whose late loss / first loss is this many times its alone run's is slow
OUTWEIGHED = 0.5  # ... whose share of the shared gradient is under this fraction of an even share
CONFLICT = -0.05  # ... whose mean gradient cosine with another task is below this conflicts with it
KNOBS = {"outweighed": "a weighting that evens the tasks' gradients (initial, gradnorm_static, gradnorm, "
                       "uncertainty: `ufo bench weighting`)",
         "slow": "a weighting that favours the slower task (dwa, lbtw) or more steps",
         "conflict": "fewer shared blocks on its path (FFN-task where the conflict is: learned paths)",
         "unstable": "a lower lr or a longer warmup",
         "none": "none of the three: capacity or steps (FFN-task blocks, a wider model, a longer schedule)"}


def causes(r: dict[str, Any], chosen: dict[str, float], table: dict, beyond: dict) -> dict[str, dict[str, dict]]:
    """For each setting and task below the task alone (beyond the seeds' spread with several seeds):
    which of the three causes its runs' diagnostics (`ufo.diagnostics.summarize`, the mean over the
    seeds at the setting's chosen lr) point to, against the task's alone runs: `slow` (late loss /
    first loss SLOW times the alone run's), `outweighed` (weighted share of the shared gradient under
    OUTWEIGHED of an even share, naming the tasks above an even share), `conflict` (a mean cosine
    below CONFLICT), `unstable` (a run flagged by its gradient norm), else `none`; with the knob for
    each (KNOBS)."""
    def mean_of(base: str, key: str) -> dict[str, float]:
        entries = [e for e in r["settings"].values() if e.get("base") == base and e.get("lr") == chosen.get(base)
                   and e.get("diagnosis")]
        values: dict[str, list[float]] = {}
        for e in entries:
            for k, v in e["diagnosis"][key].items():
                values.setdefault(k, []).append(v)
        return {k: statistics.mean(v) for k, v in values.items()}

    alone = table.get("alone", {})
    out: dict[str, dict[str, dict]] = {}
    for setting, row in table.items():
        if setting == "alone":
            continue
        speed, share, cosine = mean_of(setting, "speed"), mean_of(setting, "share"), mean_of(setting, "cosine")
        flagged = [n for n, e in r["settings"].items() if e.get("base") == setting
                   and e.get("lr") == chosen.get(setting) and e.get("spike", 0.0) >= SPIKE]
        even = 1 / max(1, len(row))
        for task, value in row.items():
            if task not in alone or value >= alone[task] or (r.get("seeds", 1) > 1 and not beyond[setting][task]):
                continue
            found: dict[str, Any] = {}
            own = mean_of(f"alone-{task}", "speed").get(task)
            if task in speed and own and speed[task] >= SLOW * own:
                found["slow"] = {"speed": speed[task], "alone": own}
            if task in share and share[task] < OUTWEIGHED * even:
                found["outweighed"] = {"share": share[task], "even": even,
                                       "by": {t: v for t, v in share.items() if v > even}}
            pairs = {tuple(p.split("-")): c for p, c in cosine.items()}  # task names hold no "-"
            against = {(b if a == task else a): c for (a, b), c in pairs.items() if task in (a, b) and c < CONFLICT}
            if against:
                found["conflict"] = against
            if flagged:
                found["unstable"] = flagged
            out.setdefault(setting, {})[task] = {"gap": value - alone[task], "causes": found or {"none": True},
                                                 "knobs": [KNOBS[c] for c in (found or {"none": True})]}
    return out


def _log_ufo(cfg: UfoConfig, r: dict[str, Any], out: Path, uri: str) -> None:
    """The comparison as one MLflow run beside the settings' runs: each cell a metric, the JSON and PNG."""
    tracking = cfg.tracking.model_copy(update={"enabled": True, "uri": uri, "run_name": "bench-ufo",
                                               "experiment": f"ufo-bench-{out.name}", "system_metrics_every": 0})
    tracker = Tracker(cfg.model_copy(update={"tracking": tracking}), out, say=lambda _: None,
                      params={"steps": r["steps"], "settings": ",".join(r["settings"])})
    tracker.log_metrics(r["steps"], {metric_name(f"{s}/{t}/{r['metrics'][t]}"): v
                                     for s, row in r["table"].items() for t, v in row.items()}
                        | {f"{name}/s_per_step": e["s_per_step"] for name, e in r["settings"].items()})
    for file in ("ufo.json", "ufo.png"):
        tracker.log_artifact(out / file)
    tracker.close()


def labels(table: dict) -> dict[str, str]:
    """Each setting's legend, in UFO_SETTINGS's order, then the settings run under other weightings."""
    out = {s: UFO_LABELS[s] for s in UFO_SETTINGS if s in table}
    for s in table:
        if "+" in s:
            setting, _, weighting = s.partition("+")
            out[s] = f"{UFO_LABELS[setting]}, {weighting}"
    return out


def format_ufo_bench(r: dict[str, Any]) -> str:
    tasks, table, std = r["tasks"], r["table"], r.get("table_std", {})
    names = labels(table)
    settings = list(names)
    seeds = r.get("seeds", 1)
    lines = [f"ufo bench ufo: {r['steps']} steps per run" + (f" (each task at its best of the evaluations every "
             f"{r['eval_every']} steps)" if r.get("eval_every") else "") + (f", mean of {seeds} seeds (+- their standard deviation;"
             " * where the difference from the task alone exceeds both spreads)" if seeds > 1 else "")
             + "; each task by its protocol's headline metric",
             f"  {'setting':<28}" + "".join(f"{t + ' ' + r['metrics'][t]:>24}" for t in tasks) + f"{'s/step':>9}"]
    for s in settings:
        runs = [e for n, e in r["settings"].items() if e.get("base", n) == s or (s == "alone" and n.startswith("alone-"))]
        seconds = statistics.mean(e["s_per_step"] for e in runs)
        cells = []
        for t in tasks:
            mean = table[s].get(t, float("nan"))
            mark = "*" if r.get("beyond_spread", {}).get(s, {}).get(t) and seeds > 1 else " "
            cells.append(f"{mean:.4f} +- {std[s][t]:.4f}{mark}" if seeds > 1 and t in std.get(s, {})
                         else f"{mean:.4f}")
        lines.append(f"  {names[s]:<28}" + "".join(f"{c:>24}" for c in cells) + f"{seconds:>9.3f}")
    if len(r.get("lrs") or []) > 1:
        lines.append("  lr of each setting, the best of " + ", ".join(f"{lr:g}" for lr in r["lrs"])
                     + " on the eval sets: " + ", ".join(f"{b} {lr:g}" for b, lr in r["chosen_lr"].items()))
    why = r.get("causes") or {}
    if why:
        lines.append("  why each task below its alone run" + (" (beyond the seeds' spread)" if seeds > 1 else "")
                     + " falls short, by the runs' diagnostics:")
    for s, row in why.items():
        for t, c in row.items():
            said = []
            for cause, v in c["causes"].items():
                if cause == "slow":
                    said.append(f"slow (loss at {v['speed']:.2f} of its first, alone {v['alone']:.2f})")
                elif cause == "outweighed":
                    said.append(f"outweighed ({v['share']:.0%} of the shared gradient, even {v['even']:.0%}; "
                                + ", ".join(f"{u} {x:.0%}" for u, x in v["by"].items()) + ")")
                elif cause == "conflict":
                    said.append("conflict (cosine " + ", ".join(f"{u} {x:+.2f}" for u, x in v.items()) + ")")
                elif cause == "unstable":
                    said.append("unstable runs")
                else:
                    said.append("none of the three")
            lines.append(f"    {s} / {t} ({c['gap']:+.3f}): " + "; ".join(said) + " -> " + "; ".join(c["knobs"]))
    for name, ratio in (r.get("unstable") or {}).items():
        lines.append(f"  unstable: {name}'s gradient norm jumped to {ratio:.0f}x its median (a loss spike: "
                     "try a lower lr or a longer warmup)")
    for name in ("learned", "learned_both"):
        e = next((e for n, e in r["settings"].items() if e.get("base", n) == name), None)
        if e:
            paths = " ".join(f"{t}={v['path']}" for t, v in e["tasks"].items())
            lines.append(f"  {name}: paths {paths}; open blocks at the end {e.get('open_blocks')}; "
                         f"late samples/s {e['late_samples_per_s']:.0f}")
    both = [next((e for n, e in r["settings"].items() if e.get("base", n) == b), None) for b in ("learned", "learned_both")]
    if all(both):
        a, b = both[0]["late_samples_per_s"], both[1]["late_samples_per_s"]
        lines.append(f"  once settled, a learned step runs at {a / b:.2f}x the samples/s of both FFNs always")
    return "\n".join(lines)
