"""Task heads, one per task kind, on the pooled feature of the supernet.

classification: a linear layer (logits). retrieval: a linear embedding whose L2-normalized
output is deployed, trained through a margin softmax (CosFace or ArcFace) over class centers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ufo.config import TaskConfig


class ClassificationHead(nn.Module):
    deployed = "fc"  # the submodule that becomes timm's `head` in the subnet

    def __init__(self, dim: int, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.label_smoothing = label_smoothing

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, C) -> logits (B, num_classes)."""
        return self.fc(features)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction=reduction)

    @torch.no_grad()
    def hits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How many rows the head classifies right (a training KPI)."""
        return (logits.argmax(dim=-1) == labels).sum()


class MarginSoftmax(nn.Module):
    """CosFace (cos - m) or ArcFace (cos(theta + m)) logits over normalized class centers, then CE."""

    def __init__(self, dim: int, num_classes: int, kind: str, scale: float, margin: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.02)
        self.kind, self.scale, self.margin = kind, scale, margin

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """embedding: (B, D), already L2-normalized -> scalar loss (mean or sum over B)."""
        cos = F.linear(embedding, F.normalize(self.weight, dim=-1)).clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        if self.kind == "cosface":
            adjusted = target - self.margin
        else:
            sin = (1.0 - target * target).clamp_min(1e-12).sqrt()
            adjusted = target * math.cos(self.margin) - sin * math.sin(self.margin)
            # past theta = pi - m, cos(theta + m) is no longer decreasing: use the CosFace-like fallback
            adjusted = torch.where(target > math.cos(math.pi - self.margin),
                                   adjusted, target - math.sin(math.pi - self.margin) * self.margin)
        logits = cos.scatter(1, labels[:, None], adjusted) * self.scale
        return F.cross_entropy(logits, labels, reduction=reduction)

    @torch.no_grad()
    def hits(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How many rows are nearest to their own class center."""
        cos = F.linear(embedding, F.normalize(self.weight, dim=-1))
        return (cos.argmax(dim=-1) == labels).sum()


class RetrievalHead(nn.Module):
    deployed = "embed"

    def __init__(self, dim: int, embedding_dim: int, num_classes: int, margin: str, scale: float, value: float):
        super().__init__()
        self.embed = nn.Linear(dim, embedding_dim)
        self.margin = MarginSoftmax(embedding_dim, num_classes, margin, scale, value)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, C) -> L2-normalized embedding (B, embedding_dim)."""
        return F.normalize(self.embed(features), dim=-1)

    def loss(self, embedding: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return self.margin(embedding, labels, reduction)

    def hits(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.margin.hits(embedding, labels)


def build_head(task: TaskConfig, dim: int) -> nn.Module:
    if task.kind == "classification":
        return ClassificationHead(dim, task.num_classes, task.label_smoothing)
    return RetrievalHead(dim, head_out_dim(task, dim), task.num_classes,
                         task.margin, task.margin_scale, task.margin_value)


def head_out_dim(task: TaskConfig, dim: int) -> int:
    """Width of the deployed head's output: classes, or the embedding size."""
    if task.kind == "classification":
        return task.num_classes
    return task.embedding_dim or dim


def postprocess(output: torch.Tensor, kind: str) -> torch.Tensor:
    """What a deployed subnet applies to timm's raw head output to match the supernet."""
    return F.normalize(output, dim=-1) if kind == "retrieval" else output
