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


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_partial_fc_whole_is_the_margin_softmax(kind):
    """One shard of every centre at sample_rate 1: the dense margin softmax's loss and gradients."""
    import torch.nn.functional as F

    from ufo.model.heads import MarginSoftmax, PartialFC

    torch.manual_seed(0)
    dense, partial = MarginSoftmax(8, 50, kind, 30.0, 0.4), PartialFC(8, 50, kind, 30.0, 0.4)
    partial.weight.data.copy_(dense.weight.data)
    e = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1).float().requires_grad_()
    y = torch.randint(0, 50, (12,))
    for reduction in ("sum", "mean"):
        a, b = dense(e, y, reduction), partial(e, y, reduction)
        assert abs(a.item() - b.item()) <= 1e-6 * abs(a.item())
        ga, gb = torch.autograd.grad(a, [e, dense.weight]), torch.autograd.grad(b, [e, partial.weight])
        for x, z in zip(ga, gb):
            assert (x - z).abs().max() <= 1e-5 * x.abs().max()


def test_partial_fc_samples_every_positive_and_rows_keep_their_values():
    """PartialFC_V2's sampling: positives always, random negatives up to int(rate * rows), in row order;
    a shard's centres are those rows of the whole matrix whatever the number of shards."""
    import torch.nn.functional as F

    from ufo.layout import centre_rows
    from ufo.model.heads import PartialFC

    whole = PartialFC(8, 10_000, "cosface", 30.0, 0.4, 0.1)
    whole.init_rows(lambda block: 1000 + block)
    for shards in (1, 3, 7):
        for index in range(shards):
            start, count = centre_rows(10_000, shards, index)
            part = PartialFC(8, 10_000, "cosface", 30.0, 0.4, 0.1, rows=(start, count))
            part.init_rows(lambda block: 1000 + block)
            assert torch.equal(part.weight, whole.weight[start:start + count])
    assert [centre_rows(10, 4, i) for i in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]  # arcface_torch's split
    part = PartialFC(8, 10_000, "cosface", 30.0, 0.4, 0.1, rows=(2000, 1000))
    local = torch.tensor([5, 999, 5, -1, -1, 10])
    index = part._sample(local, local >= 0)
    assert index.numel() == 100 and torch.equal(index, index.sort()[0])
    assert {5, 10, 999} <= set(index.tolist())
    many = torch.arange(0, 1000, 5)  # 200 positives: more than 10 %, so only they
    assert torch.equal(part._sample(many, many >= 0), many)
    # the loss over a sample: only the sampled centres get a gradient
    e = F.normalize(torch.randn(6, 8), dim=-1)
    labels = torch.tensor([2005, 2999, 2005, 7, 9000, 2010])
    torch.manual_seed(3)
    part(e, labels, "sum").backward()
    touched = part.weight.grad.abs().sum(dim=1) > 0
    assert touched.sum() == 100 and touched[[5, 10, 999]].all()
