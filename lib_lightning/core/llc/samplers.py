"""The chains of the LLC estimate: SGLD and RMSprop-preconditioned SGLD, with per-step health terms.

Both samplers target p(w) ∝ exp(−U(w)), U(w) = nβ·L(w) + γ/2·|w − w*|², by the update

    w ← w − (ε/2)·P·∇U_B(w) + N(0, ε·P)

with ∇U_B the minibatch drift and P a diagonal preconditioner: P = 1 for SGLD (Welling & Teh 2011);
for ``"rmsprop_sgld"`` (Li et al. 2016) P_i = s̄ / (s_i + δ·s̄) with s_i the root of an exponential moving
average of the squared drift, s̄ its mean over the sampled parameters and δ the ``precond_floor`` (so P
lies in (0, 1/δ] and ε keeps SGLD's units for a typical parameter). P adapts during burn-in only and is
frozen for the kept draws, so the draws come from a fixed-preconditioner Langevin chain, whose
stationary law is the target up to discretisation (the drift correction of an adapting P is not needed).

Health terms per step: the norms of the gradient part (ε/2)·P·nβ·∇L_B, the localisation part
(ε/2)·P·γ·(w − w*) and the noise part, and, every ``mala_every`` steps, the Metropolis-adjusted Langevin
(MALA) acceptance probability of the step (Furman & Lau 2024), on the kept draws only (a chain still
moving from w* towards its typical set has a low acceptance for that reason alone, which the trend
statistic reports separately): min(1, exp(U(w) − U(w') + log q(w|w') −
log q(w'|w))) with q the Gaussian proposal above and U, ∇U at both ends evaluated on the step's own
minibatch. An SGLD chain is accurate only when this correction would rarely reject.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from lib_lightning.core import batch as nested

__all__ = ["SAMPLERS", "ChainResult", "ChainSetup", "Preconditioner", "log_acceptance", "run_chain"]

SAMPLERS = ("sgld", "rmsprop_sgld")
Params = dict[str, torch.Tensor]


class Preconditioner:
    """RMSprop's diagonal preconditioner: P_i = s̄ / (s_i + δ·s̄), s = sqrt(bias-corrected EMA of drift²).

    Args:
        decay: EMA decay α in [0, 1) of the squared drift.
        floor: δ > 0; P ≤ 1/δ. When every s_i is zero (no drift seen yet) P = 1.
    """

    def __init__(self, decay: float, floor: float) -> None:
        self.decay, self.floor = decay, floor
        self.square_avg: Params = {}
        self.updates = 0

    def update(self, drift: Mapping[str, torch.Tensor]) -> None:
        """Fold one step's drift ∇U_B into the moving average of its square."""
        self.updates += 1
        for k, g in drift.items():
            previous = self.square_avg.get(k, torch.zeros_like(g))
            self.square_avg[k] = self.decay * previous + (1 - self.decay) * g * g

    def __call__(self) -> Params | None:
        """The current P per parameter, or None (P = 1) before any update."""
        if not self.updates:
            return None
        correction = 1 - self.decay**self.updates
        roots = {k: (v / correction).sqrt() for k, v in self.square_avg.items()}
        count = sum(r.numel() for r in roots.values())
        mean_root = float(sum(r.double().sum() for r in roots.values())) / count
        if mean_root == 0.0:
            return None
        return {k: mean_root / (r + self.floor * mean_root) for k, r in roots.items()}


def _sq_sum(tensors) -> float:
    return float(sum(t.double().pow(2).sum() for t in tensors))


def log_acceptance(
    u: float, u_new: float, drift: Params, drift_new: Params, w: Params, w_new: Params,
    precond: Params | None, epsilon: float,
) -> float:
    """log of MALA's acceptance ratio for the move w → w' of the Langevin proposal with step ε and preconditioner P.

    log α = U(w) − U(w') + log q(w | w') − log q(w' | w),  log q(b | a) = −Σ (b − a + ε/2·P·∇U(a))² / (2εP).
    """
    forward_sq, backward_sq = 0.0, 0.0
    for k in w:
        p = 1.0 if precond is None else precond[k]
        forward_sq += float(((w_new[k] - w[k] + 0.5 * epsilon * p * drift[k]) ** 2 / p).double().sum())
        backward_sq += float(((w[k] - w_new[k] + 0.5 * epsilon * p * drift_new[k]) ** 2 / p).double().sum())
    return u - u_new + (forward_sq - backward_sq) / (2 * epsilon)


@dataclass(frozen=True)
class ChainSetup:
    """What every chain of one estimate shares.

    Fields:
        model: the module; w_star: the sampled parameters at w*; fixed: every other parameter and buffer.
        data: the examples (any nesting of tensors, n examples); forward, loss_fn: as in :func:`~lib_lightning.core.llc.estimate_llc`.
        sampler: one of :data:`SAMPLERS`; nbeta, epsilon, gamma: nβ, ε, γ.
        num_burnin, steps: discarded states and all states per chain; batch_size: rows per step (None: all).
        mala_every: a MALA acceptance every this many kept steps (0: never); precond_decay, precond_floor: RMSprop.
    """

    model: Callable
    w_star: Params
    fixed: Params
    data: Any  # (inputs, labels) or any nesting of example-level tensors (lib_lightning.core.batch)
    n: int
    forward: Callable
    loss_fn: Callable
    sampler: str
    nbeta: float
    epsilon: float
    gamma: float
    num_burnin: int
    steps: int
    batch_size: int | None
    mala_every: int
    precond_decay: float
    precond_floor: float


