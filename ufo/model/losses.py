"""Metric-learning losses of the retrieval heads: the batch-hard triplet loss.

As fast-reid's `fastreid/modeling/losses/triplet_loss.py` (after Hermans et al. 2017, "In Defense
of the Triplet Loss for Person Re-Identification"): pairwise Euclidean distances (or cosine ones
of normalized embeddings), for each anchor its hardest positive (the farthest sample of its
identity, itself included) and hardest negative (the nearest of another identity), then
max(0, d_ap - d_an + margin), or the soft margin log(1 + exp(d_ap - d_an)) when the margin is 0.
The groups mined are the rows given: a rank's slice of its task, as fast-reid mines each GPU's
batch without gathering features.
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
