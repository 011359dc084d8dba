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
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ufo.config import PartialFcConfig, TaskConfig, TripletConfig
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
        logits = cos.scatter(1, labels[:, None], self.adjusted(target)) * self.scale
        return F.cross_entropy(logits, labels, reduction=reduction)

    def adjusted(self, target: torch.Tensor) -> torch.Tensor:
        """The target classes' cosines with the margin: cos - m (CosFace) or cos(theta + m) (ArcFace)."""
        if self.kind == "cosface":
            return target - self.margin
        sin = (1.0 - target * target).clamp_min(1e-12).sqrt()
        adjusted = target * math.cos(self.margin) - sin * math.sin(self.margin)
        # past theta = pi - m, cos(theta + m) is no longer decreasing: use the CosFace-like fallback
        return torch.where(target > math.cos(math.pi - self.margin),
                           adjusted, target - math.sin(math.pi - self.margin) * self.margin)

    @torch.no_grad()
    def hits(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How many rows are nearest to their own class center."""
        cos = F.linear(embedding, F.normalize(self.weight, dim=-1))
        return (cos.argmax(dim=-1) == labels).sum()


class PartialFC(MarginSoftmax):
    """A margin softmax whose class centres are split over the task's ranks: InsightFace's Partial FC
    (arcface_torch `partial_fc_v2.py`, PartialFC_V2), with its semantics.

    This rank holds centres [start, start + count) of `num_classes`. A step gathers the embeddings
    and labels of all the task's ranks (the gather's backward sums every rank's gradient of a row
    into the rank that owns it), computes their logits against its centres and normalises the
    softmax across the shards (max, sum of exponentials and target logit all-reduced: the loss of a
    row is log sum exp - target, as `F.cross_entropy`). With `sample_rate` < 1 only some centres
    take part: every positive (a class of the gathered batch), then random negatives up to
    int(sample_rate * count), as arcface_torch samples. Every rank of the task then has the loss of
    every row: the value returned is this rank's rows' (what the other heads return), its gradient
    that of all rows (the task's ranks scale their losses alike; DeepSpeed averages the gradients
    over the world, the centres reduced with no other rank).

    Built whole (`rows` None, no group) it is the dense head, sampling aside: a checkpoint's
    consolidated centres, export, evaluation. On a sharded rank (`placement.shard_model`) the shard
    is left out of the module's state dicts: ufo writes each rank's shard itself
    (`ufo.checkpoint.save_centres`), DeepSpeed's module files would give every rank the first's.
    """

    BLOCK = 4096  # centres initialised in blocks of rows, each from a seed of its own (`init_rows`)

    def __init__(self, dim: int, num_classes: int, kind: str, scale: float, margin: float,
                 sample_rate: float = 1.0, rows: tuple[int, int] | None = None):
        nn.Module.__init__(self)
        self.start, count = rows or (0, num_classes)
        self.num_classes, self.count, self.sample_rate = num_classes, count, sample_rate
        self.weight = nn.Parameter(torch.empty(count, dim))
        nn.init.normal_(self.weight, std=0.02)
        self.kind, self.scale, self.margin = kind, scale, margin
        self.group = None  # the task's process group once sharded; None: one shard holds every centre
        self.sharded = False  # set by placement.shard_model: the weight is not in state dicts

    @torch.no_grad()
    def init_rows(self, seed_of) -> None:
        """N(0, 0.02) centres, block b of BLOCK rows drawn from `seed_of(b)`: a shard holds the same
        values as those rows of the whole matrix, whatever the number of shards."""
        first, last = self.start // self.BLOCK, (self.start + self.count - 1) // self.BLOCK
        dim = self.weight.shape[1]
        for b in range(first, last + 1) if self.count else ():
            generator = torch.Generator().manual_seed(seed_of(b))
            block = torch.randn(self.BLOCK, dim, generator=generator) * 0.02
            lo, hi = max(self.start, b * self.BLOCK), min(self.start + self.count, (b + 1) * self.BLOCK)
            self.weight[lo - self.start:hi - self.start] = block[lo - b * self.BLOCK:hi - b * self.BLOCK]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.sharded:
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.sharded:
            state_dict.pop(prefix + "weight", None)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _gather(self, embedding: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every rank's rows of the task (this rank's at `offset`): (embeddings, labels, offset)."""
        if self.group is None:
            return embedding, labels, 0
        sizes = gather_sizes(embedding.shape[0], self.group, embedding.device)
        offset = sum(sizes[:dist.get_rank(self.group)])
        return (_AllGather.apply(embedding, self.group, sizes), gather_rows(labels, sizes, self.group), offset)

    def _sample(self, local: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """The centres this step computes: every positive, then random negatives (PartialFC_V2.sample)."""
        with torch.no_grad():
            classes = torch.unique(local[positive], sorted=True)
            wanted = int(self.sample_rate * self.count)
            if wanted < classes.numel():
                return classes
            perm = torch.rand(self.count, device=local.device)
            perm[classes] = 2.0
            return torch.topk(perm, k=wanted)[1].sort()[0]

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        everything, all_labels, offset = self._gather(embedding, labels)
        local = all_labels - self.start
        positive = (local >= 0) & (local < self.count)
        local = torch.where(positive, local, -1)
        weight = self.weight
        if self.sample_rate < 1.0:
            index = self._sample(local, positive)
            weight = weight[index]
            local = torch.where(positive, torch.searchsorted(index, local.clamp_min(0)), -1)
        cos = F.linear(everything, F.normalize(weight, dim=-1)).clamp(-1.0, 1.0)
        rows = positive.nonzero().squeeze(1)
        cols = local[rows]
        logits = cos.index_put((rows, cols), self.adjusted(cos[rows, cols])) * self.scale
        per_row = _DistCrossEntropy.apply(logits.float(), local, self.group)
        own = per_row[offset:offset + embedding.shape[0]]
        value, total = (own.sum(), per_row.sum()) if reduction == "sum" else (own.mean(), per_row.mean())
        return total + (value - total).detach()  # this rank's rows' loss, the gradient of all rows'

    @torch.no_grad()
    def hits(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return super().hits(embedding, labels)
        everything, all_labels, offset = self._gather(embedding, labels)
        cos = F.linear(everything, F.normalize(self.weight, dim=-1)).float()
        n = cos.shape[0]
        best = cos.max(dim=1).values if self.count else cos.new_full((n,), -math.inf)
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=self.group)
        local = all_labels - self.start
        mine = (local >= 0) & (local < self.count)
        target = torch.zeros(n, device=cos.device)
        target[mine] = cos[mine.nonzero().squeeze(1), local[mine]]
        dist.all_reduce(target, group=self.group)
        return (target >= best)[offset:offset + embedding.shape[0]].sum()


def gather_sizes(rows: int, group, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([rows], device=device), group=group)
    return [int(s) for s in sizes]


def gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Every rank's rows of x, in rank order (ranks may hold different numbers of rows)."""
    width = max(sizes)
    padded = x.new_zeros(width, *x.shape[1:])
    padded[:x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _AllGather(torch.autograd.Function):
    """Rows of every rank; the backward sums every rank's gradient of each row and keeps this rank's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
        ctx.group, ctx.sizes = group, sizes
        return gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[:dist.get_rank(ctx.group)])
        return grad[start:start + ctx.sizes[dist.get_rank(ctx.group)]], None, None


class _DistCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of logits split by columns over a group's ranks (`local`: the target's
    column on this rank, -1 where another rank holds it): log sum exp - target, from an all-reduced
    max, sum of exponentials and target logit (arcface_torch's DistCrossEntropy, without its clamp
    of the target probability)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, local: torch.Tensor, group) -> torch.Tensor:
        n = logits.shape[0]
        top = logits.max(dim=1).values if logits.shape[1] else logits.new_full((n,), -math.inf)
        if group is not None:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - top[:, None]).exp()
        mine = local >= 0
        sums = torch.zeros(2, n, dtype=logits.dtype, device=logits.device)
        sums[0] = exp.sum(dim=1)
        sums[1][mine] = logits[mine.nonzero().squeeze(1), local[mine]]
        if group is not None:
            dist.all_reduce(sums, group=group)
        ctx.save_for_backward(exp / sums[0][:, None], local)
        return sums[0].log() + top - sums[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        prob, local = ctx.saved_tensors
        mine = (local >= 0).nonzero().squeeze(1)
        prob = prob.clone()
        prob[mine, local[mine]] -= 1.0
        return prob * grad[:, None], None, None


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
                 neck: str = "none", triplet: TripletConfig | None = None, id_loss_weight: float = 1.0,
                 partial_fc: PartialFcConfig | None = None, rows: tuple[int, int] | None = None):
        super().__init__()
        self.embed = nn.Linear(dim, embedding_dim)
        self.neck = BNNeck(embedding_dim) if neck == "bnneck" else None
        self.margin = MarginSoftmax(embedding_dim, num_classes, margin, scale, value) if partial_fc is None else \
            PartialFC(embedding_dim, num_classes, margin, scale, value, partial_fc.sample_rate, rows)
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


def build_head(task: TaskConfig, dim: int, rows: tuple[int, int] | None = None) -> nn.Module:
    """A task's head; `rows` (start, count): the centres a Partial FC rank holds (None: all)."""
    if task.kind == "classification":
        return ClassificationHead(dim, task.num_classes, task.label_smoothing)
    return RetrievalHead(dim, head_out_dim(task, dim), task.num_classes, task.margin, task.margin_scale,
                         task.margin_value, task.neck, task.triplet, task.id_loss_weight, task.partial_fc, rows)



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
