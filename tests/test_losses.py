"""The batch-hard triplet loss (ufo/model/losses.py) against a reference written here from its
definition (Hermans et al. 2017; fast-reid's hard mining and soft margin), one anchor at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ufo.model.losses import triplet_loss


def reference(x: np.ndarray, labels: np.ndarray, margin: float, norm_feat: bool) -> float:
    if norm_feat:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    losses = []
    for i in range(len(x)):
        if norm_feat:
            d = [2 - 2 * float(x[i] @ x[j]) for j in range(len(x))]
        else:
            d = [math.sqrt(max(float(((x[i] - x[j]) ** 2).sum()), 1e-12)) for j in range(len(x))]
        d_ap = max(d[j] for j in range(len(x)) if labels[j] == labels[i])  # itself included, as fast-reid
        negatives = [d[j] for j in range(len(x)) if labels[j] != labels[i]]
        if not negatives:
            losses.append(0.0)
            continue
        d_an = min(negatives)
        losses.append(math.log1p(math.exp(d_ap - d_an)) if margin == 0 else max(0.0, d_ap - d_an + margin))
    return float(np.mean(losses))


@pytest.mark.parametrize("margin,norm_feat", [(0.3, False), (0.0, False), (0.3, True), (0.0, True)])
def test_batch_hard_triplet_equals_the_definition(margin, norm_feat):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 8, generator=g)
    labels = torch.arange(6).repeat_interleave(4)  # P 6 x K 4, as a PK batch
    got = triplet_loss(x, labels, margin, norm_feat)
    want = reference(x.double().numpy(), labels.numpy(), margin, norm_feat)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert triplet_loss(x, labels, margin, norm_feat, reduction="sum").item() == pytest.approx(24 * want, rel=1e-5)
    assert 0 < want  # informative: some triplets are violated


def test_an_anchor_alone_with_its_identity_adds_nothing_and_the_gradient_flows():
    x = torch.randn(3, 4, requires_grad=True)
    assert triplet_loss(x, torch.tensor([1, 1, 1])).item() == 0.0  # no negative anywhere
    loss = triplet_loss(x, torch.tensor([1, 1, 2]), margin=5.0)
    loss.backward()
    assert loss.item() > 0 and x.grad.abs().sum() > 0
    empty = torch.zeros(0, 4, requires_grad=True)
    assert triplet_loss(empty, torch.zeros(0, dtype=torch.long), reduction="sum").item() == 0.0
