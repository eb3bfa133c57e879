"""Bases: eigenvalues negative beyond rounding are reported, once per node layer (issue 11, item 3)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lib_lightning.core.lib import basis as basis_module
from lib_lightning.core.lib.basis import lib_basis, whiten
from lib_lightning.core.lib.stats import ActivationStats


def _stats(covariance: torch.Tensor) -> ActivationStats:
    """Statistics of 10 rows with zero mean and the given (possibly indefinite) covariance."""
    d = covariance.shape[0]
    zero = torch.zeros(d, dtype=torch.float64)
    return ActivationStats(zero, covariance * 10, torch.tensor(10.0, dtype=torch.float64), zero)


@pytest.fixture(autouse=True)
def fresh_warning_registry(monkeypatch):
    monkeypatch.setattr(basis_module, "_warned", set())


def test_negative_covariance_eigenvalue_beyond_rounding_warns_once_per_layer():
    bad = _stats(torch.diag(torch.tensor([4.0, 1.0, -1e-6], dtype=torch.float64)))
    with pytest.warns(RuntimeWarning, match=r"node layer 'h0': the covariance has an eigenvalue -1e-06, 2.5e-07 of the largest"):
        w = whiten(bad, name="h0")
    torch.testing.assert_close(w.all_eigenvalues, torch.tensor([1.0, 4.0, 1.0, 1e-6], dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whiten(bad, name="h0")  # the same layer again: silent
    with pytest.warns(RuntimeWarning, match="node layer 'h1'"):
        whiten(bad, name="h1")


def test_rounding_sized_negatives_do_not_warn_and_negative_m_eigenvalues_do():
    tiny = _stats(torch.diag(torch.tensor([4.0, 1.0, -1e-15], dtype=torch.float64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = whiten(tiny, center=False, abs_threshold=0.5, name="inp")
    m_prime = torch.diag(torch.tensor([2.0, -0.5, 0.0, 0.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match=r"node layer 'inp': the whitened M has an eigenvalue"):
        lib_basis("inp", w, m_prime)
