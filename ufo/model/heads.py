"""Task heads, one per task kind, on the pooled feature of the supernet.

classification: a linear layer (logits). retrieval: a linear embedding whose L2-normalized
output is deployed, trained through a margin softmax (CosFace or ArcFace) over class centers (the
ID loss), optionally with a batch-hard triplet loss beside it and a BNNeck between the two (as
fast-reid's `EmbeddingHead`: the triplet reads the embedding before the BatchNorm, the ID loss and
the deployed embedding after it).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ufo.config import TaskConfig, TripletConfig
from ufo.model.losses import triplet_loss


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

    def losses(self, features: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
               targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of the rows, and their logits; with soft `targets` (mixup, cutmix: timm's
        targets, label smoothing included) their cross-entropy, as timm's SoftTargetCrossEntropy."""
        logits = self(features)
        if targets is None:
            return self.loss(logits, labels, reduction), logits
        per_row = -(targets.to(logits.device, torch.float32) * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
        return (per_row.sum() if reduction == "sum" else per_row.mean()), logits

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


class BNNeck(nn.BatchNorm1d):
    """fast-reid's BNNeck: a BatchNorm1d whose bias is frozen at 0, computed in fp32 whatever the
    engine's precision (DeepSpeed's bf16 module keeps some of its tensors in fp32). A training batch
    of fewer than two rows (an empty slice, which every rank still passes) is normalized by the
    running statistics, which it leaves as they are."""

    EPS = 1e-5  # BatchNorm1d's: export folds with it

    def __init__(self, dim: int):
        super().__init__(dim, eps=self.EPS)
        self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.training and x.shape[0] >= 2:  # torch's BatchNorm: biased variance normalizes, unbiased is tracked
            mean, var = xf.mean(dim=0), xf.var(dim=0, unbiased=False)
            with torch.no_grad():
                n, m = x.shape[0], self.momentum
                self.running_mean.mul_(1 - m).add_((m * mean).to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_((m * var * n / (n - 1)).to(self.running_var.dtype))
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = (xf - mean) / (var + self.eps).sqrt() * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


class RetrievalHead(nn.Module):
    deployed = "embed"  # with a neck: the neck folded into it at export (`fold_bnneck`)

    def __init__(self, dim: int, embedding_dim: int, num_classes: int, margin: str, scale: float, value: float,
                 neck: str = "none", triplet: TripletConfig | None = None, id_loss_weight: float = 1.0):
        super().__init__()
        self.embed = nn.Linear(dim, embedding_dim)
        self.neck = BNNeck(embedding_dim) if neck == "bnneck" else None
        self.margin = MarginSoftmax(embedding_dim, num_classes, margin, scale, value)
        self.triplet, self.id_loss_weight = triplet, id_loss_weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, C) -> L2-normalized embedding (B, embedding_dim)."""
        z = self.embed(features)
        return F.normalize(self.neck(z) if self.neck is not None else z, dim=-1)

    def losses(self, features: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
               targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of the rows (ID loss on the embedding after the neck, triplet loss on the one
        before it), and their deployed embeddings."""
        z = self.embed(features)
        embedding = F.normalize(self.neck(z) if self.neck is not None else z, dim=-1)
        loss = self.id_loss_weight * self.margin(embedding, labels, reduction)
        if self.triplet is not None and self.triplet.weight:
            loss = loss + self.triplet.weight * triplet_loss(z, labels, self.triplet.margin, self.triplet.norm_feat,
                                                             reduction)
        return loss, embedding

    def hits(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.margin.hits(embedding, labels)


def build_head(task: TaskConfig, dim: int) -> nn.Module:
    if task.kind == "classification":
        return ClassificationHead(dim, task.num_classes, task.label_smoothing)
    return RetrievalHead(dim, head_out_dim(task, dim), task.num_classes, task.margin, task.margin_scale,
                         task.margin_value, task.neck, task.triplet, task.id_loss_weight)


def fold_bnneck(weight: torch.Tensor, bias: torch.Tensor,
                neck: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer followed by a BNNeck in eval mode (its `weight`, `bias`, `running_mean`,
    `running_var`), as one linear layer: BN(W x + b) = g (W x + b - mu) / sqrt(var + eps) + beta."""
    scale = neck["weight"].double() / (neck["running_var"].double() + BNNeck.EPS).sqrt()
    folded_bias = (bias.double() - neck["running_mean"].double()) * scale + neck["bias"].double()
    return (weight.double() * scale[:, None]).to(weight.dtype).contiguous(), folded_bias.to(bias.dtype)


def head_out_dim(task: TaskConfig, dim: int) -> int:
    """Width of the deployed head's output: classes, or the embedding size."""
    if task.kind == "classification":
        return task.num_classes
    return task.embedding_dim or dim


def postprocess(output: torch.Tensor, kind: str) -> torch.Tensor:
    """What a deployed subnet applies to timm's raw head output to match the supernet."""
    return F.normalize(output, dim=-1) if kind == "retrieval" else output
