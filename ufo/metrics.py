"""The evaluation protocols' arithmetic: how each community turns embeddings or logits into the
numbers it reports (`ufo/evaluate.py` reads the sets and runs them).

- `reid` (person and vehicle re-identification: Market-1501, DukeMTMC-reID, MSMT17, VeRi-776):
  every query against the gallery by cosine similarity; for each query the gallery samples of
  the same identity *and* the same camera are removed (they are not a re-identification);
  queries left with no match are skipped (and counted, by why); CMC Rank-1/5/10, mAP and mINP
  (Ye et al. 2021, the cost of finding the hardest match). As fast-reid computes them
  (`fastreid/evaluation/rank.py`, `eval_market1501`; torchreid's `metrics/rank.py` alike): AP is
  the mean of the precisions at each match. Market-1501's own MATLAB code (`compute_AP.m`)
  averages precision by the trapezoid rule instead and reports a lower mAP (0.456 against 0.475
  on the demo's persons).
- `verification` (faces: LFW, CFP-FP, AgeDB-30): image pairs, the squared distance of their
  L2-normalized embeddings, accuracy 10-fold cross-validated with the threshold chosen on the
  other nine folds (InsightFace's `verification.py`, thresholds 0 to 4 by 0.01); optional flip
  test (each image's embedding plus its mirror's); TAR at FAR 1e-4 and 1e-3 where there are
  enough negative pairs to measure that FAR.
- `retrieval` (products: Stanford Online Products): every sample a query against all the others;
  Recall@K for K = 1, 10, 100, 1000 (those below the set's size) and mAP.
- `classification`: top-1 and top-5 accuracy.

Similarities are computed a block of queries at a time, so memory stays bounded by the block
(a 50k x 50k gallery never needs its 10 GB matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

# the protocols' vocabulary, which data (what metadata a loader decodes) and evaluate both use
PROTOCOLS = ("classification", "retrieval", "reid", "verification")
# the number each protocol is ranked by (path search, `ufo bench`): the community's headline figure
PRIMARY = {"classification": "top1", "retrieval": "recall@1", "reid": "rank1", "verification": "acc"}
# the integer fields of a sample's .json each protocol needs beside its label (identity, pair index)
META_KEYS = {"classification": (), "retrieval": (), "reid": ("camera",), "verification": ("member", "same")}


@dataclass(frozen=True)
class EvalSet:
    """One measured evaluation set of a task: its protocol and its parts (role -> shard spec): `all`, or
    `query` and `gallery` (reid). `name` is None for a task's only set, else the set's own name (a
    face task's `lfw`, `cfp_fp`), which prefixes its metrics."""

    task: str
    name: str | None
    protocol: str
    parts: dict[str, str]

    def key(self, metric: str) -> str:
        return f"{self.name}/{metric}" if self.name else metric


def default_protocol(kind: str) -> str:
    return "classification" if kind == "classification" else "retrieval"


BLOCK_ELEMENTS = 1 << 24  # similarities (and their ranks) held at once: 16 M, ~0.3 GB with the sort


def _blocks(queries: int, gallery: int, block: int | None) -> range:
    rows = block or max(1, BLOCK_ELEMENTS // max(1, gallery))
    return range(0, queries, rows)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def classification(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy for each k the class count allows (`top1`, `top5`)."""
    if not len(labels):
        return {f"top{k}": 0.0 for k in ks if k <= logits.shape[1]}
    out = {}
    best = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    for k in ks:
        if k <= logits.shape[1]:
            out[f"top{k}"] = (best[:, :k] == labels[:, None]).any(dim=1).float().mean().item()
    return out


def reid(query: torch.Tensor, query_ids: torch.Tensor, query_cams: torch.Tensor, gallery: torch.Tensor,
         gallery_ids: torch.Tensor, gallery_cams: torch.Tensor, ranks: Sequence[int] = (1, 5, 10),
         block: int | None = None) -> dict[str, float]:
    """CMC Rank-k, mAP and mINP of `query` against `gallery` under the Market-1501 rules, computed as
    fast-reid's `eval_market1501` does, and the number of queries measured (see `reid_skipped`)."""
    q, g = _normalized(query), _normalized(gallery)
    hits_at = torch.zeros(len(ranks), dtype=torch.float64)
    ap_sum = inp_sum = 0.0
    valid_queries = 0
    for start in _blocks(len(q), len(g), block):
        stop = min(start + (block or max(1, BLOCK_ELEMENTS // max(1, len(g)))), len(q))
        order = (q[start:stop] @ g.T).argsort(dim=1, descending=True, stable=True)
        same_id = gallery_ids[order] == query_ids[start:stop, None]
        junk = same_id & (gallery_cams[order] == query_cams[start:stop, None])
        kept = ~junk
        match = same_id & kept
        position = kept.long().cumsum(dim=1) - 1  # rank among the kept gallery samples
        found = match.any(dim=1)
        if not found.any():
            continue
        match, position = match[found], position[found]
        big = torch.iinfo(torch.long).max
        first = torch.where(match, position, big).min(dim=1).values
        last = torch.where(match, position, -1).max(dim=1).values
        relevant = match.sum(dim=1).double()
        # precision at each match: matches so far over its rank among the kept (junk has no rank)
        precision = torch.where(match, match.double().cumsum(dim=1) / (position.double() + 1).clamp_min(1), 0.0)
        ap_sum += (precision.sum(dim=1) / relevant).sum().item()
        inp_sum += (relevant / (last.double() + 1)).sum().item()
        hits_at += torch.tensor([(first < k).sum().item() for k in ranks], dtype=torch.float64)
        valid_queries += int(found.sum())
    if valid_queries == 0:
        return {**{f"rank{k}": 0.0 for k in ranks}, "map": 0.0, "minp": 0.0, "queries": 0}
    return {**{f"rank{k}": float(h) / valid_queries for k, h in zip(ranks, hits_at)},
            "map": ap_sum / valid_queries, "minp": inp_sum / valid_queries, "queries": valid_queries}


def reid_skipped(query_ids: torch.Tensor, query_cams: torch.Tensor, gallery_ids: torch.Tensor,
                 gallery_cams: torch.Tensor) -> dict[str, int]:
    """The queries `reid` skips, by why: their identity is not in the gallery at all
    (`skipped_absent`), or only in their own camera (`skipped_same_camera`, all removed)."""
    cameras: dict[int, set[int]] = {}
    for pid, cam in zip(gallery_ids.tolist(), gallery_cams.tolist()):
        cameras.setdefault(pid, set()).add(cam)
    absent = same_camera = 0
    for pid, cam in zip(query_ids.tolist(), query_cams.tolist()):
        if pid not in cameras:
            absent += 1
        elif not cameras[pid] - {cam}:
            same_camera += 1
    return {"skipped_absent": absent, "skipped_same_camera": same_camera}


def retrieval(embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 10, 100, 1000),
              block: int | None = None) -> dict[str, float]:
    """Leave-one-out Recall@K (K below the set's size) and mAP: every sample against all the others;
    a sample whose class has no other sample is no query."""
    x = _normalized(embeddings)
    n = len(x)
    ks = [k for k in ks if k < n]
    hits = torch.zeros(len(ks), dtype=torch.float64)
    ap_sum, queries = 0.0, 0
    for start in _blocks(n, n, block):
        stop = min(start + (block or max(1, BLOCK_ELEMENTS // max(1, n))), n)
        sim = x[start:stop] @ x.T
        sim[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf  # not itself
        order = sim.argsort(dim=1, descending=True, stable=True)[:, : n - 1]
        match = labels[order] == labels[start:stop, None]
        found = match.any(dim=1)
        if not found.any():
            continue
        match = match[found]
        first = match.float().argmax(dim=1)
        precision = match.double().cumsum(dim=1) / torch.arange(1, n, dtype=torch.float64)
        ap_sum += ((precision * match).sum(dim=1) / match.sum(dim=1)).sum().item()
        hits += torch.tensor([(first < k).sum().item() for k in ks], dtype=torch.float64)
        queries += int(found.sum())
    if queries == 0:
        return {**{f"recall@{k}": 0.0 for k in ks}, "map": 0.0, "queries": 0}
    return {**{f"recall@{k}": float(h) / queries for k, h in zip(ks, hits)}, "map": ap_sum / queries,
            "queries": queries}


def verification(first: torch.Tensor, second: torch.Tensor, same: torch.Tensor, index: torch.Tensor | None = None,
                 total: int | None = None, folds: int = 10, fars: Sequence[float] = (1e-4, 1e-3)
                 ) -> dict[str, float]:
    """Pair verification: 10-fold accuracy (threshold chosen on the other folds; folds contiguous, as
    sklearn's KFold without shuffling), its spread, and TAR at each FAR the negatives can measure.

    `index`: each pair's position in the set's list of `total` pairs (default: 0..n-1 of n). The folds
    are cut over the whole list, so a pair left out (a bad sample) moves no other pair's fold, as in
    InsightFace's split of the full list."""
    a, b = _normalized(first), _normalized(second)
    dist = (a - b).pow(2).sum(dim=1).double()
    same = same.bool()
    thresholds = torch.arange(0, 4, 0.01, dtype=torch.float64)
    n = len(dist)
    index = torch.arange(n) if index is None else index.long()
    total = n if total is None else total
    sizes = [total // folds + (i < total % folds) for i in range(folds)]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    predicted = dist[None, :] < thresholds[:, None]  # (thresholds, pairs)
    right = (predicted == same[None, :]).double()
    accuracies = []
    for i in range(folds):
        test = (index >= bounds[i]) & (index < bounds[i + 1])
        if not test.any():
            continue
        train_acc = right[:, ~test].mean(dim=1)
        best = int(torch.nonzero(train_acc == train_acc.max())[0])  # the first best, as numpy's argmax
        accuracies.append(right[best, test].mean().item())
    acc = torch.tensor(accuracies, dtype=torch.float64)
    out = {"acc": acc.mean().item(), "acc_std": acc.std(unbiased=False).item(), "pairs": n}
    negatives = torch.sort(dist[~same]).values
    for far in fars:
        allowed = int(math.floor(far * len(negatives)))
        if allowed < 1:
            continue  # fewer than 1/FAR negatives: that FAR cannot be measured
        threshold = negatives[allowed]  # `allowed` negatives lie below it
        out[f"tar@far={far:g}"] = (dist[same] < threshold).double().mean().item()
    return out


def pairs_of(out: torch.Tensor, labels: torch.Tensor, meta: torch.Tensor) -> tuple:
    """A pair split's samples (label: pair index; meta: member 0/1, same) as (first, second, same, index,
    total): the whole pairs in index order, their indices, and the list's length (the highest index
    seen, whole or not, plus one); a pair missing a member (a bad sample) is left out."""
    first: dict[int, int] = {}
    second: dict[int, int] = {}
    for i, (pair, member) in enumerate(zip(labels.tolist(), meta[:, 0].tolist())):
        (second if member else first)[pair] = i
    whole = sorted(set(first) & set(second))
    a = torch.tensor([first[p] for p in whole], dtype=torch.long)
    b = torch.tensor([second[p] for p in whole], dtype=torch.long)
    total = int(labels.max()) + 1 if len(labels) else 0
    return out[a], out[b], meta[a, 1].bool(), torch.tensor(whole, dtype=torch.long), total
