"""Refined LLCs, the RMSprop sampler, sampler health and the recommended calibration.

The known-value checks reuse the models and data of ``test_llc.py`` (n = 2000, MSE / 2, full batch,
three data seeds, tolerance on the mean over seeds).
"""

import math

import pytest
import torch
from torch import nn

from lib_lightning.core.llc import HealthLimits, LLCCalibration, calibrate, default_nbeta, estimate_llc, health_problems, recommend
from lib_lightning.core.llc.health import trend
from lib_lightning.core.llc.samplers import Preconditioner, log_acceptance
from tests.core.test_llc import N, SEEDS, Product, Sum, TwoInputs, llc, nll, product_reference, regression_data

RMSPROP = dict(sampler="rmsprop_sgld")


class LinearPlusProduct(nn.Module):
    """y = Linear(3→1)(x[:, :3]) + a·b·x[:, 3]: a regular part of d = 4 and a singular pair (a, b) at 0."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1).double()
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return self.linear(x[:, :3])[:, 0] + self.a * self.b * x[:, 3]


def _fitted_linear_plus_product(seed):
    x, noise = regression_data(seed, 4, scales=[1.0, 0.8, 1.25, 1.0])
    y = x[:, :3] @ torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) + 0.3 + noise
    model = LinearPlusProduct()
    with torch.no_grad():  # least squares on the linear part; a = b = 0 is then a critical point of L
        design = torch.cat([x[:, :3], torch.ones(N, 1, dtype=torch.float64)], dim=1)
        fit = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
        model.linear.weight.copy_(fit[:3][None]), model.linear.bias.copy_(fit[3:])
    return model, (x, y)


def test_restricted_llc_of_a_regular_part_is_half_its_dimension():
    """Sampling only ``linear.*`` (d = 4) of a model whose other part is singular: λ = 2, within 10 %."""
    estimates = []
    for seed in SEEDS:
        model, data = _fitted_linear_plus_product(seed)
        est = llc(model, data, seed, params=["linear.*"], epsilon=4e-4)
        assert est.params == ("linear.weight", "linear.bias") and est.num_params == 4
        assert not est.failed and not est.diverged.any() and not est.below_init.any()
        estimates.append(est.mean.item())
    assert abs(sum(estimates) / len(estimates) - 2.0) < 0.2, estimates


@pytest.mark.slow
def test_restricted_llc_of_the_singular_pair_matches_its_quadrature():
    """Sampling only (a, b) at 0 with the linear part fixed: the w1·w2·x model's finite-n value ± 15 %."""
    estimates, references = [], []
    for seed in SEEDS:
        model, data = _fitted_linear_plus_product(seed)
        est = llc(model, data, seed, params=["a", "b"], epsilon=1e-3, gamma=0.5, num_burnin=300, num_draws=1200)
        estimates.append(est.mean.item())
        t = default_nbeta(N) * float((data[0][:, 3] ** 2).mean()) / 2
        references.append(product_reference(t, 0.5))
    mean, reference = sum(estimates) / len(estimates), sum(references) / len(references)
    assert abs(mean - reference) < 0.15 * reference, (estimates, reference)


def test_rmsprop_sampler_gives_half_the_parameter_count_of_a_regular_model():
    """Linear regression, d = 4, unequal input scales (so the preconditioner is not uniform): λ = 2 ± 10 %."""
    estimates = []
    for seed in SEEDS:
        x, noise = regression_data(seed, 3, scales=[1.0, 0.3, 3.0])
        y = x @ torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) + 0.3 + noise
        model = nn.Linear(3, 1).double()
        with torch.no_grad():
            design = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], dim=1)
            fit = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
            model.weight.copy_(fit[:3][None]), model.bias.copy_(fit[3:])
        est = llc(model, (x, y), seed, epsilon=4e-4, **RMSPROP)
        assert est.sampler == "rmsprop_sgld"
        assert not est.failed and not est.diverged.any() and not est.below_init.any()
        estimates.append(est.mean.item())
    assert abs(sum(estimates) / len(estimates) - 2.0) < 0.2, estimates


