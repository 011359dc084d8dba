"""A student: any timm model trained on one task, its pooled features through the task's head, learning
from a teacher's outputs (distillation) beside the task's labels.

It keeps the supernet's calling convention (`forward(images, slices, labels, reduction, hits)`, one
slice), so the training loop, evaluation and checkpoints take it as they take the supernet. The
teacher is held outside the module's parameters and state (as fast-reid's Distiller holds its
teacher): never trained, saved, or partitioned by ZeRO.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ufo.config import DistillConfig
from ufo.model.losses import kd_embedding, kd_logits, kd_relation

Teacher = Callable[[torch.Tensor], torch.Tensor]  # images -> the deployed output (logits, normalized embedding)


class Student(nn.Module):
    """`backbone` (timm, `num_classes=0`: pooled features) -> the task's `head`; the task's loss on labels
    plus the distillation losses of its kind against `teacher`'s outputs on the same images."""

    def __init__(self, backbone: nn.Module, task: str, kind: str, head: nn.Module, distill: DistillConfig,
                 teacher: Teacher | None = None):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({task: head})
        self.task, self.kind, self.distill = task, kind, distill
        self.held = (task,)
        self._teacher = [teacher]  # a list: not a submodule

    @property
    def teacher(self) -> Teacher | None:
        return self._teacher[0]

    def forward(self, images: torch.Tensor, slices: Sequence, labels: torch.Tensor | None = None,
                reduction: str = "mean", hits: bool = False) -> list:
        """The one slice's head output, or (given labels) its loss, with `hits` a (loss, rows right) pair."""
        (s,) = slices
        if s.task != self.task:
            raise KeyError(f"unknown task {s.task!r}; this student learns {self.task!r}")
        head = self.heads[self.task]
        features = self.backbone(images)
        if labels is None:
            return [head(features)]
        loss, out = head.losses(features, labels, reduction, s.targets)
        loss = self.distill.task_weight * loss + self.distillation(images, out, reduction)
        return [(loss, head.hits(out, labels))] if hits else [loss]

    def distillation(self, images: torch.Tensor, out: torch.Tensor, reduction: str) -> torch.Tensor:
        """The distillation losses of the student's outputs `out` against the teacher's on `images`."""
        d = self.distill
        if not (d.logits_weight if self.kind == "classification" else d.embedding_weight or d.relation_weight):
            return out.sum() * 0.0  # trained alone (every distillation weight 0): no teacher is asked
        if self.teacher is None:
            raise RuntimeError("this student was built without its teacher (for evaluation or export only)")
        with torch.no_grad():
            target = self.teacher(images.float())
        if self.kind == "classification":
            return d.logits_weight * kd_logits(out, target, d.temperature, reduction)
        return d.embedding_weight * kd_embedding(out, target, reduction) + \
            d.relation_weight * kd_relation(out, target, reduction)

    def forward_task(self, images: torch.Tensor, task: str, *_, **__) -> torch.Tensor:
        """The whole batch as the task (paths and elastic sizes do not apply to a student)."""
        return self.heads[task](self.backbone(images))

    def compile_blocks(self) -> None:
        """train.compile: the backbone compiled by torch.compile (dynamic shapes), in place."""
        self.backbone.compile(dynamic=True)
