"""Cross-entropy and accuracy of a model's logits over held-out batches, as float64 sums and a count
(LIB_SPEC.md §5): one batch at a time (:func:`evaluation_update`), several stacked copies of one batch
at once (:func:`copy_updates`), summed over the batches and divided at the end (:class:`Evaluation`).

Data is a re-iterable sequence of ``(inputs, labels)`` batches; the model's output is a
``(batch, classes)`` tensor of logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Data", "Evaluation", "evaluation_update", "copy_updates", "evaluate_logits", "evaluate"]

Data = Sequence[tuple[Any, torch.Tensor]]


@dataclass(frozen=True)
class Evaluation:
    """Cross-entropy and accuracy of a model over a dataset, as sums and a count."""

    loss_sum: float
    correct_sum: float
    count: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count

    @property
    def accuracy(self) -> float:
        return self.correct_sum / self.count

    @classmethod
    def from_sums(cls, sums: torch.Tensor) -> Evaluation:
        """From a ``(loss_sum, correct_sum, count)`` tensor (:func:`evaluation_update`, summed over batches)."""
        loss_sum, correct_sum, count = sums.tolist()
        return cls(loss_sum, correct_sum, int(count))


def evaluation_update(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """``(loss_sum, correct_sum, count)`` of one batch, float64."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"forward(model, inputs) must return (batch, classes) logits, got {shape}")
    labels = labels.to(logits.device)
    losses, predicted = _losses(logits, labels)
    correct = (predicted == labels).sum().to(torch.float64)
    return torch.stack([losses.sum(), correct, torch.tensor(float(labels.shape[0]), dtype=torch.float64,
                                                             device=logits.device)])


def _losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the cross-entropy in float64 and the predicted class (the first maximal logit).

    The same arithmetic as ``F.cross_entropy`` of the logits in float64 (the loss is
    log Σ exp(x − max) − (x_y − max)) in fewer passes over the rows: the maximum and its index once, in
    the logits' own dtype (their conversion to float64 is exact and keeps their order, ties included), and
    no log-softmax of every class written out. The losses differ from it only in the last bits (the
    exponentials summed in another order): 0.8 against 1.0-1.9 ms per 2,048 rows of 113 float32 logits,
    one thread (``benchmarks/losses.py``)."""
    top, predicted = logits.max(-1)
    shifted = logits.to(torch.float64, copy=True).sub_(top.unsqueeze(-1).to(torch.float64))  # exact for float32
    picked = shifted.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return shifted.exp_().sum(-1).log_() - picked, predicted


def copy_updates(logits: Any, labels: torch.Tensor, copies: int) -> torch.Tensor:
    """``(copies, 3)`` float64: :func:`evaluation_update` of each of ``copies`` copies of one batch stacked
    along the batch dimension (``logits`` ``(copies * batch, classes)``, copy j in rows
    ``j * batch : (j + 1) * batch``), as one reduction; the loss sums may differ from it in the last bits
    (another summation order).

    Raises:
        ValueError: for logits that are not ``(copies * batch, classes)``.
    """
    batch = labels.shape[0]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != copies * batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"forward(model, inputs) must return ({copies} x {batch}, classes) logits, got {shape}")
    labels = labels.to(logits.device).repeat(copies)  # (copies * batch,)
    losses, predicted = _losses(logits, labels)
    loss = losses.view(copies, batch).sum(1)
    correct = (predicted == labels).view(copies, batch).sum(1).to(torch.float64)
    return torch.stack([loss, correct, torch.full_like(loss, float(batch))], dim=1)


def evaluate_logits(batches: Iterable[tuple[Any, torch.Tensor]]) -> Evaluation:
    """Cross-entropy and accuracy of ``(logits, labels)`` batches, summed then divided.

    Raises:
        ValueError: for no batch or logits that are not ``(batch, classes)``.
    """
    total = None
    for logits, labels in batches:
        part = evaluation_update(logits, labels)
        total = part if total is None else total + part
    if total is None or total[2] == 0:
        raise ValueError("the evaluation data is empty: no batch was given")
    return Evaluation.from_sums(total)


def evaluate(run: Callable[[Any], Any], data: Data) -> Evaluation:
    """Cross-entropy and accuracy of ``run(inputs)`` (logits) against the labels of every batch.

    Raises:
        ValueError: for empty data or outputs that are not ``(batch, classes)``.
    """
    return evaluate_logits((run(inputs), labels) for inputs, labels in data)
