"""Evaluation metrics: top-1 accuracy for classification, Recall@1 and mAP for retrieval.

Retrieval follows the Stanford Online Products protocol: every evaluation sample is a query
against all the others (the gallery); queries whose class has no other sample are skipped.
"""

from __future__ import annotations

import torch


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item() if len(labels) else 0.0


def retrieval(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """embeddings: (n, d) L2-normalized. Recall@1 and mean average precision, leave-one-out."""
    n = len(labels)
    if n < 2:
        return {"recall@1": 0.0, "map": 0.0}
    sim = embeddings.float() @ embeddings.float().T
    sim.fill_diagonal_(-float("inf"))
    order = sim.argsort(dim=1, descending=True)[:, : n - 1]  # every other sample, best first
    relevant = labels[order] == labels[:, None]  # (n, n-1)
    has = relevant.any(dim=1)
    if not has.any():
        return {"recall@1": 0.0, "map": 0.0}
    relevant = relevant[has].float()
    recall1 = relevant[:, 0].mean().item()
    hits = relevant.cumsum(dim=1)
    ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float32)
    ap = ((hits / ranks) * relevant).sum(dim=1) / relevant.sum(dim=1)
    return {"recall@1": recall1, "map": ap.mean().item()}
