"""The evaluation protocols against independent reference implementations written here from their
definitions (numpy, one query at a time), on random embeddings with planted identities and cameras."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ufo import metrics


def planted(n: int, ids: int, cams: int, dim: int = 16, noise: float = 1.0, seed: int = 0):
    centers = torch.randn(ids, dim, generator=torch.Generator().manual_seed(ids))  # shared by query and gallery
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, ids, (n,), generator=g)
    cameras = torch.randint(0, cams, (n,), generator=g)
    x = centers[labels] + noise * torch.randn(n, dim, generator=g)
    return x, labels, cameras


def reference_market1501(qf, q_pids, q_camids, gf, g_pids, g_camids, max_rank=10):
    """The Market-1501 protocol as its reference code states it, query by query."""
    qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    distmat = 1 - qf @ gf.T
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(len(qf)):
        order = np.argsort(distmat[i], kind="stable")
        remove = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        raw_cmc = (g_pids[order] == q_pids[i]).astype(np.int32)[~remove]
        if not raw_cmc.any():
            continue
        cmc = raw_cmc.cumsum()
        pos = np.where(raw_cmc == 1)[0]
        all_inp.append(cmc[pos.max()] / (pos.max() + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = raw_cmc.sum()
        tmp = raw_cmc.cumsum() / (np.arange(len(raw_cmc)) + 1.0) * raw_cmc
        all_ap.append(tmp.sum() / num_rel)
    cmc = np.asarray(all_cmc).astype(np.float64).sum(0) / len(all_cmc)
    return {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "map": np.mean(all_ap), "minp": np.mean(all_inp),
            "queries": len(all_cmc)}


@pytest.mark.parametrize("block", [None, 7])
def test_reid_equals_the_market1501_reference(block):
    g, g_ids, g_cams = planted(400, 40, 6, noise=1.2, seed=1)
    q, q_ids, q_cams = planted(120, 40, 6, noise=1.2, seed=2)
    q_ids[:5] = 999  # queries of an identity the gallery lacks: skipped
    got = metrics.reid(q, q_ids, q_cams, g, g_ids, g_cams, block=block)
    want = reference_market1501(q.numpy(), q_ids.numpy(), q_cams.numpy(), g.numpy(), g_ids.numpy(), g_cams.numpy())
    assert got["queries"] == want["queries"] == 115
    for key in ("rank1", "rank5", "rank10", "map", "minp"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert 0.05 < got["map"] < 0.95  # informative data: neither chance nor trivial


def test_reid_drops_same_camera_matches():
    # the only match of the query is in its own camera: no valid match, the query is skipped
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = metrics.reid(torch.tensor([[1.0, 0.0]]), torch.tensor([3]), torch.tensor([0]), g, torch.tensor([3, 4]),
                        torch.tensor([0, 1]))
    assert out["queries"] == 0
    out = metrics.reid(torch.tensor([[1.0, 0.0]]), torch.tensor([3]), torch.tensor([1]), g, torch.tensor([3, 4]),
                        torch.tensor([0, 1]))
    assert out == {"rank1": 1.0, "rank5": 1.0, "rank10": 1.0, "map": 1.0, "minp": 1.0, "queries": 1}


def reference_recall_at_k(x, labels, ks):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    hits, aps, queries = np.zeros(len(ks)), [], 0
    for i in range(len(x)):
        order = np.argsort(-sim[i], kind="stable")[: len(x) - 1]
        rel = labels[order] == labels[i]
        if not rel.any():
            continue
        queries += 1
        first = np.argmax(rel)
        hits += [first < k for k in ks]
        aps.append((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / rel.sum())
    return {**{f"recall@{k}": h / queries for k, h in zip(ks, hits)}, "map": np.mean(aps), "queries": queries}


@pytest.mark.parametrize("block", [None, 13])
def test_retrieval_equals_the_leave_one_out_reference(block):
    x, labels, _ = planted(300, 60, 1, seed=3)
    labels[0] = 1000  # a class of one sample: no query
    got = metrics.retrieval(x, labels, block=block)
    want = reference_recall_at_k(x.numpy(), labels.numpy(), [1, 10, 100])
    assert set(got) == {"recall@1", "recall@10", "recall@100", "map", "queries"}  # no K of 1000 in 300 samples
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def reference_lfw(e1, e2, same, folds=10):
    """InsightFace's calculate_roc accuracy: 10 contiguous folds, best threshold on the other nine."""
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = np.sum(np.square(e1 - e2), 1)
    thresholds = np.arange(0, 4, 0.01)
    n = len(dist)
    idx = np.arange(n)
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    edges = np.concatenate([[0], np.cumsum(sizes)])
    accs = []
    for f in range(folds):
        test = idx[edges[f]:edges[f + 1]]
        train = np.setdiff1d(idx, test)
        acc_train = [np.mean((dist[train] < t) == same[train]) for t in thresholds]
        best = thresholds[int(np.argmax(acc_train))]
        accs.append(np.mean((dist[test] < best) == same[test]))
    return np.mean(accs), np.std(accs)


def test_verification_equals_the_insightface_reference():
    x, ids, _ = planted(1200, 300, 1, noise=0.9, seed=4)
    first, second = x[:600], x[600:]
    same = ids[:600] == ids[600:]
    second[:300] = first[:300] + 0.9 * torch.randn(300, 16, generator=torch.Generator().manual_seed(5))
    same[:300] = True
    got = metrics.verification(first, second, same)
    acc, std = reference_lfw(first.numpy(), second.numpy(), same.numpy())
    assert got["acc"] == pytest.approx(acc, abs=1e-9) and got["acc_std"] == pytest.approx(std, abs=1e-9)
    assert 0.6 < got["acc"] < 0.99
    assert "tar@far=0.001" not in got  # 300 negatives cannot measure a FAR of 1e-3


