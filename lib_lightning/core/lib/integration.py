"""Integration rules (alpha_q, omega_q) for integrated Jacobians and edges, with Σω = 1.

Alpha scales the node-layer activation: J̄(x) = Σ_q ω_q ∂F/∂f at α_q f(x). The reference library folds
biases into the model, so its α also scales every bias downstream; here biases stay inside the user's
model and only the node-layer activation is scaled (a layer-wise integrated gradient with a zero
baseline). With the ``gradient`` rule (α = 1) both agree exactly on every non-constant direction; for
α < 1 on non-homogeneous sections (ReLU with biases, attention) they differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["IntegrationRule", "integration_rule", "RULES"]

RULES = ("gradient", "trapezoidal", "gauss-legendre")


@dataclass(frozen=True)
class IntegrationRule:
    """Nodes ``alphas (n_q,)`` in (0, 1] and weights ``weights (n_q,)`` summing to 1 (float64)."""

    name: str
    n_intervals: int
    alphas: torch.Tensor
    weights: torch.Tensor


def integration_rule(name: str = "gradient", n_intervals: int = 0) -> IntegrationRule:
    """The spec's rules (§3).

    - ``gradient``: (1, 1), a plain Jacobian; needs ``n_intervals = 0``.
    - ``trapezoidal``: n = 0 gives (0.5, 1); otherwise n+1 evenly spaced α in [ε, 1−ε],
      ε = 1e-3/(n+1), weights 1/n with both endpoints halved.
    - ``gauss-legendre``: n+1 Gauss–Legendre nodes mapped to [0, 1] (α = (x+1)/2, ω = w/2).

    Raises:
        ValueError: for an unknown rule or an invalid ``n_intervals``.
    """
    if name not in RULES:
        raise ValueError(f"unknown integration rule {name!r}; valid choices: {RULES}")
    if n_intervals < 0:
        raise ValueError(f"n_intervals must be >= 0, got {n_intervals}")
    if name == "gradient":
        if n_intervals != 0:
            raise ValueError(f"the 'gradient' rule needs n_intervals=0, got {n_intervals}")
        alphas, weights = np.array([1.0]), np.array([1.0])
    elif name == "trapezoidal":
        if n_intervals == 0:
            alphas, weights = np.array([0.5]), np.array([1.0])
        else:
            eps = 1e-3 / (n_intervals + 1)
            alphas = np.linspace(eps, 1 - eps, n_intervals + 1)
            weights = np.full(n_intervals + 1, 1.0 / n_intervals)
            weights[[0, -1]] /= 2
    else:
        nodes, gauss_weights = np.polynomial.legendre.leggauss(n_intervals + 1)  # on [-1, 1]
        alphas, weights = (nodes + 1) / 2, gauss_weights / 2
    return IntegrationRule(
        name, n_intervals, torch.tensor(alphas, dtype=torch.float64), torch.tensor(weights, dtype=torch.float64)
    )
