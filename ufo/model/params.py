"""Parameter accounting: the supernet's total, its shared part, each task's own part and subnet."""

from __future__ import annotations

from dataclasses import dataclass

from ufo.model.supernet import SupernetViT, subnet_state_dict


@dataclass(frozen=True)
class TaskParams:
    task: str
    kind: str
    path: str
    own: int  # the task's FFN-task MLPs and its head (training-only margin centers included)
    subnet: int  # the exported timm ViT on this path


@dataclass(frozen=True)
class ParamCounts:
    total: int
    shared: int  # patch embedding, tokens, attention, norms and every FFN-shared
    ffn_shared: int
    tasks: list[TaskParams]


def count_params(model: SupernetViT, paths: dict[str, str]) -> ParamCounts:
    """Counts from the model's parameters; each subnet count is that of its kept tensors."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())

    def is_task_owned(name: str) -> bool:
        return name.startswith(("heads.", "path_logits.")) or ".mlp.task." in name

    shared = sum(p.numel() for n, p in params.items() if not is_task_owned(n))
    ffn_shared = sum(p.numel() for n, p in params.items() if ".mlp.shared." in n)
    tasks = []
    for task, kind in model.task_kinds.items():
        own = sum(p.numel() for n, p in params.items()
                  if n.startswith((f"heads.{task}.", f"path_logits.{task}.")) or f".mlp.task.{task}." in n)
        kept = subnet_state_dict(params, task, paths[task], model.heads[task].deployed)
        tasks.append(TaskParams(task, kind, paths[task], own, sum(t.numel() for t in kept.values())))
    return ParamCounts(total, shared, ffn_shared, tasks)


def format_params(counts: ParamCounts) -> str:
    """The table `ufo info` prints."""
    def row(label: str, n: int) -> str:
        return f"  {label:<52} {n:>15,}  {n / 1e6:>9.2f} M  {100 * n / counts.total:>6.1f} %"

    lines = [f"  {'part':<52} {'parameters':>15}  {'millions':>11}  {'of total':>8}",
             row("supernet total", counts.total),
             row("shared (embeddings, attention, norms, FFN-shared)", counts.shared),
             row("  of which FFN-shared", counts.ffn_shared)]
    for t in counts.tasks:
        lines.append(row(f"task {t.task} ({t.kind}): FFN-task + head", t.own))
    for t in counts.tasks:
        lines.append(row(f"subnet {t.task} on path {t.path}", t.subnet))
    return "\n".join(lines)
