"""Path search: the best path of one task on its eval shards, with the supernet's weights as they are.

2^depth paths cannot all be tried: a seeded evolutionary search starts from the path used in
training, all-shared and all-task; each generation tries the untried one-block changes of the
best paths found (local search), then children of the best (uniform crossover, bit-flip
mutation), until `budget_evals` paths have been evaluated. In a launched job every generation's
candidates are spread over the ranks; every rank takes the same decisions from the same results.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ufo.atomic import atomic_file
from ufo.checkpoint import Checkpoint, load_supernet, read_checkpoint
from ufo.data import task_loader
from ufo.errors import UfoError
from ufo.metrics import retrieval, top1
from ufo.model import SupernetViT

Log = Callable[[str], None]
FORMAT = "ufo-path-search/1"


@dataclass
class SearchResult:
    task: str
    metric: str
    best_path: str
    best: float
    baselines: dict[str, dict]  # all_shared, all_task, trained: {"path", "value"}
    evaluated: list[dict] = field(default_factory=list)  # every path tried, in order: {"path", "value"}
    budget_evals: int = 0
    seed: int = 0
    checkpoint: str = ""
    step: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


class PathEvaluator:
    """The task's metric for a path: top-1 (classification) or Recall@1 (retrieval) on its eval shards."""

    def __init__(self, model: SupernetViT, cfg, task: str, batch_size: int = 256):
        self.model, self.task, self.kind = model.eval(), task, cfg.tasks[task].kind
        self.metric = "top1" if self.kind == "classification" else "recall@1"
        images, labels = [], []
        for batch in task_loader(cfg, task, train=False, batch_size=batch_size, num_workers=0):
            if batch["images"].ndim == 4:
                images.append(batch["images"])
                labels.append(batch["labels"])
        if not labels:
            raise UfoError(f"task {task}: its eval shards gave no readable sample")
        self.batches = list(zip(images, labels))
        self.samples = sum(len(y) for _, y in self.batches)

    @torch.no_grad()
    def __call__(self, path: str) -> float:
        outputs = [self.model.forward_task(x, self.task, path) for x, _ in self.batches]
        out, y = torch.cat(outputs), torch.cat([y for _, y in self.batches])
        return top1(out, y) if self.kind == "classification" else retrieval(out, y)["recall@1"]