@dataclass(frozen=True)
class ChainResult:
    """One chain: ``trace`` ``(steps,)`` float64 minibatch loss per state (NaN after a non-finite loss);
    ``acceptance``, mean MALA acceptance probability (NaN if none was evaluated); ``grad_norm``,
    ``loc_norm``, ``noise_norm``: the mean norms of the update's three terms over the steps taken."""

    trace: torch.Tensor
    acceptance: float
    grad_norm: float
    loc_norm: float
    noise_norm: float


def _evaluate(setup: ChainSetup, w: Params, batch) -> tuple[float, Params | None]:
    """L_B(w) and ∇L_B(w) (None when the loss is not finite); zero gradients for unused parameters."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    state = {**setup.fixed, **leaves}
    loss = setup.loss_fn(setup.forward(lambda *a, **kw: functional_call(setup.model, state, a, kw), batch), batch)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value, None
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return value, {k: torch.zeros_like(v) if g is None else g.detach() for (k, v), g in zip(w.items(), grads)}


def _drift(setup: ChainSetup, w: Params, grads: Params) -> tuple[Params, Params]:
    """The two parts of ∇U_B: nβ·∇L_B and γ·(w − w*)."""
    return ({k: setup.nbeta * g for k, g in grads.items()},
            {k: setup.gamma * (w[k] - setup.w_star[k]) for k in w})


def _potential(setup: ChainSetup, loss: float, w: Params) -> float:
    return setup.nbeta * loss + 0.5 * setup.gamma * _sq_sum(w[k] - setup.w_star[k] for k in w)


def _batch(setup: ChainSetup, gen: torch.Generator):
    if setup.batch_size is None or setup.batch_size >= setup.n:
        return setup.data
    idx = torch.randperm(setup.n, generator=gen, device=gen.device)[: setup.batch_size]
    return nested.select(setup.data, idx)


def run_chain(setup: ChainSetup, gen: torch.Generator) -> ChainResult:
    """One chain from w*: each step draws a minibatch, records L_B(w), and moves w by the sampler's update."""
    trace = torch.full((setup.steps,), float("nan"), dtype=torch.float64)
    full_batch = setup.batch_size is None or setup.batch_size >= setup.n
    precond = Preconditioner(setup.precond_decay, setup.precond_floor) if setup.sampler == "rmsprop_sgld" else None
    w, cached = dict(setup.w_star), None
    acceptances, norms = [], torch.zeros(3, dtype=torch.float64)
    taken = 0
    for t in range(setup.steps):
        batch = _batch(setup, gen)
        loss, grads = cached if cached is not None else _evaluate(setup, w, batch)
        cached = None
        trace[t] = loss
        if grads is None:
            break
        grad_part, loc_part = _drift(setup, w, grads)
        drift = {k: grad_part[k] + loc_part[k] for k in w}
        if precond is not None and t < setup.num_burnin:
            precond.update(drift)
        p = precond() if precond is not None else None
        w_new, step_norms = _move(setup, w, grad_part, loc_part, p, gen)
        norms += step_norms
        taken += 1
        if setup.mala_every and t >= setup.num_burnin and (t - setup.num_burnin) % setup.mala_every == 0:
            loss_new, grads_new = _evaluate(setup, w_new, batch)
            if grads_new is not None:
                grad_new, loc_new = _drift(setup, w_new, grads_new)
                drift_new = {k: grad_new[k] + loc_new[k] for k in w}
                log_a = log_acceptance(_potential(setup, loss, w), _potential(setup, loss_new, w_new), drift,
                                       drift_new, w, w_new, p, setup.epsilon)
                acceptances.append(math.exp(min(0.0, log_a)) if math.isfinite(log_a) else 0.0)
                if full_batch:  # the next step evaluates the same batch at the same point
                    cached = (loss_new, grads_new)
            else:
                acceptances.append(0.0)
        w = w_new
    norms = norms / max(taken, 1)
    acceptance = sum(acceptances) / len(acceptances) if acceptances else math.nan
    return ChainResult(trace, acceptance, *norms.tolist())


def _move(setup: ChainSetup, w: Params, grad_part: Params, loc_part: Params, p: Params | None, gen):
    """w' = w − (ε/2)·P·(grad + loc) + sqrt(ε·P)·ξ, and the norms ``(3,)`` of the three terms."""
    eps = setup.epsilon
    w_new, sq = {}, torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for k, v in w.items():
            scale = 1.0 if p is None else p[k]
            noise = torch.randn(v.shape, generator=gen, dtype=v.dtype, device=gen.device).to(v.device)
            noise = (math.sqrt(eps) * scale**0.5) * noise if p is not None else math.sqrt(eps) * noise
            grad_step, loc_step = 0.5 * eps * scale * grad_part[k], 0.5 * eps * scale * loc_part[k]
            w_new[k] = v.detach() - grad_step - loc_step + noise
            sq += torch.stack([grad_step.double().pow(2).sum(), loc_step.double().pow(2).sum(),
                               noise.double().pow(2).sum()]).cpu()
    return w_new, sq.sqrt()
