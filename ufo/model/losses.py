"""Metric-learning losses of the retrieval heads (the batch-hard triplet loss) and the distillation
losses a student learns from its teacher with.

As fast-reid's `fastreid/modeling/losses/triplet_loss.py` (after Hermans et al. 2017, "In Defense
of the Triplet Loss for Person Re-Identification"): pairwise Euclidean distances (or cosine ones
of normalized embeddings), for each anchor its hardest positive (the farthest sample of its
identity, itself included) and hardest negative (the nearest of another identity), then
max(0, d_ap - d_an + margin), or the soft margin log(1 + exp(d_ap - d_an)) when the margin is 0.
The groups mined are the rows given: a rank's slice of its task, as fast-reid mines each GPU's
batch without gathering features.

Distillation, as each task kind's literature does it: logits KL at a temperature for classification
(Hinton et al. 2015; timm's `timm/task/distillation.py` LogitDistillationTask and DeiT's soft
distillation: KL(teacher || student) of the softmaxes at T, times T^2); for embeddings, regression on
the L2-normalized embeddings, and the relation between the batch's samples as fast-reid's FastDistill
transfers it (`pkt_loss`, Passalis & Tefas 2018: each row of the cosine-similarity matrix, mapped to
[0, 1] and normalised to a distribution, the student's against the teacher's by KL). Each is a sum or
mean over rows; the relational one relates the rows given (a rank's slice, as fast-reid relates each
GPU's batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FAR = 1e9  # added to positives' distances when looking for the nearest negative


def pairwise_distances(x: torch.Tensor, norm_feat: bool = False) -> torch.Tensor:
    """(N, D) -> (N, N): Euclidean distances, or 2 - 2 cos of the normalized rows (`norm_feat`)."""
    x = x.float()
    if norm_feat:
        x = F.normalize(x, dim=1)
        return 2 - 2 * x @ x.T
    sq = x.pow(2).sum(dim=1, keepdim=True)
    return (sq + sq.T - 2 * x @ x.T).clamp_min(1e-12).sqrt()


def triplet_loss(embedding: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, norm_feat: bool = False,
                 reduction: str = "mean") -> torch.Tensor:
    """Batch-hard triplet loss of the rows (B, D) with identities `labels` (B,); the sum or mean over anchors.
    An anchor with no negative among the rows adds 0."""
    if embedding.shape[0] == 0:
        return embedding.sum() * 0.0  # an empty slice: in the graph, no loss
    dist = pairwise_distances(embedding, norm_feat)
    same = labels[:, None] == labels[None, :]
    d_ap = (dist * same).max(dim=1).values
    d_an = (dist * ~same + same * FAR).min(dim=1).values
    per_anchor = F.softplus(d_ap - d_an) if margin == 0 else (d_ap - d_an + margin).clamp_min(0)
    return per_anchor.sum() if reduction == "sum" else per_anchor.mean()


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_row.sum() if reduction == "sum" else per_row.mean()


def kd_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str = "mean") -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) of each row, times T^2 (the gradients' scale stays
    that of the hard loss)."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(dim=-1) * temperature ** 2
    return _reduce(per_row, reduction)


def kd_embedding(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """|s - t|^2 of each row's L2-normalized embeddings (2 - 2 cos: 0 when they point alike)."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    per_row = (F.normalize(student.float(), dim=-1) - F.normalize(teacher.float(), dim=-1)).pow(2).sum(dim=-1)
    return _reduce(per_row, reduction)


def kd_relation(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean",
                eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer of the rows given: for each row, its cosine similarities to every
    row mapped to [0, 1] and normalised to sum 1, KL(teacher's || student's). fast-reid's `pkt_loss`
    averages over the n x n entries, this over the rows: its value times n."""
    n = student.shape[0]
    if n < 2:  # one row relates to nothing but itself
        return student.sum() * 0.0

    def distribution(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        similarity = (x @ x.T + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    s, t = distribution(student), distribution(teacher)
    per_row = (t * torch.log((t + eps) / (s + eps))).sum(dim=1)
    return _reduce(per_row, reduction)
