"""The Jacobian cache keeps chunks within its byte budget and hands each back once."""

import pytest
import torch

from lib_lightning.core.lib.cache import JacobianCache


def _chunk(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(batch, 2, 3, generator=gen, dtype=torch.float64)  # (batch, pos_in, d_in)
    g = torch.randn(batch, 2, 1, 4, 3, generator=gen, dtype=torch.float64)  # (batch, pos_in, pos_out, k, d_in)
    return acts, g


def test_keeps_chunks_until_the_budget_and_later_smaller_ones_that_fit():
    big, small = _chunk(4, 0), _chunk(1, 1)  # 4 * (6 + 24) * 8 = 960 bytes; 240 bytes
    cache = JacobianCache(budget_bytes=1300)
    assert cache.put(0, *big) and cache.nbytes == 960
    assert not cache.put(1, *big)  # 1920 > 1300: recomputed later instead
    assert cache.put(2, *small) and cache.nbytes == 1200
    assert 0 in cache and 1 not in cache and len(cache) == 2
    acts, g = cache.pop(0)
    assert acts is big[0] and g is big[1]  # the same tensors, not copies
    assert cache.pop(0) is None and cache.pop(1) is None
    assert cache.nbytes == 240


def test_zero_budget_keeps_nothing():
    cache = JacobianCache(0)
    assert not cache.put(0, *_chunk(1, 0)) and len(cache) == 0


def test_bad_budget_and_a_chunk_cached_twice_are_errors():
    with pytest.raises(ValueError, match="budget_bytes must be >= 0, got -1"):
        JacobianCache(-1)
    cache = JacobianCache(10_000)
    cache.put(3, *_chunk(1, 0))
    with pytest.raises(KeyError, match="chunk 3 is already cached"):
        cache.put(3, *_chunk(1, 0))
