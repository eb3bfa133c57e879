"""LLC estimator: known values of λ, redundancy, chain diagnostics, no side effects, bad input.

Known-value models use n = 2000 synthetic points, the loss MSE / 2 (Gaussian NLL with σ = 1, constant
dropped), full-batch SGLD and three data seeds; tolerances are on the mean over seeds. Inputs are
orthogonalised against the noise, so that w* is exactly the empirical minimiser of L.
"""

import math

import pytest
import torch
from torch import nn

from lib_lightning.core.llc import calibrate, default_nbeta, estimate_llc
from lib_lightning.plotting import plot_calibration

N = 2000
SEEDS = (0, 1, 2)


class Params(nn.Module):
    """A bare parameter vector ``w``; subclasses say how it maps inputs to predictions."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


class Product(Params):
    def forward(self, x):
        return self.w[0] * self.w[1] * x[:, 0]  # y = w1·w2·x: singular at the origin, λ = 1/2


class Sum(Params):
    def forward(self, x):
        return (self.w[0] + self.w[1]) * x[:, 0]  # y = (w1 + w2)·x: one redundant direction, λ = 1/2


class TwoInputs(Params):
    def forward(self, x):
        return x @ self.w  # y = w1·x1 + w2·x2: regular, λ = 1


def nll(output, batch):
    return 0.5 * ((output.reshape(-1) - batch[1]) ** 2).mean()


def regression_data(seed, d_in, scales=None):
    """Inputs ``(N, d_in)`` and unit-variance noise orthogonal to them (so least squares gives exactly 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d_in, generator=gen, dtype=torch.float64)
    if scales is not None:
        x = x * torch.tensor(scales, dtype=torch.float64)
    noise = torch.randn(N, generator=gen, dtype=torch.float64)
    noise = noise - x @ torch.linalg.lstsq(x, noise[:, None]).solution[:, 0]
    return x, noise


def llc(model, data, seed, **kwargs):
    settings = dict(loss_fn=nll, num_chains=4, num_burnin=100, num_draws=500, batch_size=None, gamma=1.0)
    return estimate_llc(model, data, generator=torch.Generator().manual_seed(100 + seed), **{**settings, **kwargs})


def product_reference(t, gamma):
    """E[t·w1²w2²] under exp(−t·w1²w2² − γ/2·|w|²), by integrating w2 in closed form and w1 on a grid."""
    w1 = torch.linspace(-40 / math.sqrt(gamma), 40 / math.sqrt(gamma), 400_001, dtype=torch.float64)
    precision = 2 * t * w1**2 + gamma  # of w2 given w1
    density = torch.exp(-gamma * w1**2 / 2) / precision.sqrt()
    return float((density * t * w1**2 / precision).sum() / density.sum())


def test_linear_regression_has_half_its_parameter_count():
    """Regular model, d = 4 (3 weights + bias): λ = 2. Tolerance 10 % on the mean over seeds."""
    estimates = []
    for seed in SEEDS:
        x, noise = regression_data(seed, 3, scales=[1.0, 0.8, 1.25])
        w_true = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        y = x @ w_true + 0.3 + noise
        model = nn.Linear(3, 1).double()
        with torch.no_grad():  # w* = the least-squares fit (noise ⟂ inputs, zero-mean columns ~ bias)
            design = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], dim=1)
            fit = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
            model.weight.copy_(fit[:3][None]), model.bias.copy_(fit[3:])
        est = llc(model, (x, y), seed, epsilon=4e-4)
        assert not est.failed and not est.diverged.any() and not est.below_init.any()
        estimates.append(est.mean.item())
    assert abs(sum(estimates) / len(estimates) - 2.0) < 0.2, estimates


