"""Multi-task loss weighting: the weights w_t of the total loss sum_t w_t * L_t, one strategy per run.

A strategy sees `Observation`s: each task's mean loss over the global batch (every rank's
samples, all-reduced by the training loop) and, where it asks for them, each task's gradient
norm on the shared representation and its training accuracy. Every rank feeds its strategy the
same observations, so every rank computes the same weights and keeps the same learned state.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ufo.config import UfoConfig, WeightingConfig


@dataclass(frozen=True)
class Observation:
    """One micro-step's (or one optimizer step's) view of every task, identical on every rank."""

    losses: torch.Tensor  # (T,) float64: mean sample loss; nan where the task had no samples
    grad_norms: torch.Tensor | None = None  # (T,) ||d L_t / d z||, z the pooled features every head reads
    accuracies: torch.Tensor | None = None  # (T,) share of the training samples the head got right


class Weighting:
    """A strategy: `weights` before each backward, `step` after each optimizer step."""

    name = ""
    needs_grad_norms = False  # the loop computes Observation.grad_norms (one extra backward through the heads)
    needs_accuracy = False
    saved: tuple[str, ...] = ()  # the tensor attributes a checkpoint keeps

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)

    def weights(self, obs: Observation) -> torch.Tensor:
        """(T,) float64 weights for this micro-step's backward; finite for every task."""
        raise NotImplementedError

    def step(self, obs: Observation) -> None:
        """Learn from an optimizer step (the mean of its micro-steps' observations)."""

    def values(self) -> dict[str, torch.Tensor]:
        """Learned or remembered (T,) values worth logging beside the weights, by name."""
        return {}

    def state_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in self.saved}

    def load_state_dict(self, state: Mapping) -> None:
        for name in self.saved:
            if name in state:  # a checkpoint of an older ufo may lack a newer value: it keeps its start
                setattr(self, name, state[name].clone())

    def _ones(self) -> torch.Tensor:
        return torch.ones(len(self.tasks), dtype=torch.float64)

    def _nan(self) -> torch.Tensor:
        return torch.full((len(self.tasks),), math.nan, dtype=torch.float64)


def _known(values: torch.Tensor | None) -> torch.Tensor:
    if values is None:
        raise ValueError("this weighting needs an observation the training loop did not provide")
    return torch.isfinite(values)