@pytest.mark.slow
def test_rmsprop_sampler_on_the_singular_models():
    """(w1 + w2)·x: 1/2 ± 20 %; w1·x1 + w2·x2: 1 ± 20 %; w1·w2·x at 0: its quadrature value ± 15 %."""
    redundant, regular, product, references = [], [], [], []
    w_star = [0.3, 0.7]
    for seed in SEEDS:
        x, noise = regression_data(seed, 1)
        redundant.append(llc(Sum(w_star), (x, x[:, 0] + noise), seed, epsilon=4e-4, **RMSPROP).mean.item())
        x2, noise2 = regression_data(seed, 2)
        data2 = (x2, x2 @ torch.tensor(w_star, dtype=torch.float64) + noise2)
        regular.append(llc(TwoInputs(w_star), data2, seed, epsilon=4e-4, **RMSPROP).mean.item())
        est = llc(Product([0.0, 0.0]), (x, noise), seed, epsilon=1e-3, gamma=0.5, num_burnin=300, num_draws=1200,
                  **RMSPROP)
        product.append(est.mean.item())
        references.append(product_reference(default_nbeta(N) * float((x[:, 0] ** 2).mean()) / 2, 0.5))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert abs(mean(redundant) - 0.5) < 0.1, redundant
    assert abs(mean(regular) - 1.0) < 0.2, regular
    assert abs(mean(product) - mean(references)) < 0.15 * mean(references), (product, references)


def test_preconditioner_is_rmsprop_relative_to_its_mean_and_floored():
    pre = Preconditioner(decay=0.5, floor=0.1)
    assert pre() is None  # P = 1 before any drift
    pre.update({"w": torch.tensor([0.0, 0.0])})
    assert pre() is None  # no scale seen yet
    pre.update({"w": torch.tensor([4.0, 0.0])})
    # EMA of g²: 0.5·0 + 0.5·16 = 8 for w[0]; bias correction 1 − 0.5² = 0.75 → s = sqrt(8 / 0.75)
    s0 = math.sqrt(8 / 0.75)
    mean = s0 / 2
    torch.testing.assert_close(pre()["w"], torch.tensor([mean / (s0 + 0.1 * mean), 1 / 0.1]))


