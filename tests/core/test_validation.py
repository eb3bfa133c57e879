"""The shared argument checks name the argument, the bad value and the valid range or choices."""

import pytest
import torch

from lib_lightning.core.validation import (
    check_at_least,
    check_choice,
    check_choices,
    check_fraction,
    check_thresholds,
    check_weights,
)


def test_valid_values_pass():
    check_choice("split", "val", ("train", "val"))
    check_choices("basis kind(s)", ["lib", "pca"], ("lib", "pca", "neuron"))
    check_at_least("size", 2, 2)
    check_at_least("threads", None, 1, optional=True)
    check_thresholds(0.0, 0.5)
    check_fraction(1.0)
    out = check_weights(torch.tensor([[0.0, 2.0]], dtype=torch.float32), "edges", ndim=2)
    assert out.dtype == torch.float64 and out.tolist() == [[0.0, 2.0]]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_choice("split", "dev", ("train", "val")), r"split must be one of \('train', 'val'\), got 'dev'"),
        (lambda: check_choices("basis kind(s)", ["lib", "ica"], ("lib",)), r"unknown basis kind\(s\) \['ica'\]; valid"),
        (lambda: check_choices("basis kind(s)", [], ("lib",)), r"unknown basis kind\(s\) \[\]"),
        (lambda: check_at_least("size", 1, 2, why="two examples"), r"size must be >= 2 \(two examples\), got 1"),
        (lambda: check_at_least("size", None, 2), r"size must be >= 2, got None"),
        (lambda: check_at_least("threads", 0, 1, optional=True), r"threads must be None or >= 1, got 0"),
        (lambda: check_at_least("lr", float("nan"), 0), r"lr must be >= 0, got nan"),
        (lambda: check_thresholds(-1.0, 0.0), r"abs_threshold must be >= 0, got -1.0"),
        (lambda: check_thresholds(0.0, 1.0), r"rel_threshold must be in \[0, 1\), got 1.0"),
        (lambda: check_fraction(0.0), r"fraction must be in \(0, 1\], got 0.0"),
        (lambda: check_weights(torch.ones(3), "edges", ndim=2), r"edges must be 2-D, got shape \(3,\)"),
        (lambda: check_weights(torch.tensor([1.0, -2.0]), "values", ndim=1), r"values must be non-negative.*at \[1\]"),
        (lambda: check_weights(torch.tensor([1.0, float("inf")]), "v", ndim=1), r"v has non-finite entries at \[1\]"),
    ],
)
def test_bad_values_name_the_argument_and_the_valid_range(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_weights_must_be_a_tensor():
    with pytest.raises(TypeError, match="values must be a torch.Tensor, got list"):
        check_weights([1.0], "values", ndim=1)
