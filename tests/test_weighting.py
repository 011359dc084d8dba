"""Loss weighting: each strategy against its formula, the invariances it claims, and its distributed life."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_train import leave
from tiny import TINY
from ufo.config import config_from_dict
from ufo.errors import ConfigError
from ufo.weighting import STRATEGIES, Observation, build_weighting, label_entropy

TASKS = ["face", "digits"]


def obs(losses, grad_norms=None, accuracies=None) -> Observation:
    as_tensor = (lambda v: None if v is None else torch.tensor(v, dtype=torch.float64))
    return Observation(as_tensor(losses), as_tensor(grad_norms), as_tensor(accuracies))


def make(name: str, entropies=None, **params):
    raw = copy.deepcopy(TINY)
    raw["tasks"] = {t: raw["tasks"][t] for t in TASKS}
    raw["tasks"]["digits"]["weight"] = 2.0
    raw["train"] = {"weighting": {"name": name, **params}}
    return build_weighting(config_from_dict(raw, "test"), entropies)


def close(tensor: torch.Tensor, expected) -> bool:
    return torch.allclose(tensor, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_manual_strategies_follow_their_formulas():
    assert close(make("equal").weights(obs([2.0, 4.0])), [0.5, 0.5])
    assert close(make("static").weights(obs([2.0, 4.0])), [1.0, 2.0])

    initial = make("initial")
    assert close(initial.weights(obs([2.0, 4.0])), [0.5, 0.25])
    assert close(initial.weights(obs([1.0, 8.0])), [0.5, 0.25])  # 1 / the first loss, always

    prior = make("prior", entropies={"face": math.log(2), "digits": math.log(4)})
    assert close(prior.weights(obs([2.0, 4.0])), [1 / math.log(2), 1 / math.log(4)])
    assert label_entropy({0: 5, 1: 5}) == pytest.approx(math.log(2))
    assert label_entropy([3, 3, 3, 0]) == pytest.approx(math.log(3))

    realtime = make("realtime")
    assert close(realtime.weights(obs([2.0, 4.0])), [0.5, 0.25])
    assert close(realtime.weights(obs([1.0, math.nan])), [1.0, 1.0])  # no samples: an unused, finite weight

    assert close(make("gradnorm_static").weights(obs([2.0, 4.0], grad_norms=[0.5, 4.0])), [2.0, 0.25])

    lbtw = make("lbtw", alpha=0.5)
    assert close(lbtw.weights(obs([2.0, 4.0])), [1.0, 1.0])
    assert close(lbtw.weights(obs([0.5, 4.0])), [0.5, 1.0])  # (L / L0)^alpha


def test_uncertainty_learns_log_variances():
    u = make("uncertainty", lr=0.1)
    assert close(u.weights(obs([2.0, 0.5])), [1.0, 1.0])
    # d/ds (exp(-s) L + s) = 1 - L at s = 0: [-1, 0.5]; Adam's first step moves each s by lr against its sign
    u.step(obs([2.0, 0.5]))
    assert close(u.weights(obs([2.0, 0.5])), [math.exp(-0.1), math.exp(0.1)])


def test_gradnorm_balances_weighted_gradient_norms():
    g = make("gradnorm", alpha=1.5, lr=0.1, initial_steps=1)  # L0 from the first step, as Chen et al.
    assert close(g.weights(obs([2.0, 4.0], grad_norms=[1.0, 3.0])), [1.0, 1.0])
    # step 1: L0 = L, rates 1; G = [1, 3], target mean(G) = 2; d|G - target|/dw = sign(G - target) g = [-1, 3]
    g.step(obs([2.0, 4.0], grad_norms=[1.0, 3.0]))
    assert close(g.weights(obs([1.0, 4.0])), [1.1, 0.9])  # Adam's first step: lr against the sign; sum stays 2
    # step 2: L/L0 = [0.5, 1], r = [2/3, 4/3]; G = [1.1, 2.7], target = 1.9 r^1.5 = [1.034, 2.925] -> grad [1, -3]
    g.step(obs([1.0, 4.0], grad_norms=[1.0, 3.0]))
    b1, b2 = 0.9, 0.999
    m = [b1 * 0.1 * -1 + 0.1 * 1, b1 * 0.1 * 3 + 0.1 * -3]
    v = [b2 * 0.001 * 1 + 0.001 * 1, b2 * 0.001 * 9 + 0.001 * 9]
    w = [w0 - 0.1 * (mi / (1 - b1 ** 2)) / (math.sqrt(vi / (1 - b2 ** 2)) + 1e-8)
         for w0, mi, vi in zip([1.1, 0.9], m, v)]
    assert close(g.weights(obs([1.0, 4.0])), [wi * 2 / sum(w) for wi in w])


def test_gradnorm_takes_l0_as_the_mean_of_the_first_steps():
    g = make("gradnorm", alpha=1.5, lr=0.1, initial_steps=3)
    for losses in ([1e-6, 4.0], [2.0, 2.0], [3.0, 6.0], [100.0, 100.0]):
        g.step(obs(losses, grad_norms=[1.0, 1.0]))
    assert close(g.values()["first_loss"], [(1e-6 + 2.0 + 3.0) / 3, 4.0])


EDGES = [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [math.nan, 2.0], [0.0, math.nan], [1e-300, 3.0], [5.0, 1e-300],
         [0.0, 0.0], [2.0, 0.0], [math.nan, math.nan], [0.0, 4.0]]


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "prior"])
def test_no_weight_is_ever_nan_or_inf_on_zero_tiny_or_missing_losses(name):
    w = make(name, window=2) if name == "dwa" else make(name)
    for losses in EDGES * 3:
        o = obs(losses, grad_norms=[0.0 if not math.isnan(v) else math.nan for v in losses],
                accuracies=[0.0 if not math.isnan(v) else math.nan for v in losses])
        weights = w.weights(o)
        assert torch.isfinite(weights).all(), (name, losses, weights)
        w.step(o)
        assert all(torch.isfinite(v[torch.isfinite(v)]).all() for v in w.values().values())


def test_lbtw_with_a_first_loss_of_zero_waits_for_a_positive_one():
    lbtw = make("lbtw", alpha=0.5)
    assert close(lbtw.weights(obs([0.0, 4.0])), [1.0, 1.0])
    assert close(lbtw.weights(obs([2.0, 1.0])), [1.0, 0.5])  # L0 = 2 (first positive), 4
    assert close(lbtw.weights(obs([0.5, 1.0])), [0.5, 0.5])


def test_lbtw_normalized_as_the_authors_code_sums_to_the_task_count():
    lbtw = make("lbtw", alpha=0.5, normalize=True)
    lbtw.weights(obs([4.0, 4.0]))
    assert close(lbtw.weights(obs([1.0, 4.0])), [2 * 0.5 / 1.5, 2 * 1.0 / 1.5])


def test_dwa_with_a_zero_window_loss_gives_finite_weights():
    d = make("dwa", temperature=2.0, window=1)
    for losses in ([0.0, 4.0], [1.0, 2.0]):
        d.step(obs(losses))
    assert close(d.weights(obs([1.0, 1.0])), (2 * torch.softmax(torch.tensor([1.0, 0.5]) / 2.0, 0)).tolist())


@pytest.mark.parametrize("name", ["uncertainty", "gradnorm"])
def test_a_learned_value_of_a_task_without_samples_does_not_move(name):
    w = make(name, lr=0.1, initial_steps=1) if name == "gradnorm" else make(name, lr=0.1)
    w.step(obs([2.0, 0.5], grad_norms=[1.0, 3.0]))
    w.step(obs([3.0, 0.25], grad_norms=[2.0, 1.0]))
    before = w.weights(obs([1.0, 1.0]))
    w.step(obs([math.nan, 0.4], grad_norms=[math.nan, 2.0]))  # face had no samples: its momentum must not act
    after = w.weights(obs([1.0, 1.0]))
    assert after[0] == before[0]
    if name == "uncertainty":
        assert after[1] != before[1]


def test_dwa_softmax_of_window_loss_ratios():
    d = make("dwa", temperature=2.0, window=2)
    for losses in ([2.0, 4.0], [2.0, 4.0], [1.0, 3.0]):
        d.step(obs(losses))
        assert close(d.weights(obs(losses)), [1.0, 1.0])  # until two windows are complete
    d.step(obs([1.0, 5.0]))  # windows: [2, 4] then [1, 4]
    r = torch.tensor([0.5, 1.0]) / 2.0
    assert close(d.weights(obs([1.0, 1.0])), (2 * torch.softmax(r, 0)).tolist())


def test_dtp_focal_weights_of_smoothed_accuracy():
    d = make("dtp", gamma=2.0, smoothing=0.5)
    # before any step: the micro-step's own accuracy
    assert close(d.weights(obs([1.0, 1.0], accuracies=[0.5, 0.9])),
                 [-(0.5 ** 2) * math.log(0.5), -(0.1 ** 2) * math.log(0.9)])
    d.step(obs([1.0, 1.0], accuracies=[0.5, 0.9]))
    d.step(obs([1.0, 1.0], accuracies=[0.7, 0.7]))  # kpi = 0.5 * new + 0.5 * old = [0.6, 0.8]
    assert close(d.weights(obs([1.0, 1.0], accuracies=[0.0, 0.0])),
                 [-(0.4 ** 2) * math.log(0.6), -(0.2 ** 2) * math.log(0.8)])


def _weighted_gradient(name: str, transform, steps: int = 3) -> list[torch.Tensor]:
    """The gradient of sum_t w_t L_t on a shared layer, step by step, with task 1's loss transformed."""
    torch.manual_seed(0)
    shared, heads = torch.nn.Linear(4, 3), [torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)]
    strategy = make(name)
    grads = []
    for step in range(steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        z = shared(x)
        losses = [(heads[0](z) - 1).pow(2).mean(), transform((heads[1](z) + 2).pow(2).mean())]
        norms = [torch.autograd.grad(loss, z, retain_graph=True)[0].norm().item() for loss in losses]
        weights = strategy.weights(obs([loss.item() for loss in losses], grad_norms=norms))
        strategy.step(obs([loss.item() for loss in losses], grad_norms=norms))
        total = sum(float(w) * loss for w, loss in zip(weights, losses))
        grads.append(torch.autograd.grad(total, shared.weight)[0])
    return grads


@pytest.mark.parametrize("name,transform", [
    ("initial", lambda loss: 7.0 * loss), ("realtime", lambda loss: 7.0 * loss),
    ("gradnorm_static", lambda loss: loss + 5.0), ("gradnorm_static", lambda loss: 7.0 * loss)])
def test_invariances(name, transform):
    plain, changed = _weighted_gradient(name, lambda loss: loss), _weighted_gradient(name, transform)
    for a, b in zip(plain, changed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_invariance_check_can_fail():
    plain, scaled = _weighted_gradient("static", lambda loss: loss), _weighted_gradient("static", lambda x: 7 * x)
    assert not torch.allclose(plain[0], scaled[0], rtol=1e-3)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trips(name):
    entropies = {"face": 1.0, "digits": 2.0}
    a = make(name, entropies)
    for losses in ([2.0, 4.0], [1.5, 3.0], [1.0, 3.5]):
        seen = obs(losses, grad_norms=[1.0, 2.0], accuracies=[0.3, 0.6])
        a.weights(seen)
        a.step(seen)
    b = make(name, entropies)
    b.load_state_dict(a.state_dict())
    nxt = obs([0.8, 2.5], grad_norms=[1.5, 1.0], accuracies=[0.5, 0.5])
    assert torch.equal(a.weights(nxt), b.weights(nxt))
    a.step(nxt)
    b.step(nxt)
    assert torch.equal(a.weights(nxt), b.weights(nxt))


def test_config_errors_name_the_key(tiny_config_file):
    from ufo.config import load_config

    with pytest.raises(ConfigError, match=r"train\.weighting\.name: Input should be 'equal'"):
        load_config(tiny_config_file, ["train.weighting.name=magic"])
    with pytest.raises(ConfigError, match=r"train\.weighting\.gamma: is read by dtp only, not by dwa"):
        load_config(tiny_config_file, ["train.weighting.name=dwa", "train.weighting.gamma=3"])
    with pytest.raises(ConfigError, match=r"train\.weighting\.tempreature: unknown key \(did you mean "
                                          r"train\.weighting\.temperature\?\)"):
        load_config(tiny_config_file, ["train.weighting.tempreature=3"])


# ---- distributed: 2 real ranks, one task each (task_parallel), so every rank holds one task's loss ----

def _rank_main(rank: int, world: int, port: int, runs: list[dict], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from ufo.train import train

    results = {}
    for run in runs:
        result = train(config_from_dict(run["raw"], "test"), log=lambda _: None)
        params = {n: p.detach().clone() for n, p in result.engine.module.named_parameters()}
        results[run["key"]] = {"history": result.history, "state": result.weighting.state_dict(), "params": params}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    leave()


@pytest.mark.dist
def test_weights_agree_across_ranks_and_resume_restores_learned_state(tmp_path):
    from test_train import tiny_run

    base = tiny_run(tmp_path, ("face", "digits"), layout="task_parallel", warmup_steps=0, min_lr_ratio=1.0,
                    steps=4)
    base["deepspeed"] = {"zero_stage": 2}
    runs = []
    for name in ("uncertainty", "gradnorm", "dtp", "dwa", "initial"):
        raw = copy.deepcopy(base)
        raw["train"]["weighting"] = {"name": name, **({"window": 1} if name == "dwa" else {})}
        raw["train"]["out_dir"] = str(tmp_path / name)
        runs.append({"key": name, "raw": raw})
    # gradnorm cut at step 2 and resumed to 4: Adam state, L0 and weights must come back
    cut = copy.deepcopy(runs[1]["raw"])
    cut["train"].update(out_dir=str(tmp_path / "cut"), plots=True)  # its end draws weighting.png
    runs.append({"key": "cut", "raw": {**cut, "train": {**cut["train"], "steps": 2}}})
    runs.append({"key": "resumed", "raw": cut})
    port = 29000 + os.getpid() % 1000 + 7
    mp.start_processes(_rank_main, args=(2, port, runs, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    for name in ("uncertainty", "gradnorm", "dtp", "dwa", "initial"):
        a, b = ranks[0][name], ranks[1][name]
        assert [r["weight"] for r in a["history"]] == [r["weight"] for r in b["history"]], name
        assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]], name
        for key in a["state"]:
            assert str(a["state"][key]) == str(b["state"][key]), (name, key)
        weights = [r["weight"] for r in a["history"]]
        assert all(set(w) == {"face", "digits"} for w in weights)
        if name in ("uncertainty", "gradnorm", "dtp", "dwa"):
            assert weights[-1] != weights[0], f"{name} weights never moved: {weights}"

    straight, resumed = ranks[0]["gradnorm"], ranks[0]["resumed"]
    assert resumed["history"][0]["step"] == 3  # it resumed rather than restarted
    timeless = (lambda records: [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in records])
    assert timeless(resumed["history"]) == timeless(straight["history"][2:])
    assert str(resumed["state"]) == str(straight["state"])
    for name, want in straight["params"].items():
        assert torch.equal(want, resumed["params"][name]), name
    lines = (tmp_path / "cut" / "history.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "cut" / "weighting.png").stat().st_size > 1000


def test_prior_weights_come_from_the_training_shards_label_frequencies(tmp_path):
    from test_train import tiny_run
    from ufo.data import read_manifest
    from ufo.train import train

    raw = tiny_run(tmp_path, ("face", "digits"), steps=1, layout="mixed", weighting={"name": "prior"})
    result = train(config_from_dict(raw, "test"), log=lambda _: None)
    for task in ("face", "digits"):
        counts = read_manifest(Path(raw["tasks"][task]["shards"]))["class_counts"]
        assert result.history[0]["weight"][task] == pytest.approx(1 / label_entropy(counts))