def test_mala_acceptance_of_one_step_matches_a_hand_computation():
    """One full-batch SGLD step of y = w1·x1 + w2·x2 from w*, redone by hand with the chain's noise."""
    x, noise = regression_data(0, 2)
    w_star = torch.tensor([0.3, 0.7], dtype=torch.float64)
    data = (x, x @ w_star + noise)
    eps, gamma, nbeta = 2e-3, 1.0, default_nbeta(N)
    est = estimate_llc(TwoInputs(w_star.tolist()), data, loss_fn=nll, num_chains=1, num_burnin=0, num_draws=1,
                       batch_size=None, epsilon=eps, gamma=gamma, mala_every=1,
                       generator=torch.Generator().manual_seed(5))

    def potential_and_drift(w):
        w = w.clone().requires_grad_(True)
        u = nbeta * nll(x @ w, data) + gamma / 2 * ((w - w_star) ** 2).sum()
        return u.item(), torch.autograd.grad(u, w)[0]

    xi = torch.randn(2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u0, g0 = potential_and_drift(w_star)
    w1 = w_star - eps / 2 * g0 + math.sqrt(eps) * xi
    u1, g1 = potential_and_drift(w1)
    log_a = u0 - u1 - ((w_star - w1 + eps / 2 * g1) ** 2).sum() / (2 * eps) + ((w1 - w_star + eps / 2 * g0) ** 2).sum() / (2 * eps)
    torch.testing.assert_close(est.acceptance, torch.tensor([min(1.0, math.exp(log_a))], dtype=torch.float64))
    torch.testing.assert_close(est.noise_norm, torch.tensor([math.sqrt(eps) * xi.norm().item()], dtype=torch.float64))
    torch.testing.assert_close(est.loc_norm, torch.zeros(1, dtype=torch.float64))  # the step starts at w*
    assert log_acceptance(1.0, 1.0, {"w": torch.zeros(2)}, {"w": torch.zeros(2)}, {"w": torch.zeros(2)},
                          {"w": torch.zeros(2)}, None, eps) == 0.0


def test_acceptance_falls_and_the_estimate_turns_unhealthy_as_the_step_grows():
    """ε·c = 1.5 (stable, < 4, but λ̂ off by about half) against 0.1, c = nβ·h the curvature of nβ·L:
    acceptance below against near 1; noise norm ≈ sqrt(ε)·E|ξ|."""
    x, noise = regression_data(0, 2)
    data = (x, x @ torch.tensor([0.3, 0.7], dtype=torch.float64) + noise)
    h = default_nbeta(N)  # curvature of nβ·L along each unit-variance input
    small = llc(TwoInputs([0.3, 0.7]), data, 0, epsilon=0.1 / h, mala_every=1, num_draws=200, num_burnin=50)
    large = llc(TwoInputs([0.3, 0.7]), data, 0, epsilon=1.5 / h, mala_every=1, num_draws=200, num_burnin=50)
    assert (small.acceptance > 0.98).all() and (large.acceptance < 0.9).all()
    assert large.mean > 1.3  # λ = 1: the step's bias (1 / (1 − ε·c/4) = 1.6 for a Gaussian) that it detects
    assert health_problems(small) == []
    assert any("MALA acceptance" in p for p in health_problems(large))
    expected = math.sqrt(0.1 / h) * math.sqrt(math.pi / 2)  # E|ξ| for ξ ~ N(0, I₂)
    assert abs(small.noise_norm.mean().item() / expected - 1) < 0.05


def test_chain_still_moving_after_burn_in_is_flagged_trending():
    """Start far from the minimum with weak drift and no burn-in: the loss is still falling through the draws."""
    x, noise = regression_data(0, 2)
    data = (x, x @ torch.tensor([0.3, 0.7], dtype=torch.float64) + noise)
    moving = llc(TwoInputs([3.0, -2.0]), data, 0, epsilon=2e-6, gamma=0.0, num_burnin=0, num_draws=200)
    assert (moving.trend < -4).all()
    assert any("still trending" in p for p in health_problems(moving))
    settled = llc(TwoInputs([0.3, 0.7]), data, 0, epsilon=0.2 / default_nbeta(N), num_burnin=100, num_draws=400)
    assert (settled.trend.abs() < 4).all()


def test_trend_statistic_closed_forms():
    flat = torch.ones(2, 20, dtype=torch.float64)
    assert torch.equal(trend(flat), torch.zeros(2, dtype=torch.float64))
    line = torch.arange(20, dtype=torch.float64)[None]
    assert trend(line).item() == math.inf and trend(-line).item() == -math.inf
    gen = torch.Generator().manual_seed(0)
    noisy = line * 0.01 + torch.randn(1, 20, generator=gen, dtype=torch.float64)
    assert abs(trend(noisy).item()) < 3


def test_calibration_recommends_the_largest_healthy_step():
    x, noise = regression_data(0, 2)
    data = (x, x @ torch.tensor([0.3, 0.7], dtype=torch.float64) + noise)
    h = default_nbeta(N)
    epsilons = [0.1 / h, 0.3 / h, 1.5 / h, 5.0 / h]  # the last is unstable: ε·nβ·h > 4
    table = calibrate(TwoInputs([0.3, 0.7]), data, epsilons, [h], loss_fn=nll, num_chains=2, num_burnin=50,
                      num_draws=200, batch_size=None, gamma=1.0, mala_every=1,
                      generator=torch.Generator().manual_seed(0))
    assert table.problems[0][0] == () and table.problems[1][0] == ()
    assert table.problems[2][0] and table.problems[3][0]
    choice = recommend(table)
    assert choice.epsilon == pytest.approx(0.3 / h) and choice.nbeta == pytest.approx(h)
    assert "largest swept step" in choice.reason and "MALA acceptance" in choice.reason
    assert math.isfinite(choice.mean)
    none = recommend(calibrate(TwoInputs([0.3, 0.7]), data, [5.0 / h], [h], loss_fn=nll, num_chains=1,
                               num_burnin=5, num_draws=20, batch_size=None, gamma=1.0))
    assert math.isnan(none.epsilon) and "no swept epsilon is healthy" in none.reason
    with pytest.raises(ValueError, match=r"nbeta=1.0 is not one of the swept values"):
        recommend(table, nbeta=1.0)


def test_recommendation_skips_small_steps_that_fail_for_want_of_burn_in():
    """Cells in increasing ε: trending (too short a burn-in), healthy, healthy, low acceptance, healthy
    (a lucky cell past a failure): the third is picked."""
    problems = [("1 of 2 chains still trending",), (), (), ("MALA acceptance 0.8 < 0.9",), ()]
    cells = len(problems)
    table = LLCCalibration(
        epsilons=torch.tensor([1e-6, 2e-6, 5e-6, 1e-5, 2e-5], dtype=torch.float64),
        nbetas=torch.tensor([100.0], dtype=torch.float64), mean=torch.arange(cells, dtype=torch.float64)[:, None],
        std=torch.ones(cells, 1, dtype=torch.float64), diverged=torch.zeros(cells, 1, dtype=torch.float64),
        below_init=torch.zeros(cells, 1, dtype=torch.float64), failed=torch.zeros(cells, 1, dtype=torch.bool),
        llc_traces=torch.zeros(cells, 1, 3, dtype=torch.float64), num_burnin=1,
        acceptance=torch.full((cells, 1), 0.95, dtype=torch.float64), trend=torch.ones(cells, 1, dtype=torch.float64),
        problems=tuple((p,) for p in problems),
    )
    choice = recommend(table)
    assert choice.epsilon == 5e-6 and choice.mean == 2.0
    assert "the next, epsilon=1e-05, has MALA acceptance 0.8 < 0.9" in choice.reason


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "sgnht"}, r"sampler must be one of \('sgld', 'rmsprop_sgld'\), got 'sgnht'"),
        ({"sampler": "rmsprop_sgld", "num_burnin": 0}, r"needs num_burnin >= 1, got num_burnin=0"),
        ({"precond_decay": 1.0}, r"precond_decay must be in \[0, 1\), got precond_decay=1.0"),
        ({"precond_floor": 0.0}, r"precond_floor must be > 0 and finite, got precond_floor=0.0"),
        ({"mala_every": -1}, r"mala_every must be >= 0, got mala_every=-1"),
        ({"params": ["w9"]}, r"params pattern\(s\) \['w9'\] match no trainable parameter; available: \['w'\]"),
        ({"params": []}, r"params must be a non-empty list of names or glob patterns, got \[\]"),
        ({"params": "w"}, r"params must be a non-empty list of names or glob patterns, got 'w'"),
    ],
)
def test_bad_refinement_settings(kwargs, match):
    x, noise = regression_data(0, 2)
    with pytest.raises(ValueError, match=match):
        estimate_llc(TwoInputs([0.3, 0.7]), (x, noise), loss_fn=nll, **kwargs)