def _first_seen(first: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Each task's first known positive loss: kept once set, taken from `losses` until then (a loss of
    0 is no scale to divide by: the task's weight stays 1 until it has one)."""
    return torch.where(torch.isnan(first) & _known(losses) & (losses > 0), losses, first)


def _inverse(values: torch.Tensor) -> torch.Tensor:
    """1 / values where known, 1 where not (a task without samples this step: its weight is unused)."""
    return torch.where(_known(values), 1.0 / values.clamp_min(1e-12), 1.0)


class Equal(Weighting):
    """w_t = 1 / T: the arithmetic mean of the tasks' losses."""

    name = "equal"

    def weights(self, obs: Observation) -> torch.Tensor:
        return self._ones() / len(self.tasks)


class Static(Weighting):
    """w_t = tasks.<t>.weight, fixed for the whole run."""

    name = "static"

    def __init__(self, tasks: Sequence[str], weights: Sequence[float]):
        super().__init__(tasks)
        self.fixed = torch.tensor(list(weights), dtype=torch.float64)

    def weights(self, obs: Observation) -> torch.Tensor:
        return self.fixed.clone()


class _FirstLoss(Weighting):
    """Remembers L_t0, each task's first observed loss, and saves it with the checkpoint."""

    def __init__(self, tasks: Sequence[str]):
        super().__init__(tasks)
        self.first = self._nan()

    saved = ("first",)

    def _remember(self, losses: torch.Tensor) -> None:
        self.first = _first_seen(self.first, losses)

    def values(self) -> dict[str, torch.Tensor]:
        return {"first_loss": self.first}


class Initial(_FirstLoss):
    """w_t = 1 / L_t0: every task starts at weighted loss 1, whatever the scale of its loss."""

    name = "initial"

    def weights(self, obs: Observation) -> torch.Tensor:
        self._remember(obs.losses)
        return _inverse(self.first)  # 1 until the task has a positive first loss


class Prior(Weighting):
    """w_t = 1 / H_t, H_t the entropy (nats) of the task's label frequencies in its training data.

    H_t is the cross-entropy of a model that knows only the label prior: the loss a task starts
    near, known before training (`initial` measures it instead).
    """

    name = "prior"

    def __init__(self, tasks: Sequence[str], entropies: Sequence[float]):
        super().__init__(tasks)
        self.entropies = torch.tensor(list(entropies), dtype=torch.float64)

    def weights(self, obs: Observation) -> torch.Tensor:
        return 1.0 / self.entropies


def label_entropy(counts: Mapping[int, int] | Sequence[int]) -> float:
    """Entropy in nats of a label distribution given as counts."""
    values = torch.tensor(list(counts.values() if isinstance(counts, Mapping) else counts), dtype=torch.float64)
    p = values[values > 0] / values.sum()
    return float(-(p * p.log()).sum())


class Realtime(Weighting):
    """w_t = 1 / sg(L_t), this micro-step's own loss: L_t / sg(L_t), a gradient of grad(L_t) / L_t."""

    name = "realtime"

    def weights(self, obs: Observation) -> torch.Tensor:
        return _inverse(obs.losses)


class GradNormStatic(Weighting):
    """w_t = 1 / ||grad_z L_t||: every task's weighted gradient on the shared representation z has norm 1.

    Scaling a task's loss scales its gradient and divides its weight alike; adding a constant
    changes neither.
    """

    name = "gradnorm_static"
    needs_grad_norms = True

    def weights(self, obs: Observation) -> torch.Tensor:
        return _inverse(obs.grad_norms)


class _Learned(Weighting):
    """A parameter vector trained by its own Adam on analytic gradients of all-reduced observations."""

    def __init__(self, tasks: Sequence[str], start: float, lr: float):
        super().__init__(tasks)
        self.param = torch.nn.Parameter(torch.full((len(tasks),), start, dtype=torch.float64))
        self.optimizer = torch.optim.Adam([self.param], lr=lr)

    def _descend(self, grad: torch.Tensor, known: torch.Tensor) -> None:
        """One Adam step on the tasks that were observed: an absent task's value and moments stay as they
        were (Adam's momentum would otherwise move it on a step it had no samples in)."""
        state = self.optimizer.state.get(self.param, {})
        kept = {name: state[name].clone() for name in ("exp_avg", "exp_avg_sq") if name in state}
        before = self.param.detach().clone()
        self.param.grad = torch.where(known, grad, 0.0)
        self.optimizer.step()
        self.param.grad = None
        with torch.no_grad():
            self.param.copy_(torch.where(known, self.param, before))
            for name, old in kept.items():
                state[name].copy_(torch.where(known, state[name], old))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "param": self.param.detach().clone(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}  # Adam's own tensors change in place

    def load_state_dict(self, state: Mapping) -> None:
        with torch.no_grad():
            self.param.copy_(state["param"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        super().load_state_dict(state)


class Uncertainty(_Learned):
    """Kendall et al. 2018: total = sum_t exp(-s_t) L_t + s_t, s_t = log sigma_t^2 learned.

    w_t = exp(-s_t); d total / d s_t = 1 - exp(-s_t) L_t, so s_t moves toward log L_t.
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[str], lr: float):
        super().__init__(tasks, 0.0, lr)

    def weights(self, obs: Observation) -> torch.Tensor:
        return torch.exp(-self.param.detach())

    def step(self, obs: Observation) -> None:
        known = _known(obs.losses)
        if not known.any():
            return
        s = self.param.detach()
        self._descend(torch.where(known, 1.0 - torch.exp(-s) * obs.losses, 0.0), known)

    def values(self) -> dict[str, torch.Tensor]:
        return {"log_variance": self.param.detach()}


class GradNorm(_Learned):
    """Chen et al. 2018: learned w_t with sum_t w_t = T, trained so that each task's weighted gradient
    norm G_t = w_t ||grad_z L_t|| approaches mean(G) * r_t^alpha, r_t = (L_t / L_t0) / mean(L / L0) its
    relative inverse training rate. The target is held constant, so d|G_t - target_t| / d w_t is
    sign(G_t - target_t) * ||grad_z L_t||.
    """

    name = "gradnorm"
    needs_grad_norms = True
    saved = ("first", "first_sum", "first_steps")

    def __init__(self, tasks: Sequence[str], alpha: float, lr: float, initial_steps: int = 1):
        super().__init__(tasks, 1.0, lr)
        self.alpha, self.initial_steps = alpha, initial_steps
        self.first = self._nan()  # L0: the mean of the task's first `initial_steps` positive losses
        self.first_sum = torch.zeros(len(tasks), dtype=torch.float64)
        self.first_steps = torch.zeros(len(tasks), dtype=torch.float64)

    def weights(self, obs: Observation) -> torch.Tensor:
        return self.param.detach().clone()

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        if "first_steps" not in state:  # an older ufo's L0, of one step: taken as settled
            self.first_steps = torch.where(torch.isfinite(self.first), float(self.initial_steps), 0.0)
            self.first_sum = torch.where(torch.isfinite(self.first), self.first * self.first_steps, 0.0)

    def step(self, obs: Observation) -> None:
        taking = _known(obs.losses) & (obs.losses > 0) & (self.first_steps < self.initial_steps)
        self.first_sum += torch.where(taking, obs.losses, 0.0)
        self.first_steps += taking.double()
        self.first = torch.where(self.first_steps > 0, self.first_sum / self.first_steps.clamp_min(1), self.first)
        known = _known(obs.losses) & _known(obs.grad_norms) & torch.isfinite(self.first)
        if not known.any():
            return
        w, g = self.param.detach(), obs.grad_norms
        ratio = obs.losses / self.first
        rate = ratio / ratio[known].mean().clamp_min(1e-12)
        norms = w * g
        target = norms[known].mean() * rate.pow(self.alpha)
        self._descend(torch.where(known, torch.sign(norms - target) * g, 0.0), known)
        with torch.no_grad():  # the observed tasks' weights share what the absent ones leave of sum = T
            self.param.clamp_(min=1e-4)
            room = len(self.tasks) - float(self.param[~known].sum())
            self.param.copy_(torch.where(known, self.param * room / self.param[known].sum(), self.param))

    def values(self) -> dict[str, torch.Tensor]:
        return {"first_loss": self.first}


class DWA(Weighting):
    """Liu et al. 2019, Dynamic Weight Average: w_t = T softmax_t(r / temperature), r_t = L_t(k-1) / L_t(k-2),
    L(k) the mean loss of window k (`window` optimizer steps); w_t = 1 until two windows are complete."""

    name = "dwa"
    saved = ("sums", "counts", "filled", "previous", "last")

    def __init__(self, tasks: Sequence[str], temperature: float, window: int):
        super().__init__(tasks)
        self.temperature, self.window = temperature, window
        self.sums = torch.zeros(len(tasks), dtype=torch.float64)
        self.counts = torch.zeros(len(tasks), dtype=torch.float64)
        self.filled = torch.zeros((), dtype=torch.int64)  # optimizer steps in the current window
        self.previous = self._nan()  # L(k-2)
        self.last = self._nan()  # L(k-1)

    def weights(self, obs: Observation) -> torch.Tensor:
        if not (torch.isfinite(self.previous).all() and torch.isfinite(self.last).all()):
            return self._ones()
        # a window whose mean loss was 0 gives no rate: the ratio is 1 (neither faster nor slower)
        ratio = torch.where(self.previous > 0, self.last / self.previous.clamp_min(1e-300), 1.0)
        return len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)

    def step(self, obs: Observation) -> None:
        known = _known(obs.losses)
        self.sums += torch.where(known, obs.losses, 0.0)
        self.counts += known.double()
        self.filled += 1
        if int(self.filled) == self.window:
            mean = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), self.last)
            self.previous, self.last = self.last, mean
            self.sums.zero_()
            self.counts.zero_()
            self.filled.zero_()

    def values(self) -> dict[str, torch.Tensor]:
        return {"window_loss": self.last}


class LBTW(_FirstLoss):
    """Liu et al. 2019, Loss-Balanced Task Weighting: w_t = (L_t / L_t0)^alpha with this micro-step's loss
    (1 for a task without samples or without a positive L_t0 yet); with `normalize`, rescaled to sum to
    T as the authors' code does."""

    name = "lbtw"

    def __init__(self, tasks: Sequence[str], alpha: float, normalize: bool = False):
        super().__init__(tasks)
        self.alpha, self.normalize = alpha, normalize

    def weights(self, obs: Observation) -> torch.Tensor:
        self._remember(obs.losses)
        known = _known(obs.losses) & torch.isfinite(self.first)
        w = torch.where(known, (obs.losses / self.first).pow(self.alpha), 1.0)
        if self.normalize and w.sum() > 0:
            w = w * len(self.tasks) / w.sum()
        return w


class DTP(Weighting):
    """Guo et al. 2018, Dynamic Task Prioritization: w_t = -(1 - k_t)^gamma log k_t, k_t the task's
    training accuracy smoothed as k <- smoothing * accuracy + (1 - smoothing) * k after each step
    (before the first step, the micro-step's own accuracy)."""

    name = "dtp"
    needs_accuracy = True
    saved = ("kpi",)

    def __init__(self, tasks: Sequence[str], gamma: float, smoothing: float):
        super().__init__(tasks)
        self.gamma, self.smoothing = gamma, smoothing
        self.kpi = self._nan()

    def weights(self, obs: Observation) -> torch.Tensor:
        k = torch.where(torch.isnan(self.kpi), obs.accuracies, self.kpi)
        k = torch.where(torch.isfinite(k), k, 0.5).clamp(1e-6, 1.0)
        return -(1.0 - k).pow(self.gamma) * torch.log(k)

    def step(self, obs: Observation) -> None:
        known = _known(obs.accuracies)
        smoothed = self.smoothing * obs.accuracies + (1.0 - self.smoothing) * self.kpi
        self.kpi = torch.where(known, torch.where(torch.isnan(self.kpi), obs.accuracies, smoothed), self.kpi)

    def values(self) -> dict[str, torch.Tensor]:
        return {"kpi": self.kpi}


STRATEGIES = {cls.name: cls for cls in (Equal, Static, Initial, Prior, Realtime, GradNormStatic, Uncertainty,
                                        GradNorm, DWA, LBTW, DTP)}


def build_weighting(cfg: UfoConfig, entropies: Mapping[str, float] | None = None) -> Weighting:
    """The strategy `train.weighting` names, for the config's tasks in order.

    `prior` needs each task's label entropy (`label_entropy` of its training label counts).
    """
    w: WeightingConfig = cfg.train.weighting
    tasks = list(cfg.tasks)
    if w.name == "static":
        return Static(tasks, [cfg.tasks[t].weight for t in tasks])
    if w.name == "prior":
        if entropies is None:
            raise ValueError("prior weighting needs the tasks' label entropies")
        return Prior(tasks, [entropies[t] for t in tasks])
    if w.name == "uncertainty":
        return Uncertainty(tasks, w.lr)
    if w.name == "gradnorm":
        return GradNorm(tasks, 1.5 if w.alpha is None else w.alpha, w.lr, w.initial_steps)
    if w.name == "dwa":
        return DWA(tasks, w.temperature, w.window)
    if w.name == "lbtw":
        return LBTW(tasks, 0.5 if w.alpha is None else w.alpha, w.normalize)
    if w.name == "dtp":
        return DTP(tasks, w.gamma, w.smoothing)
    return STRATEGIES[w.name](tasks)
