"""Each task's best checkpoint (`train.keep_best`).

In multi-task training the tasks peak at different steps. With `keep_best` every evaluation
compares each task's headline metric (its protocol's primary metric, the mean over named eval
sets: `evaluate.primary`) with the best so far; a task that improved gets the step's checkpoint
(saved then if the schedule would not have), and `checkpoints/best.json` names it:

    {"person": {"step": 1200, "checkpoint": "step00001200", "metric": "rank1", "value": 0.91}, ...}

The checkpoint rotation (`train.keep_checkpoints`) spares every checkpoint best.json names; one that
is no task's best any more goes with the next rotation. best.json is written (atomically, by rank 0)
only after its checkpoint is complete, so a run killed at any point resumes with a best.json whose
checkpoints exist, and goes on comparing with the same values. `ufo export --best` takes each task's
subnet from its own best checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from ufo.atomic import atomic_file
from ufo.errors import CheckpointError

FILE = "best.json"


def read_best(checkpoints: Path) -> dict[str, dict]:
    """task -> {step, checkpoint, metric, value} from `checkpoints/best.json` ({} when there is none)."""
    file = Path(checkpoints) / FILE
    if not file.is_file():
        return {}
    try:
        best = json.loads(file.read_text())
        for task, entry in best.items():
            int(entry["step"]), str(entry["checkpoint"]), float(entry["value"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a best-checkpoint record ({type(e).__name__}: {e})") from None
    return best


def best_tags(checkpoints: Path) -> set[str]:
    """The checkpoints (step directory names) that are some task's best: the rotation keeps them."""
    try:
        return {entry["checkpoint"] for entry in read_best(checkpoints).values()}
    except CheckpointError:
        return set()  # an unreadable record protects nothing, and removes nothing either


def improved(best: Mapping[str, dict], headlines: Mapping[str, tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """The tasks whose headline (metric, value) beats their best so far (every primary metric is
    higher-is-better); a task measured for the first time counts as improved."""
    return {task: (metric, value) for task, (metric, value) in headlines.items()
            if value == value and (task not in best or value > best[task]["value"])}  # NaN never improves


def record_best(checkpoints: Path, best: dict[str, dict], better: Mapping[str, tuple[str, float]], step: int,
                tag: str) -> dict[str, dict]:
    """best.json with the tasks of `better` now at checkpoint `tag` of `step` (rank 0, after the save)."""
    best = {**best, **{task: {"step": step, "checkpoint": tag, "metric": metric, "value": value}
                       for task, (metric, value) in better.items()}}
    with atomic_file(Path(checkpoints) / FILE) as tmp:
        tmp.write_text(json.dumps(best, indent=1) + "\n")
    return best