def test_tar_at_far_where_the_negatives_measure_it():
    g = torch.Generator().manual_seed(6)
    pos = torch.randn(2000, 8, generator=g)
    first = torch.cat([pos, torch.randn(20000, 8, generator=g)])
    second = torch.cat([pos + 0.5 * torch.randn(2000, 8, generator=g), torch.randn(20000, 8, generator=g)])
    same = torch.cat([torch.ones(2000, dtype=torch.bool), torch.zeros(20000, dtype=torch.bool)])
    got = metrics.verification(first, second, same)
    a, b = torch.nn.functional.normalize(first, dim=1), torch.nn.functional.normalize(second, dim=1)
    dist = (a - b).pow(2).sum(1)
    for far in (1e-4, 1e-3):
        threshold = torch.sort(dist[~same]).values[int(far * 20000)]
        assert ((dist[~same] < threshold).double().mean().item()) <= far
        assert got[f"tar@far={far:g}"] == pytest.approx((dist[same] < threshold).double().mean().item())
    assert 0 < got["tar@far=0.0001"] <= got["tar@far=0.001"] < 1


def test_classification_top1_and_top5():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.2, 0.3, 0.4, 0.0]])
    assert metrics.classification(logits, torch.tensor([1, 5])) == {"top1": 0.5, "top5": 0.5}
    assert metrics.classification(logits, torch.tensor([1, 2])) == {"top1": 0.5, "top5": 1.0}
    assert metrics.classification(logits[:, :3], torch.tensor([1, 2])) == {"top1": 0.5}  # 3 classes: no top-5


def test_a_large_gallery_is_evaluated_in_bounded_blocks(monkeypatch):
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 1000)  # 2 query rows of a 500-sample gallery at a time
    g, g_ids, g_cams = planted(500, 50, 4, seed=7)
    q, q_ids, q_cams = planted(60, 50, 4, seed=8)
    small = metrics.reid(q, q_ids, q_cams, g, g_ids, g_cams)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 1 << 24)
    assert small == pytest.approx(metrics.reid(q, q_ids, q_cams, g, g_ids, g_cams))


def test_reid_counts_the_queries_it_skips_and_why():
    # gallery: identity 3 in camera 0 only, identity 4 in camera 1
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g_ids, g_cams = torch.tensor([3, 4]), torch.tensor([0, 1])
    # queries: 3 in camera 0 (its only match is in its own camera), 9 (not in the gallery), 4 in camera 0
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q_ids, q_cams = torch.tensor([3, 9, 4]), torch.tensor([0, 0, 0])
    assert metrics.reid(q, q_ids, q_cams, g, g_ids, g_cams)["queries"] == 1
    assert metrics.reid_skipped(q_ids, q_cams, g_ids, g_cams) == {"skipped_absent": 1, "skipped_same_camera": 1}
    from ufo.evaluate import measure

    meta = lambda cams: cams[:, None]  # noqa: E731  (the reid protocol's metadata: the camera)
    report = measure("reid", {"query": (q, q_ids, meta(q_cams)), "gallery": (g, g_ids, meta(g_cams))})
    assert (report["queries"], report["skipped_absent"], report["skipped_same_camera"]) == (1, 1, 1)


def reference_insightface_folds(dist: np.ndarray, same: np.ndarray, total: int, lost: set[int]) -> float:
    """InsightFace's 10-fold accuracy (sklearn's KFold over the whole list of pairs, no shuffle), with the
    pairs in `lost` left out of whichever fold the list put them in."""
    from sklearn.model_selection import KFold

    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(total)):
        train = np.array([i for i in train if i not in lost])
        test = np.array([i for i in test if i not in lost])
        train_acc = [np.mean((dist[train] < t) == same[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < best) == same[test]))
    return float(np.mean(accs))


def test_a_pair_that_lost_a_member_leaves_every_other_pair_in_its_fold():
    torch.manual_seed(5)
    n, lost = 40, 0  # the first pair loses its second image: every later pair would shift a fold
    same = torch.arange(n) % 2 == 0
    first = torch.randn(n, 8)
    second = torch.where(same[:, None], first + 0.9 * torch.randn(n, 8), torch.randn(n, 8))
    # the pair split as the loader reads it: label = pair index, meta = (member, same)
    out = torch.cat([first, second[1:]])
    labels = torch.cat([torch.arange(n), torch.arange(1, n)])
    meta = torch.stack([torch.cat([torch.zeros(n), torch.ones(n - 1)]),
                        torch.cat([same, same[1:]]).float()], dim=1).long()
    got = metrics.verification(*metrics.pairs_of(out, labels, meta))
    a, b = torch.nn.functional.normalize(first, dim=1), torch.nn.functional.normalize(second, dim=1)
    dist = (a - b).pow(2).sum(dim=1).double().numpy()
    want = reference_insightface_folds(dist, same.numpy(), n, {lost})
    assert got["pairs"] == n - 1
    assert got["acc"] == pytest.approx(want, abs=1e-9)
    refolded = metrics.verification(first[1:], second[1:], same[1:])  # folds cut over the 39 pairs left
    assert refolded["acc"] != pytest.approx(want, abs=1e-9)  # the data tell the two splits apart