def test_product_model_at_origin_is_singular():
    """y = w1·w2·x at w* = 0: λ = 1/2 as n → ∞, against 1 for a regular two-parameter model.

    With multiplicity 2 the finite-n value approaches 1/2 only like 1/log n, so the target is the exact
    expectation of the localised tempered posterior, by quadrature (0.38 here). Tolerance 15 % of it.
    """
    estimates, references = [], []
    for seed in SEEDS:
        x, noise = regression_data(seed, 1)
        est = llc(Product([0.0, 0.0]), (x, noise), seed, epsilon=1e-3, gamma=0.5, num_burnin=300, num_draws=1200)
        assert not est.failed and not est.diverged.any()
        estimates.append(est.mean.item())
        t = default_nbeta(N) * float((x[:, 0] ** 2).mean()) / 2  # nβ·L(w) = t·w1²w2² + const
        references.append(product_reference(t, 0.5))
    mean, reference = sum(estimates) / len(estimates), sum(references) / len(references)
    assert 0.35 < reference < 0.45
    assert abs(mean - reference) < 0.15 * reference, (estimates, reference)
    assert mean < 0.6  # far below the regular value 1


def test_redundant_parameter_halves_the_llc():
    """y = (w1 + w2)·x has λ = 1/2, y = w1·x1 + w2·x2 has λ = 1. Tolerance 20 % each."""
    redundant, regular = [], []
    w_star = [0.3, 0.7]
    for seed in SEEDS:
        x, noise = regression_data(seed, 1)
        est = llc(Sum(w_star), (x, x[:, 0] + noise), seed, epsilon=4e-4)
        redundant.append(est.mean.item())
        x2, noise2 = regression_data(seed, 2)
        est = llc(TwoInputs(w_star), (x2, x2 @ torch.tensor(w_star, dtype=torch.float64) + noise2), seed, epsilon=4e-4)
        regular.append(est.mean.item())
    redundant_mean, regular_mean = sum(redundant) / len(redundant), sum(regular) / len(regular)
    assert abs(redundant_mean - 0.5) < 0.1, redundant
    assert abs(regular_mean - 1.0) < 0.2, regular
    assert regular_mean - redundant_mean > 0.3  # more than both tolerances together


def _small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    y = torch.randint(2, (32,))
    return model, (x, y)


def test_model_gradients_optimizer_and_global_rng_are_untouched():
    model, data = _small_model()  # train mode: batch norm would update its running statistics in place
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(data[0]), data[1]).backward()
    optimizer.step()
    nn.functional.cross_entropy(model(data[0]), data[1]).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    rng = torch.get_rng_state()

    est = estimate_llc(model, data, num_chains=2, num_draws=10, num_burnin=5, batch_size=8, epsilon=1e-3)

    assert not est.failed and est.loss_traces.shape == (2, 15)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g, m in zip(model.parameters(), grads, momentum):
        assert torch.equal(p.grad, g) and torch.equal(optimizer.state[p]["momentum_buffer"], m)
    assert torch.equal(torch.get_rng_state(), rng)


def test_seeded_generator_reproduces_and_chains_split_freely():
    model, data = _small_model()
    model.eval()
    settings = dict(num_draws=20, num_burnin=5, batch_size=8, epsilon=1e-3)

    def gens(chains):
        return [torch.Generator().manual_seed(7 * 1000 + c) for c in chains]

    a = estimate_llc(model, data, num_chains=4, generator=gens(range(4)), **settings)
    b = estimate_llc(model, data, num_chains=4, generator=gens(range(4)), **settings)
    torch.testing.assert_close(a.loss_traces, b.loss_traces, rtol=0, atol=0)
    even = estimate_llc(model, data, num_chains=2, generator=gens([0, 2]), **settings)
    odd = estimate_llc(model, data, num_chains=2, generator=gens([1, 3]), **settings)
    torch.testing.assert_close(torch.stack([even.chain_llcs, odd.chain_llcs], 1).reshape(-1), a.chain_llcs)
    torch.testing.assert_close(a.mean, a.chain_llcs.mean())
    torch.testing.assert_close(a.std, a.chain_llcs.std())
    c = estimate_llc(model, data, num_chains=4, generator=gens(range(10, 14)), **settings)
    assert not torch.equal(a.loss_traces, c.loss_traces)


def test_non_minimum_is_flagged_below_init():
    x, noise = regression_data(0, 2)
    est = llc(TwoInputs([0.5, 0.5]), (x, x @ torch.tensor([0.3, 0.7], dtype=torch.float64) + noise), 0,
              epsilon=2e-4, num_draws=200, num_burnin=50)
    assert est.below_init.all() and est.mean < 0