def test_bad_health_limits():
    with pytest.raises(ValueError, match=r"min_acceptance must be in \[0, 1\], got min_acceptance=1.5"):
        HealthLimits(min_acceptance=1.5)
    with pytest.raises(ValueError, match=r"max_trend must be > 0, got max_trend=0.0"):
        HealthLimits(max_trend=0.0)


def test_sections_follow_the_data_flow_between_node_layers():
    """The transformer's hooks: embedding + attention, MLP, unembedding (the positional embedding, a bare
    parameter of the top module, is placed by where it is read)."""
    from lib_lightning.core.llc.sections import parameter_sections
    from lib_lightning.models.transformer import ModAddTransformer

    torch.manual_seed(0)
    model = ModAddTransformer(7, d_model=8, n_heads=2, d_head=4, d_mlp=16)
    tokens = torch.randint(7, (4, 3))
    hooks = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_logits"]
    found = parameter_sections(model, hooks, lambda m: m(tokens), names=["pre", "mid", "post", "logits"])
    attn = [f"attn.{p}.{k}" for p in "qkvo" for k in ("weight", "bias")]
    assert found == {"pre->mid": ["pos_embed", "embed.weight", *attn],
                     "mid->post": ["mlp_in.weight", "mlp_in.bias", "mlp_out.weight", "mlp_out.bias"],
                     "post->logits": ["unembed.weight", "unembed.bias"]}
    # mlp_out's input as a node layer fires before mlp_out runs; what is read before the first node
    # layer (embedding, attention) joins the first section
    found = parameter_sections(model, ["hook_resid_mid", "mlp_out", "hook_logits"], lambda m: m(tokens),
                               use_input=[False, True, False])
    assert found["hook_resid_mid->mlp_out"] == ["pos_embed", "embed.weight", *attn, "mlp_in.weight", "mlp_in.bias"]
    assert found["mlp_out->hook_logits"] == ["mlp_out.weight", "mlp_out.bias", "unembed.weight", "unembed.bias"]
    with pytest.raises(ValueError, match=r"node layer module\(s\) \['nope'\] not found; available: \['embed'"):
        parameter_sections(model, ["nope", "hook_logits"], lambda m: m(tokens))
    with pytest.raises(ValueError, match=r"sections need at least 2 node layers, got \['hook_logits'\]"):
        parameter_sections(model, ["hook_logits"], lambda m: m(tokens))
    with pytest.raises(ValueError, match=r"node layer\(s\) \['hook_logits'\] did not fire"):
        parameter_sections(model, ["hook_resid_pre", "hook_logits"], lambda m: m.hook_resid_pre(m.embed(tokens)))
