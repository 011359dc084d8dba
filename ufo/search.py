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
from ufo.checkpoint import Checkpoint, load_supernet, read_checkpoint, trained_path
from ufo.config import ffns_on_path
from ufo.data import task_loader
from ufo.errors import UfoError
from ufo.evaluate import PRIMARY, eval_sets, measure, primary
from ufo.model import SupernetViT, narrow_attention, subnet_args

Log = Callable[[str], None]
FORMAT = "ufo-path-search/1"


@dataclass(frozen=True)
class Size:
    """An elastic subnet size, with the exported timm model's parameters and latency on this machine."""

    depth: int
    mlp_ratio: float
    params: int
    latency_ms: float | None = None
    num_heads: int | None = None  # None: the supernet's


@dataclass
class SearchResult:
    task: str
    metric: str
    best_path: str
    best: float
    baselines: dict[str, dict]  # all_shared, all_task, trained (full size): {"path", "value"}
    evaluated: list[dict] = field(default_factory=list)  # every candidate tried, in order
    best_depth: int | None = None  # None: the supernet's own size
    best_mlp_ratio: float | None = None
    best_num_heads: int | None = None
    best_params: int = 0
    best_latency_ms: float | None = None
    budget: dict = field(default_factory=dict)  # max_params, max_latency_ms
    pareto: list[dict] = field(default_factory=list)  # candidates no other beats on metric, params and latency
    budget_evals: int = 0
    seed: int = 0
    checkpoint: str = ""
    step: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}


