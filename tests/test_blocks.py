"""pyco.blocks: named partitions of parameters. Every trainable parameter in exactly one block; overlaps and
uncovered parameters are errors that name the blocks and the parameter."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import pyco
from pyco.blocks import Blocks, by_group, by_module, by_names, by_param


class WithRootParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.body = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


def frozen_first_layer() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    return model


def tied() -> nn.Module:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    return model


# (builder, model, expected {block: [param names]})
PARTITIONS = [
    ("by_module", lambda: nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)),
     {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}),
    ("by_module", WithRootParam, {"(root)": ["scale"], "body.0": ["body.0.weight", "body.0.bias"],
                                   "body.2": ["body.2.weight", "body.2.bias"]}),
    ("by_module", frozen_first_layer, {"2": ["2.weight", "2.bias"]}),
    ("by_param", lambda: nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1, bias=False)),
     {"0.weight": ["0.weight"], "0.bias": ["0.bias"], "1.weight": ["1.weight"]}),
    ("by_param", frozen_first_layer, {"2.weight": ["2.weight"], "2.bias": ["2.bias"]}),
    ("by_names", WithRootParam, {"head": ["body.2.weight", "body.2.bias"], "rest": ["scale", "body.0.weight",
                                                                                    "body.0.bias"]}),
]
PATTERNS = {"head": ["body.2.*"], "rest": ["scale", "body.0.*"]}


@pytest.mark.parametrize("builder, make_model, expected", PARTITIONS, ids=[f"{b}-{i}" for i, (b, _, _) in
                                                                           enumerate(PARTITIONS)])
def test_partitions(builder, make_model, expected):
    model = make_model()
    blocks = by_names(model, PATTERNS) if builder == "by_names" else getattr(pyco.blocks, builder)(model)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {b: sorted(names[id(p)] for p in blocks[b]) for b in blocks}
    assert got == {b: sorted(ps) for b, ps in expected.items()}
    assert list(blocks) == list(expected)
    assert blocks.module is model
    trainable = [p for p in model.parameters() if p.requires_grad]
    blocks.check_covers(trainable)  # every trainable parameter exactly once


def test_by_group_names_and_members():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a, b], "name": "body"}, {"params": [c]}], lr=0.1)
    blocks = by_group(opt)
    assert list(blocks) == ["body", "group1"]
    assert blocks["body"] == (a, b) and blocks["group1"] == (c,)
    assert blocks.module is None
    assert blocks.index(c) == 1 and blocks.numel() == [4, 2]


# (what, make, error type, message regex)
ERRORS = [
    ("overlap", lambda p, q: Blocks([("a", [p]), ("b", [p, q])]), ValueError,
     r"blocks 'a' and 'b' overlap: both hold"),
    ("duplicate name", lambda p, q: Blocks([("a", [p]), ("a", [q])]), ValueError, r"block name 'a' appears twice"),
    ("not a tensor", lambda p, q: Blocks([("a", [p, 3])]), TypeError, r"block 'a' holds a int"),
    ("not a pair", lambda p, q: Blocks(["a"]), TypeError, r"entry 0"),
]


@pytest.mark.parametrize("what, make, error, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_construction_errors(what, make, error, message):
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    with pytest.raises(error, match=message):
        make(p, q)


def test_by_module_rejects_tied_weights_naming_both_blocks():
    with pytest.raises(ValueError, match=r"blocks '0' and '1' overlap: both hold param 0\.weight \(a tied weight\); "
                                         r"by_module\(model, shared='first'\)"):
        by_module(tied())


def test_by_module_shared_first_gives_a_tied_weight_to_its_first_owner():
    model = tied()
    blocks = by_module(model, shared="first")
    assert list(blocks) == ["0"] and blocks["0"] == (model[0].weight,)  # the head has nothing left of its own
    blocks.check_covers(model.parameters())  # every parameter exactly once
    with_bias = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
    with_bias[1].weight = with_bias[0].weight
    blocks = by_module(with_bias, shared="first")
    assert list(blocks) == ["0", "1"] and blocks["1"] == (with_bias[1].bias,)
    assert blocks.index(with_bias[1].weight) == 0
    # with nothing shared, the policy changes nothing
    plain = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    assert [blocks_.numel() for blocks_ in (by_module(plain), by_module(plain, shared="first"))] == [[9, 4], [9, 4]]
    with pytest.raises(ValueError, match=r"shared must be one of \('error', 'first'\), got 'last'"):
        by_module(model, shared="last")


def test_by_names_errors():
    model = WithRootParam()
    with pytest.raises(ValueError, match=r"blocks 'a' and 'b' overlap: both match param body\.0\.weight"):
        by_names(model, {"a": ["body.*"], "b": ["body.0.weight"], "c": ["scale"]})
    with pytest.raises(ValueError, match=re.escape("params ['scale'] match no block's patterns")):
        by_names(model, {"body": "body.*"})
    with pytest.raises(ValueError, match=r"block 'ghost': patterns \['nothing\.\*'\] match no trainable parameter"):
        by_names(model, {"all": "*", "ghost": ["nothing.*"]})


def test_check_covers_names_missing_and_foreign_parameters():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    blocks = by_names(model, {"first": "0.*", "second": "1.*"})
    stranger = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"in no block: every parameter needs exactly one block"):
        blocks.check_covers([*model.parameters(), stranger])
    partial = Blocks([("first", list(model[0].parameters()))], {id(p): n for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match=r"block 'first' holds param 0\.weight, which is not a parameter of the "
                                         r"optimizer"):
        partial.check_covers(model[1].parameters())
    with pytest.raises(KeyError, match=r"is in no block"):
        blocks.index(stranger)
    with pytest.raises(KeyError, match=r"no block named 'third'; blocks are \['first', 'second'\]"):
        blocks["third"]


def test_of_accepts_dicts_and_pairs():
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    from_dict = Blocks.of({"a": [p], "b": q})
    from_pairs = Blocks.of([("a", [p]), ("b", [q])])
    assert list(from_dict) == list(from_pairs) == ["a", "b"]
    assert from_dict["b"] == (q,) and Blocks.of(from_dict) is from_dict
    assert by_param(nn.Linear(2, 2)).names == ("weight", "bias")
