import torch
import torch.nn.functional as F

from ufo.metrics import retrieval, top1
from ufo.model.paths import PathPolicy


def test_top1():
    assert abs(top1(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 0, 0])) - 2 / 3) < 1e-6


def test_retrieval_by_hand():
    # a and b are class 0, c is class 1; a's nearest is c, then b: AP(a) = 1/2
    e = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]), dim=-1)
    labels = torch.tensor([0, 0, 1])
    r = retrieval(e, labels)
    # queries with a same-class gallery item: a (ranks c, b -> AP 1/2, R@1 0), b (ranks c, a -> AP 1/2, R@1 0)
    assert r == {"recall@1": 0.0, "map": 0.5}
    e2 = F.normalize(torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0]]), dim=-1)
    assert retrieval(e2, labels) == {"recall@1": 1.0, "map": 1.0}


def test_sampled_paths_are_seeded_per_step_and_task():
    policy = PathPolicy("sample", {"a": "SSSSSSSS", "b": "TTTTTTTT"}, seed=3, p_task=0.5)
    assert policy.paths_at(7) == PathPolicy("sample", {"a": "SSSSSSSS", "b": "TTTTTTTT"}, seed=3).paths_at(7)
    draws = {policy.paths_at(s)["a"] for s in range(20)}
    assert len(draws) > 10 and all(len(p) == 8 and set(p) <= {"S", "T"} for p in draws)
    assert policy.paths_at(1)["a"] != policy.paths_at(1)["b"] or policy.paths_at(2)["a"] != policy.paths_at(2)["b"]
    assert PathPolicy("fixed", {"a": "SSTT"}).paths_at(5) == {"a": "SSTT"}
