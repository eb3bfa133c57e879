"""Nested model inputs: batch size, selection, concatenation, devices and dtypes (core/batch.py)."""

from __future__ import annotations

from collections import UserDict, namedtuple

import pytest
import torch
from transformers import BatchEncoding

from lib_lightning.core.lib.batch import (
    batch_size,
    concat,
    example_leaves,
    from_state,
    prepare,
    select,
    split,
    to_device,
    to_state,
)
from lib_lightning.core.lib.capture import select_examples
from lib_lightning.core.lib.jacobian import batch_size as jacobian_batch_size
from lib_lightning.core.lib.modes import prepare_inputs

Pair = namedtuple("Pair", ["src", "tgt"])


def _nested(n: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    encoding = BatchEncoding({
        "input_ids": torch.randint(0, 9, (n, 4), generator=gen),
        "attention_mask": torch.ones(n, 4, dtype=torch.long),
    })
    return {
        "text": encoding,
        "pair": Pair(torch.randn(n, 3, generator=gen, dtype=torch.float64), [torch.randn(n, 2, 2, generator=gen)]),
        "scale": torch.tensor(2.0),  # 0-d: shared context
        "mode": "train",
    }


def test_batch_size_of_nested_inputs_and_mapping_types_are_kept():
    x = _nested(5)
    assert batch_size(x) == jacobian_batch_size(x) == 5
    assert [path for path, _ in example_leaves(x)] == [
        "['text']['input_ids']", "['text']['attention_mask']", "['pair'].src", "['pair'].tgt[0]",
    ]
    picked = select(x, torch.tensor([4, 0]))
    assert type(picked["text"]) is BatchEncoding and type(picked["pair"]) is Pair
    assert torch.equal(picked["text"]["input_ids"], x["text"]["input_ids"][[4, 0]])
    assert torch.equal(picked["pair"].tgt[0], x["pair"].tgt[0][[4, 0]])
    assert picked["scale"] is x["scale"] and picked["mode"] == "train"
    assert torch.equal(picked["text"].input_ids, picked["text"]["input_ids"])  # a working BatchEncoding


def test_a_leaf_with_another_batch_size_is_named_with_its_shape():
    x = _nested(5)
    x["text"]["attention_mask"] = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"leaf \"\['text'\]\['attention_mask'\]\" has shape \(4, 4\), but leaf "
                                         r"\"\['text'\]\['input_ids'\]\" has batch size 5"):
        batch_size(x)
    with pytest.raises(ValueError, match=r"leaf \"\['text'\]\['input_ids'\]\" has shape \(5, 4\), but expected batch size 6"):
        batch_size(_nested(5), expected=6)
    with pytest.raises(TypeError, match="model inputs of type dict hold no tensor with a batch dimension"):
        batch_size({"scale": torch.tensor(1.0), "mode": "x"})


def test_split_then_concat_gives_the_inputs_back():
    x = _nested(7)
    parts = split(x, 3)
    assert [batch_size(p) for p in parts] == [3, 3, 1]
    back = concat(parts)
    assert type(back["text"]) is BatchEncoding and back["mode"] == "train"
    for (pa, a), (pb, b) in zip(example_leaves(x), example_leaves(back)):
        assert pa == pb and torch.equal(a, b)


def test_concat_refuses_batches_of_other_structures():
    with pytest.raises(ValueError, match="batch 1 has another structure than batch 0"):
        concat([{"a": torch.ones(2)}, {"b": torch.ones(2)}])
    with pytest.raises(ValueError, match="concat needs at least one batch"):
        concat([])


def test_prepare_clones_and_casts_only_floating_leaves():
    x = _nested(3)
    out = prepare(x, torch.float32)
    assert out["pair"].src.dtype == torch.float32 and out["pair"].tgt[0].dtype == torch.float32
    assert out["text"]["input_ids"].dtype == torch.long
    assert out["text"]["input_ids"].data_ptr() != x["text"]["input_ids"].data_ptr()
    torch.testing.assert_close(out["pair"].src, x["pair"].src.float(), rtol=0, atol=0)
    assert type(prepare_inputs(x, None)["text"]) is BatchEncoding


def test_to_device_moves_every_tensor():
    moved = to_device(_nested(3), "meta")
    assert {leaf.device.type for _, leaf in example_leaves(moved)} == {"meta"}
    assert moved["scale"].device.type == "meta" and type(moved["text"]) is BatchEncoding


def test_select_examples_of_a_user_dict_and_a_mapping_without_a_dict_constructor():
    class Frozen(UserDict):
        def __init__(self, *, data):  # no positional dict: rebuilt as a plain dict
            super().__init__(data)

    x = [UserDict({"a": torch.arange(4)}), Frozen(data={"b": torch.arange(8).reshape(4, 2)})]
    out = select_examples(x, slice(1, 3))
    assert type(out[0]) is UserDict and torch.equal(out[0]["a"], torch.tensor([1, 2]))
    assert type(out[1]) is dict and torch.equal(out[1]["b"], torch.tensor([[2, 3], [4, 5]]))
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        split(x, 0)


def test_state_round_trip_loads_with_weights_only(tmp_path):
    x = {k: v for k, v in _nested(4).items() if k != "pair"}  # namedtuples are not serialisable, below
    x["pairs"] = [(torch.arange(4), 1.5)]
    torch.save({"inputs": to_state(x)}, tmp_path / "state.pt")
    back = from_state(torch.load(tmp_path / "state.pt", weights_only=True)["inputs"])
    assert type(back["text"]) is BatchEncoding and back["mode"] == "train" and back["pairs"][0][1] == 1.5
    assert type(back["pairs"][0]) is tuple
    for (pa, a), (pb, b) in zip(example_leaves(x), example_leaves(back)):
        assert pa == pb and torch.equal(a, b)
    with pytest.raises(NotImplementedError, match="namedtuple"):
        to_state(_nested(2))