def evolve(evaluate_many: Callable[[list[str]], list[float]], depth: int, starts: Sequence[str], budget: int,
           seed: int = 0, population: int = 8, log: Log = print) -> list[tuple[str, float]]:
    """Seeded evolutionary search over S/T paths of `depth` blocks; returns every (path, value) tried."""
    rng = random.Random(seed)
    budget = min(budget, 2 ** depth)
    seen: dict[str, float] = {}

    def run(candidates: list[str]) -> None:
        fresh = list(dict.fromkeys(c for c in candidates if c not in seen))[: budget - len(seen)]
        for path, value in zip(fresh, evaluate_many(fresh)):
            seen[path] = value
        best = max(seen, key=seen.get)
        log(f"  {len(seen)}/{budget} paths evaluated, best {best} {seen[best]:.4f}")

    first = list(dict.fromkeys(starts))
    while len(first) < population:
        first.append("".join(rng.choice("ST") for _ in range(depth)))
    run(first)
    while len(seen) < budget:
        ranked = sorted(seen, key=lambda p: (-seen[p], p))
        parents = ranked[: max(2, population // 2)]
        # local search first: the untried one-block changes of the best paths, best path first
        children = [n for parent in parents for n in _neighbours(parent) if n not in seen]
        children = list(dict.fromkeys(children))[:population]
        for _ in range(population * 20):
            if len(children) == min(population, budget - len(seen)):
                break
            a, b = rng.choice(parents), rng.choice(parents)
            child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
            for i in range(depth):
                if rng.random() < 1.0 / depth:
                    child[i] = "T" if child[i] == "S" else "S"
            path = "".join(child)
            if path not in seen and path not in children:
                children.append(path)
        if not children:  # the neighbourhood is exhausted: try paths never seen, at random
            rest = [p for p in (format(i, f"0{depth}b").replace("0", "S").replace("1", "T")
                                for i in range(2 ** depth)) if p not in seen]
            children = rng.sample(rest, min(len(rest), population))
        run(children)
    return list(seen.items())


def _neighbours(path: str) -> list[str]:
    return [path[:i] + ("T" if c == "S" else "S") + path[i + 1:] for i, c in enumerate(path)]


def search_path(checkpoint: str | Path | Checkpoint, task: str, budget_evals: int = 32, seed: int = 0,
                population: int = 8, rank: int = 0, world: int = 1, log: Log = print) -> SearchResult:
    """Find the best path for `task` in a supernet checkpoint (ranks share the evaluations)."""
    started = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    cfg = ckpt.config
    if task not in cfg.tasks:
        raise UfoError(f"{ckpt.path}: has no task {task!r} (tasks: {', '.join(cfg.tasks)})")
    if cfg.tasks[task].eval_shards is None:
        raise UfoError(f"task {task}: tasks.{task}.eval_shards is not set in the checkpoint's config; "
                       "the search evaluates paths on them")
    depth = cfg.model.depth
    evaluate = PathEvaluator(load_supernet(ckpt), cfg, task)

    def evaluate_many(paths: list[str]) -> list[float]:
        mine = {p: evaluate(p) for i, p in enumerate(paths) if i % world == rank}
        if world > 1:
            import torch.distributed as dist

            shares: list = [None] * world
            dist.all_gather_object(shares, mine)
            mine = {p: v for share in shares for p, v in share.items()}
        return [mine[p] for p in paths]

    trained, shared, own = cfg.path_of(task), "S" * depth, "T" * depth
    log(f"ufo search: task {task} ({evaluate.metric} on {evaluate.samples} eval samples), depth {depth}, "
        f"budget {budget_evals} paths, seed {seed}" + (f", {world} ranks" if world > 1 else ""))
    tried = evolve(evaluate_many, depth, [trained, shared, own], budget_evals, seed, population, log)
    values = dict(tried)
    best_path = max(values, key=lambda p: (values[p], p == trained))  # ties: keep the trained path
    return SearchResult(
        task=task, metric=evaluate.metric, best_path=best_path, best=values[best_path],
        baselines={name: {"path": p, "value": values[p]} for name, p in
                   (("trained", trained), ("all_shared", shared), ("all_task", own))},
        evaluated=[{"path": p, "value": v} for p, v in tried], budget_evals=budget_evals, seed=seed,
        checkpoint=str(ckpt.path), step=ckpt.step, seconds=time.perf_counter() - started)


def write_result(result: SearchResult, out: Path) -> Path:
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return out


def read_path(file: str | Path, task: str) -> str:
    """The best path a search result file holds for `task` (what `ufo export --path-from` takes)."""
    file = Path(file)
    try:
        result = json.loads(file.read_text())
    except FileNotFoundError:
        raise UfoError(f"{file}: no such search result") from None
    except ValueError:
        raise UfoError(f"{file}: not a JSON search result") from None
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        raise UfoError(f"{file}: not a `ufo search` result (no format {FORMAT!r})")
    if result.get("task") != task:
        raise UfoError(f"{file}: is the search result of task {result.get('task')!r}, not {task!r}")
    return result["best_path"]


def format_result(r: SearchResult) -> str:
    lines = [f"best path for {r.task}: {r.best_path}  {r.metric} {r.best:.4f}"]
    for name, b in r.baselines.items():
        lines.append(f"  {name:<11} {b['path']}  {r.metric} {b['value']:.4f}  ({r.best - b['value']:+.4f} for the best)")
    lines.append(f"  {len(r.evaluated)} paths evaluated in {r.seconds:.1f} s")
    return "\n".join(lines)
