"""What a run shows and keeps of its steps: each optimizer step's observations averaged over its
micro-steps, the per-step records (`history.jsonl`), the loss meter and the progress line, and
the records as MLflow metrics.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ufo.atomic import atomic_file
from ufo.weighting import Observation, Weighting


class StepMean:
    """The observations of one optimizer step's micro-steps, averaged (losses and accuracies per sample)."""

    def __init__(self, tasks: int):
        self.loss = torch.zeros(tasks, dtype=torch.float64)
        self.hits = torch.zeros(tasks, dtype=torch.float64)
        self.norms = torch.zeros(tasks, dtype=torch.float64)
        self.counts = torch.zeros(tasks, dtype=torch.float64)
        self.micro = torch.zeros(tasks, dtype=torch.float64)
        self.last: Observation | None = None

    def add(self, obs: Observation, counts: torch.Tensor) -> None:
        known = counts > 0
        self.loss += torch.where(known, obs.losses * counts, 0.0)
        if obs.accuracies is not None:
            self.hits += torch.where(known, obs.accuracies * counts, 0.0)
        if obs.grad_norms is not None:
            self.norms += torch.where(known, obs.grad_norms, 0.0)
        self.counts += counts
        self.micro += known.double()
        self.last = obs

    def mean(self) -> Observation:
        known = self.counts > 0
        nan = torch.full_like(self.counts, math.nan)
        per_sample = torch.where(known, 1.0 / self.counts.clamp_min(1), nan)
        return Observation(
            losses=self.loss * per_sample,
            grad_norms=None if self.last.grad_norms is None else self.norms / self.micro.where(known, nan),
            accuracies=None if self.last.accuracies is None else self.hits * per_sample)


class History:
    """Per-step records (losses, weights, learned weighting values, lr): kept in memory on every rank,
    appended to `history.jsonl` by rank 0; a resumed run first drops the records after its checkpoint."""

    def __init__(self, path: Path, step: int, write: bool):
        self.path, self.records = path, []
        self.file = None
        if write:
            kept = []
            if step > 0 and path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] <= step:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        break  # a torn last line of a killed run
            with atomic_file(path) as tmp:  # a crash here keeps the old history whole
                tmp.write_text("".join(line + "\n" for line in kept))
            self.file = open(path, "a")

    def record(self, step: int, obs: Observation, weights: torch.Tensor, weighting: Weighting, scheduler,
               tasks: list[str]) -> dict:
        """A step's record; the loop adds what else it knows, then `append`s it."""
        record = {"step": step, "lr": scheduler.get_last_lr()[0],
                  "loss": by_task(tasks, obs.losses), "weight": by_task(tasks, weights)}
        if obs.accuracies is not None:
            record["accuracy"] = by_task(tasks, obs.accuracies)
        if obs.grad_norms is not None:
            record["grad_norm"] = by_task(tasks, obs.grad_norms)
        for name, values in weighting.values().items():
            record[name] = by_task(tasks, values)
        return record

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def by_task(tasks: list[str], values: torch.Tensor) -> dict[str, float | None]:
    return {t: (float(v) if math.isfinite(v) else None) for t, v in zip(tasks, values.tolist())}


class Meter:
    """Per-task loss sums and counts since the last progress line (all ranks' totals)."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        self.sums = torch.zeros(len(tasks), dtype=torch.float64)
        self.counts = torch.zeros(len(tasks), dtype=torch.float64)
        self.since, self.rate = time.perf_counter(), 0.0

    def add(self, obs: Observation, counts: torch.Tensor) -> None:
        self.sums += torch.where(counts > 0, obs.losses * counts, 0.0)
        self.counts += counts

    def take(self) -> dict[str, float]:
        now = time.perf_counter()
        self.rate = float(self.counts.sum()) / max(now - self.since, 1e-9)
        losses = {t: float(s / c) for t, s, c in zip(self.tasks, self.sums, self.counts) if c > 0}
        self.sums.zero_()
        self.counts.zero_()
        self.since = now
        return losses


def progress_line(step: int, steps: int, losses: dict[str, float], weights: dict[str, float], rate: float, scheduler,
              paths: dict[str, str], policy: str, eta: float, tokens: float, grad_norm: float | None = None) -> str:
    lr = scheduler.get_last_lr()[0] if scheduler is not None else float("nan")
    parts = [f"step {step}/{steps}",
             "loss (weight) " + " ".join(f"{t} {v:.3f} ({weights[t]:.3g})" for t, v in losses.items()),
             f"{rate:.0f} samples/s {rate * tokens / 1000:.0f}k tokens/s",
             f"lr {lr:.2e}"] + ([f"grad norm {grad_norm:.3g}"] if grad_norm is not None else []) + \
        [f"eta {_duration(eta)}"]
    if policy in ("sample", "learned"):  # learned: each task's likelier choice, lower-case while open
        parts.append("paths " + " ".join(f"{t}={p}" for t, p in paths.items()))
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def record_metrics(record: dict) -> dict[str, float | None]:
    """A history record as MLflow metrics: `loss/face`, `weight/face`, `lr`, ..."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{task}": v for task, v in value.items() if not isinstance(v, str)})
        elif key != "step":
            flat[key] = value
    return flat


def eval_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{k}": float(v) for task, r in results.items() for k, v in r.items()}