class PathEvaluator:
    """The task's headline metric for a path (its protocol's: top-1, Recall@1, Rank-1, verification
    accuracy; the mean over named sets) on its eval sets, read once and held in memory."""

    def __init__(self, model: SupernetViT, cfg, task: str, batch_size: int = 256):
        self.model, self.task = model.eval(), task
        self.sets = eval_sets(cfg, task)
        if not self.sets:
            raise UfoError(f"task {task}: tasks.{task}.eval_shards is not set")
        names = [es.key(PRIMARY[es.protocol]) for es in self.sets]
        self.metric = names[0] if len(names) == 1 else f"mean {PRIMARY[self.sets[0].protocol]}"
        self.parts: list[dict[str, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]] = []
        self.samples = 0
        for es in self.sets:
            held = {}
            for role, spec in es.parts.items():
                images, labels, metas = [], [], []
                for batch in task_loader(cfg, task, train=False, batch_size=batch_size, num_workers=0, spec=spec,
                                         protocol=es.protocol):
                    if batch["images"].ndim == 4:
                        images.append(batch["images"])
                        labels.append(batch["labels"])
                        metas.append(batch.get("meta", torch.zeros(len(batch["labels"]), 0, dtype=torch.long)))
                if not labels:
                    raise UfoError(f"task {task}: its eval shards {spec} gave no readable sample")
                held[role] = (images, torch.cat(labels), torch.cat(metas))
                self.samples += len(held[role][1])
            self.parts.append(held)
        self.flip = cfg.tasks[task].flip_test

    @torch.no_grad()
    def __call__(self, path: str, depth: int | None = None, hidden: int | None = None,
                 heads: int | None = None) -> float:
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = self.model.forward_task(x, self.task, path, depth, hidden, heads)
            return out + self.model.forward_task(torch.flip(x, dims=[3]), self.task, path, depth, hidden, heads) \
                if self.flip else out

        result: dict[str, float] = {}
        for es, held in zip(self.sets, self.parts):
            outputs = {role: (torch.cat([forward(x) for x in images]), labels, meta)
                       for role, (images, labels, meta) in held.items()}
            result.update({es.key(k): v for k, v in measure(es.protocol, outputs).items()})
        return primary(self.sets, result)


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
                population: int = 8, rank: int = 0, world: int = 1, max_params: int | None = None,
                max_latency_ms: float | None = None, log: Log = print) -> SearchResult:
    """Find the best path for `task` in a supernet checkpoint (ranks share the evaluations).

    With a budget, every elastic size of the task (`tasks.<t>.elastic`) that fits it is searched,
    `budget_evals` shared between them, and the result holds the Pareto front.
    """
    started = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    cfg = ckpt.config
    if task not in cfg.tasks:
        raise UfoError(f"{ckpt.path}: has no task {task!r} (tasks: {', '.join(cfg.tasks)})")
    if cfg.distill is not None:
        raise UfoError(f"{ckpt.path}: is a distilled student ({cfg.distill.student}): it has no paths or sizes to search")
    if ffns_on_path(cfg):
        raise UfoError(f"{ckpt.path}: holds only the FFNs on its configured paths (model.ffns: on_path, the "
                       "default under train.path_policy fixed); a path search needs every FFN trained: train "
                       "with train.path_policy: sample (or model.ffns: all)")
    if cfg.tasks[task].eval_shards is None:
        raise UfoError(f"task {task}: tasks.{task}.eval_shards is not set in the checkpoint's config; "
                       "the search evaluates paths on them")
    m = cfg.model
    budgeted = max_params is not None or max_latency_ms is not None
    sizes = candidate_sizes(cfg, task, measure_latency=budgeted) if budgeted else \
        [Size(m.depth, m.mlp_ratio, subnet_params(cfg, task, m.depth, m.mlp_ratio))]
    feasible = [z for z in sizes if (max_params is None or z.params <= max_params)
                and (max_latency_ms is None or z.latency_ms <= max_latency_ms)]
    if not feasible:
        small = min(sizes, key=lambda z: z.params)
        raise UfoError(f"task {task}: no size fits --max-params {max_params} / --max-latency-ms {max_latency_ms}; "
                       f"the smallest, {_size(small, m)}, has {small.params} "
                       f"parameters and {small.latency_ms or 0:.2f} ms (tasks.{task}.elastic sets the sizes)")
    evaluate = PathEvaluator(load_supernet(ckpt), cfg, task)
    full_hidden = int(m.embed_dim * m.mlp_ratio)

    def evaluate_many(keys: list[tuple[str, Size]]) -> list[float]:
        def one(path: str, size: Size) -> float:
            hidden = int(m.embed_dim * size.mlp_ratio)
            return evaluate(path, None if size.depth == m.depth else size.depth,
                            None if hidden == full_hidden else hidden, size.num_heads)

        mine = {i: one(*k) for i, k in enumerate(keys) if i % world == rank}
        if world > 1:
            import torch.distributed as dist

            shares: list = [None] * world
            dist.all_gather_object(shares, mine)
            mine = {i: v for share in shares for i, v in share.items()}
        return [mine[i] for i in range(len(keys))]

    trained, path_from = trained_path(ckpt, task)  # a learned run's own path: the search starts there
    log(f"ufo search: task {task} ({evaluate.metric} on {evaluate.samples} eval samples), depth {m.depth}, "
        f"budget {budget_evals} evaluations, seed {seed}, starting from the {path_from} path {trained}"
        + (f", {world} ranks" if world > 1 else "")
        + (f", {len(feasible)} of {len(sizes)} sizes fit" if budgeted else ""))
    evaluated: list[dict] = []
    share = max(3, budget_evals // len(feasible))
    for size in feasible:
        d = size.depth
        if budgeted:
            log(f" size {_size(size, m)}: {size.params / 1e6:.3f} M params, {size.latency_ms:.2f} ms")
        # letters past the depth are unused: they keep the trained path's
        tried = evolve(lambda prefixes: evaluate_many([(p + trained[d:], size) for p in prefixes]), d,
                       [trained[:d], "S" * d, "T" * d], share if budgeted else budget_evals, seed, population, log)
        evaluated += [{"path": p + trained[d:], "value": v, "depth": d, "mlp_ratio": size.mlp_ratio,
                       "num_heads": size.num_heads or m.num_heads, "params": size.params,
                       "latency_ms": size.latency_ms} for p, v in tried]
    full = Size(m.depth, m.mlp_ratio, subnet_params(cfg, task, m.depth, m.mlp_ratio))
    reference = {name: p for name, p in (("trained", trained), ("all_shared", "S" * m.depth),
                                         ("all_task", "T" * m.depth))}
    known = {e["path"]: e["value"] for e in evaluated if e["depth"] == m.depth and e["mlp_ratio"] == m.mlp_ratio
             and e["num_heads"] == m.num_heads}
    missing = [p for p in reference.values() if p not in known]
    known.update(zip(missing, evaluate_many([(p, full) for p in missing])))
    best = max(evaluated, key=lambda e: (e["value"], e["path"] == trained, -e["params"]))
    front = pareto(evaluated)
    return SearchResult(
        task=task, metric=evaluate.metric, best_path=best["path"], best=best["value"],
        baselines={name: {"path": p, "value": known[p]} for name, p in reference.items()},
        evaluated=evaluated,
        best_depth=None if best["depth"] == m.depth else best["depth"],
        best_mlp_ratio=None if best["mlp_ratio"] == m.mlp_ratio else best["mlp_ratio"],
        best_num_heads=None if best["num_heads"] == m.num_heads else best["num_heads"],
        best_params=best["params"], best_latency_ms=best["latency_ms"],
        budget={"max_params": max_params, "max_latency_ms": max_latency_ms}, pareto=front,
        budget_evals=budget_evals, seed=seed, checkpoint=str(ckpt.path), step=ckpt.step,
        seconds=time.perf_counter() - started)


def _size(size: Size, m) -> str:
    return f"depth {size.depth} mlp_ratio {size.mlp_ratio:g} heads {size.num_heads or m.num_heads}"


def _subnet_vit(cfg, task: str, depth: int, mlp_ratio: float, num_heads: int | None):
    """The exported timm subnet of that size (fewer heads: each of the supernet's width)."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(**subnet_args(cfg, task, depth, mlp_ratio, num_heads))
    return narrow_attention(vit, num_heads, cfg.model.embed_dim // cfg.model.num_heads) if num_heads else vit


def subnet_params(cfg, task: str, depth: int, mlp_ratio: float, num_heads: int | None = None) -> int:
    """Parameters of the exported timm subnet of that size (counted on the meta device)."""
    with torch.device("meta"):
        vit = _subnet_vit(cfg, task, depth, mlp_ratio, num_heads)
    return sum(p.numel() for p in vit.parameters())


def subnet_latency_ms(cfg, task: str, depth: int, mlp_ratio: float, runs: int = 20,
                      num_heads: int | None = None) -> float:
    """Milliseconds of one image through the exported timm subnet of that size, on this machine: the
    fastest of `runs` (other load on the machine only ever adds time)."""
    vit = _subnet_vit(cfg, task, depth, mlp_ratio, num_heads).eval()
    return torch_latency_ms(vit, (cfg.model.in_chans, *cfg.size_of(task)), 1, runs)


def torch_latency_ms(forward: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int], batch: int,
                     runs: int = 20) -> float:
    """Milliseconds of a batch of `batch` random images of `shape` through `forward` (eager torch, no
    gradients): the fastest of `runs` after 3 warm-up runs (other load only ever adds time)."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(runs + 3):
            start = time.perf_counter()
            forward(x)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 1000 * min(times)


def candidate_sizes(cfg, task: str, measure_latency: bool = True) -> list[Size]:
    """Every size the task trained (its elastic depths, widths and head counts, and the full one)."""
    m, e = cfg.model, cfg.tasks[task].elastic
    depths = sorted(set(e.depths if e else ()) | {m.depth})
    ratios = sorted(set(e.mlp_ratios if e else ()) | {m.mlp_ratio})
    heads = [None if n == m.num_heads else n for n in sorted(set(e.num_heads if e else ()) | {m.num_heads})]
    return [Size(d, r, subnet_params(cfg, task, d, r, n),
                 subnet_latency_ms(cfg, task, d, r, num_heads=n) if measure_latency else None, n)
            for d in depths for r in ratios for n in heads]


def pareto(candidates: list[dict]) -> list[dict]:
    """The candidates no other is at least as good as on metric, parameters and latency, and better on one."""
    def beats(a: dict, b: dict) -> bool:
        keys = [(a["value"], b["value"]), (-a["params"], -b["params"])]
        if a["latency_ms"] is not None and b["latency_ms"] is not None:
            keys.append((-a["latency_ms"], -b["latency_ms"]))
        return all(x >= y for x, y in keys) and any(x > y for x, y in keys)

    front = [c for c in candidates if not any(beats(o, c) for o in candidates)]
    unique = {(c["path"], c["depth"], c["mlp_ratio"], c.get("num_heads")): c for c in front}
    return sorted(unique.values(), key=lambda c: c["params"])


def write_result(result: SearchResult, out: Path) -> Path:
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return out


def read_result(file: str | Path, task: str) -> dict:
    """A `ufo search` result file for `task` (what `ufo export --path-from` takes)."""
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
    return result


def read_path(file: str | Path, task: str) -> str:
    """The best path a search result file holds for `task`."""
    return read_result(file, task)["best_path"]


def format_result(r: SearchResult) -> str:
    size = "" if r.best_depth is None and r.best_mlp_ratio is None and r.best_num_heads is None else \
        f" at depth {r.best_depth or '(full)'} mlp_ratio {r.best_mlp_ratio or '(full)'} heads " \
        f"{r.best_num_heads or '(full)'}"
    lines = [f"best path for {r.task}: {r.best_path}{size}  {r.metric} {r.best:.4f}  "
             f"{r.best_params / 1e6:.3f} M params" + (f", {r.best_latency_ms:.2f} ms" if r.best_latency_ms else "")]
    for name, b in r.baselines.items():
        lines.append(f"  {name:<11} {b['path']}  {r.metric} {b['value']:.4f}  "
                     f"({r.best - b['value']:+.4f} for the best)")
    if r.budget.get("max_params") is not None or r.budget.get("max_latency_ms") is not None:
        lines.append(f"  Pareto front ({r.metric} against parameters and latency):")
        lines.append(f"    {'path':<14} {'depth':>5} {'mlp_ratio':>9} {'heads':>5} {'params (M)':>10} "
                     f"{'latency (ms)':>12} {r.metric:>9}")
        for e in r.pareto:
            lines.append(f"    {e['path']:<14} {e['depth']:>5} {e['mlp_ratio']:>9g} {e.get('num_heads', ''):>5} "
                         f"{e['params'] / 1e6:>10.3f} {e['latency_ms'] or 0:>12.2f} {e['value']:>9.4f}")
    lines.append(f"  {len(r.evaluated)} candidates evaluated in {r.seconds:.1f} s")
    return "\n".join(lines)
