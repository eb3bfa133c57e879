"""The float64 cross-entropy and predictions of the evaluation sums against torch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_lightning.core.interpret.evaluation import _losses, evaluation_update


def _logits(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    n, classes = 600, 113
    logits = torch.randn(n, classes, generator=gen, dtype=torch.float64) * 8
    logits[:100] *= 20  # confident rows: losses near 0 and near 160
    logits[100:110] = 0.0  # every class tied: the first one is predicted
    logits[110:120, 5:7] = logits[110:120].amax(1, keepdim=True) + 1.0  # a tie for the top between 5 and 6
    logits[120:130, 50] = -torch.inf  # a class that can never be picked
    labels = torch.randint(0, classes, (n,), generator=gen)
    labels[110:115], labels[115:120] = 5, 6
    return logits.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_are_cross_entropy_in_float64_and_predictions_the_first_maximum(dtype):
    logits, labels = _logits(dtype)
    given = logits.clone()
    losses, predicted = _losses(logits, labels)
    assert torch.equal(logits, given)  # the logits are the caller's: never shifted in place
    want = F.cross_entropy(logits.to(torch.float64), labels, reduction="none")
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, want, rtol=8 * torch.finfo(torch.float64).eps, atol=1e-15)
    assert torch.equal(predicted, logits.to(torch.float64).argmax(-1))
    assert predicted[100:110].eq(0).all() and predicted[110:120].eq(5).all()
    total = evaluation_update(logits, labels)
    assert total[1] == (predicted == labels).sum() and total[2] == len(labels)
    torch.testing.assert_close(total[0], want.sum(), rtol=1e-14, atol=0)


def test_losses_keep_non_finite_logits_as_cross_entropy_does():
    logits = torch.tensor([[0.0, torch.nan, 1.0], [torch.inf, 0.0, 1.0], [-torch.inf, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    losses, _ = _losses(logits, labels)
    want = F.cross_entropy(logits.double(), labels, reduction="none")
    assert torch.equal(losses.isnan(), want.isnan()) and torch.equal(losses.isinf(), want.isinf())