class SquareRoot(Params):
    def forward(self, x):
        return self.w.sqrt() * x[:, 0]  # NaN once a chain steps below zero


def test_nan_chain_marks_the_estimate_failed():
    x, noise = regression_data(0, 1)
    est = llc(SquareRoot([0.01]), (x, 0.1 * x[:, 0] + noise), 0, epsilon=0.1, num_draws=20, num_burnin=0)
    assert est.failed and est.diverged.all()
    assert "chain 0 produced a non-finite loss at step" in est.reason
    assert math.isnan(est.mean) and math.isnan(est.std)
    assert torch.isfinite(est.init_loss) and torch.isnan(est.loss_traces[:, -1]).all()
    broken = llc(SquareRoot([-1.0]), (x, noise), 0, num_draws=5, num_burnin=0)
    assert broken.failed and broken.reason == "L(w*) is not finite (nan)" and broken.diverged.all()


def test_too_large_step_diverges():
    """ε·nβ·(largest curvature) > 4 makes the discretised chain unstable."""
    x, noise = regression_data(0, 2)
    w_star = [0.3, 0.7]
    data = (x, x @ torch.tensor(w_star, dtype=torch.float64) + noise)
    table = calibrate(TwoInputs(w_star), data, [2e-4, 3e-2], [default_nbeta(N), 2 * default_nbeta(N)], loss_fn=nll,
                      num_chains=2, num_burnin=20, num_draws=100, batch_size=None, gamma=1.0,
                      generator=torch.Generator().manual_seed(0))
    assert table.mean.shape == table.diverged.shape == (2, 2) and table.llc_traces.shape == (2, 2, 120)
    assert (table.diverged[0] == 0).all() and (table.diverged[1] == 1).all()
    assert torch.isfinite(table.mean[0]).all()
    fig = plot_calibration(table)
    assert len(fig.axes) == 3
    assert fig.axes[-1].get_xscale() == "log"


def test_max_llc_flags_runaway_chains():
    x, noise = regression_data(0, 2)
    data = (x, x @ torch.tensor([0.3, 0.7], dtype=torch.float64) + noise)
    est = llc(TwoInputs([0.3, 0.7]), data, 0, epsilon=2e-4, num_draws=200, num_burnin=50, max_llc=0.01)
    assert est.diverged.all() and not est.failed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilon": 0.0}, r"epsilon must be > 0 and finite, got epsilon=0.0"),
        ({"epsilon": -1e-3}, r"epsilon must be > 0 and finite, got epsilon=-0.001"),
        ({"nbeta": 0.0}, r"nbeta must be > 0 and finite, got nbeta=0.0"),
        ({"nbeta": -5.0}, r"nbeta must be > 0 and finite, got nbeta=-5.0"),
        ({"gamma": -1.0}, r"gamma must be >= 0 and finite, got gamma=-1.0"),
        ({"num_chains": 0}, r"num_chains must be >= 1, got num_chains=0"),
        ({"num_draws": 0}, r"num_draws must be >= 1, got num_draws=0"),
        ({"batch_size": 0}, r"batch_size must be >= 1, got batch_size=0"),
        ({"num_chains": 3, "generator": [torch.Generator()] * 2}, r"got 2 generators for num_chains=3"),
    ],
)
def test_bad_settings(kwargs, match):
    model, data = _small_model()
    with pytest.raises(ValueError, match=match):
        estimate_llc(model, data, **kwargs)


def test_bad_data():
    model, (x, y) = _small_model()
    with pytest.raises(ValueError, match="data is empty: the LLC needs at least one training example"):
        estimate_llc(model, (x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"share their first dimension \(examples\), got lengths \[32, 31\]"):
        estimate_llc(model, (x, y[:-1]))
    with pytest.raises(ValueError, match=r"needs n >= 2 training examples, got n=1; pass nbeta"):
        estimate_llc(model.eval(), (x[:1], y[:1]))
    with pytest.raises(ValueError, match="need at least one epsilon and one nbeta"):
        calibrate(model, (x, y), [], [1.0])
