"""Every bad input gets a clear error, raised before anything changes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, make_params, set_grads, snapshot

import pyco

NAN = math.nan

# (rule, keyword arguments, exception, message). torch=True: torch.optim raises the same message (pyco
# mirrors its wording), so the same regex is checked against torch too.
BAD_HYPER = [
    ("SGD", dict(lr=-0.1), ValueError, r"Invalid learning rate: -0\.1", True),
    ("Adam", dict(lr=-1.0), ValueError, r"Invalid learning rate: -1\.0", True),
    ("Adam", dict(lr=NAN), ValueError, r"Invalid learning rate: nan", False),  # torch accepts NaN
    ("SGD", dict(lr=NAN), ValueError, r"Invalid learning rate: nan", False),
    ("Adam", dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"Tensor (lr|learning rate) must be 1-element", True),
    ("SGD", dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"Tensor (lr|learning rate) must be 1-element", True),
    ("Adam", dict(lr="0.1"), TypeError, r"Invalid learning rate: '0\.1' \(expected a number\)", False),
    ("Adam", dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1\.0", True),
    ("AdamW", dict(betas=(-0.1, 0.999)), ValueError, r"Invalid beta parameter at index 0: -0\.1", True),
    ("Adam", dict(betas=(0.9, 1.0)), ValueError, r"Invalid beta parameter at index 1: 1\.0", True),
    ("Adam", dict(betas=(NAN, 0.9)), ValueError, r"Invalid beta parameter at index 0: nan", False),
    ("AdamW", dict(betas=(0.9, NAN)), ValueError, r"Invalid beta parameter at index 1: nan", False),
    ("Adam", dict(betas=(0.9,)), ValueError, r"Invalid betas: \(0\.9,\)", False),
    ("Adam", dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08", True),
    ("Adam", dict(eps=NAN), ValueError, r"Invalid epsilon value: nan", False),
    ("Adam", dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0\.1", True),
    ("AdamW", dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0\.1", True),
    ("SGD", dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0\.1", True),
    ("SGD", dict(weight_decay=NAN), ValueError, r"Invalid weight_decay value: nan", False),
    ("SGD", dict(momentum=-0.5), ValueError, r"Invalid momentum value: -0\.5", True),
    ("SGD", dict(momentum=NAN), ValueError, r"Invalid momentum value: nan", False),
    ("SGD", dict(nesterov=True), ValueError, r"Nesterov momentum requires a momentum and zero dampening", True),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
     r"Nesterov momentum requires a momentum and zero dampening", True),
    ("SGD", dict(differentiable=True), ValueError, r"SGD does not support differentiable=True", False),
    ("Adam", dict(differentiable=True), ValueError, r"Adam does not support differentiable=True", False),
    ("Adam", dict(capturable=True), ValueError, r"capturable=True needs pyco's CUDA kernels", False),
    ("AdamW", dict(capturable=True), ValueError, r"capturable=True needs pyco's CUDA kernels", False),
    ("SGD", dict(nonfinite="bogus"), ValueError, r"Invalid nonfinite: 'bogus' \(expected one of", False),
    ("Adam", dict(nonfinite=None), ValueError, r"Invalid nonfinite: None", False),
]


@pytest.mark.parametrize("kind, kwargs, exc, message, torch_too", BAD_HYPER)
def test_invalid_hyper_parameters(kind, kwargs, exc, message, torch_too):
    params = make_params([(4,), (3,)], seed=1)
    for p in params:
        p.grad = torch.ones_like(p)
    before = snapshot(None, params)
    with pytest.raises(exc, match=message):
        getattr(pyco.optim, kind)(params, **kwargs)
    assert_unchanged(before, None, params)
    if torch_too:
        with pytest.raises(exc, match=message):
            getattr(torch.optim, kind)(params, **kwargs)


def three_params():
    return make_params([(4,), (3,), (2, 2)], seed=2)


BAD_BLOCKS = [
    (lambda p: {"a": [p[0], p[1]], "b": [p[1], p[2]]}, ValueError, r"blocks 'a' and 'b' overlap"),
    (lambda p: {"a": [p[0]], "b": [p[2]]}, ValueError, r"shape \[3\].* in no block"),
    (lambda p: {"a": [p[0], p[1]], "b": [p[2], torch.zeros(5)]}, ValueError,
     r"block 'b' holds .*shape \[5\].*not a parameter of the optimizer"),
    (lambda p: [("a", [p[0]]), ("a", [p[1], p[2]])], ValueError, r"block name 'a' appears twice"),
    (lambda p: {"a": [p[0], p[1]], "b": [p[2], 3]}, TypeError, r"block 'b' holds a int, expected tensors"),
    (lambda p: [("a", p[:2]), ("b", p[2:]), "c"], TypeError, r"entry 2"),
]


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
@pytest.mark.parametrize("make_blocks, exc, message", BAD_BLOCKS)
def test_invalid_blocks(kind, make_blocks, exc, message):
    params = three_params()
    blocks = make_blocks(params)
    before = snapshot(None, params)
    with pytest.raises(exc, match=message):
        getattr(pyco.optim, kind)(params, lr=0.1, blocks=blocks)
    assert_unchanged(before, None, params)


def test_duplicate_group_names_as_default_blocks():
    params = three_params()
    with pytest.raises(ValueError, match=r"param group names must be unique .*\['x', 'x'\]"):
        pyco.optim.Adam([dict(params=params[:1], name="x"), dict(params=params[1:], name="x")])


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_unsupported_parameter_dtype(kind, dtype):
    bad = torch.nn.Parameter(torch.zeros(3, dtype=dtype), requires_grad=False)
    with pytest.raises(TypeError, match=rf"param 1 of group 0 .*unsupported dtype {dtype}"):
        getattr(pyco.optim, kind)([make_params([(2,)])[0], bad], lr=0.1)


def embedding_model():
    torch.manual_seed(3)
    return torch.nn.ModuleDict(dict(
        dense=torch.nn.Linear(4, 3, dtype=torch.float64),
        emb=torch.nn.Embedding(10, 4, sparse=True, dtype=torch.float64)))


def sparse_grad(opt, params):
    model = opt.model
    model.zero_grad()
    model["dense"](model["emb"](torch.tensor([1, 2, 2]))).sum().backward()
    assert params[-1].grad.is_sparse


def grad_dtype(opt, params):
    params[-1].grad.data = params[-1].grad.data.float()


def grad_shape(opt, params):
    params[-1].grad.data = torch.zeros(7, dtype=torch.float64)


def group_entry(key, value):
    def mutate(opt, params):
        opt.param_groups[-1][key] = value
    mutate.__name__ = f"group_{key}"
    return mutate


# Problems that appear after construction, found by step(): (rule, hyper, how, exception, message).
BAD_STEP = [
    ("Adam", {}, sparse_grad, RuntimeError, r"param 1 of group 1 .*sparse gradient.*SparseAdam"),
    ("SGD", dict(momentum=0.9), sparse_grad, RuntimeError, r"sparse gradient"),
    ("Adam", {}, grad_dtype, ValueError, r"param 1 of group 1 .*gradient of torch\.float32.*must match"),
    ("SGD", dict(momentum=0.9), grad_shape, ValueError, r"gradient of torch\.float64, shape \[7\]"),
    ("Adam", {}, group_entry("lr", -1.0), ValueError, r"Invalid learning rate"),
    ("Adam", {}, group_entry("betas", (0.9, 1.0)), ValueError, r"Invalid beta parameter at index 1"),
    ("AdamW", {}, group_entry("eps", NAN), ValueError, r"Invalid epsilon value"),
    ("SGD", dict(momentum=0.9), group_entry("momentum", -1.0), ValueError, r"Invalid momentum value"),
    ("SGD", dict(momentum=0.9), group_entry("dampening", 0.5), ValueError, r"Nesterov momentum requires"),
    ("SGD", dict(momentum=0.9), group_entry("lr", torch.tensor([0.1, 0.1])), ValueError, r"1-element"),
]


@pytest.mark.parametrize("kind, hyper, how, exc, message", BAD_STEP,
                         ids=[f"{c[0]}-{c[2].__name__}" for c in BAD_STEP])
def test_bad_step_changes_nothing(kind, hyper, how, exc, message):
    """The bad tensor or group is the last one: everything before it would be updated by a step that
    checked as it went."""
    model = embedding_model()
    params = [model["dense"].weight, model["dense"].bias, model["emb"].weight]
    nesterov = dict(nesterov=True) if "momentum" in hyper else {}
    groups = [dict(params=params[:1]), dict(params=params[1:], **nesterov)]
    if how is not sparse_grad:
        model["emb"].sparse = False
    opt = getattr(pyco.optim, kind)(groups, lr=0.01, **hyper)
    opt.model = model
    gen = torch.Generator().manual_seed(4)
    for step in range(2):
        set_grads([params], step, gen)
        opt.step()
    set_grads([params], 2, gen)
    how(opt, params)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=message):
        opt.step()
    assert_unchanged(before, opt, params)
    assert opt.last_stats is not None and not opt.last_stats.skipped


def reject_lr(params):
    return dict(params=[params[2]], lr=-1.0), ValueError, r"Invalid learning rate"


def reject_dtype(params):
    return dict(params=[torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)]), TypeError, \
        r"unsupported dtype torch\.int64"


def reject_duplicate_param(params):
    return dict(params=[params[2], params[0]]), ValueError, r"some parameters appear in more than one parameter group"


def reject_duplicate_name(params):
    return dict(params=[params[2]], name="first"), ValueError, r"names must be unique|'first' appears twice"


def reject_betas(params):
    return dict(params=[params[2]], betas=(1.0, 0.9)), ValueError, r"Invalid beta parameter at index 0"


REJECTED_GROUPS = [reject_lr, reject_dtype, reject_duplicate_param, reject_duplicate_name, reject_betas]


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("make_group", REJECTED_GROUPS)
def test_rejected_add_param_group_leaves_the_optimizer_as_it_was(make_group, blocks):
    params = three_params()
    first = dict(params=[params[0]], name="first")
    spec = {"first": [params[0]], "b": [params[1]]} if blocks else None
    opt = pyco.optim.Adam([first, dict(params=[params[1]], name="b")], lr=0.01, blocks=spec)
    set_grads([params], 0, torch.Generator().manual_seed(5))
    opt.step()
    group, exc, message = make_group(params)
    before = snapshot(opt, params)
    names = opt.block_names
    with pytest.raises(exc, match=message):
        opt.add_param_group(group)
    assert_unchanged(before, opt, params)
    assert opt.block_names == names
    opt.step()  # still consistent: one block per group / per spec entry
    assert opt.last_stats.names == names
    opt.add_param_group(dict(params=[params[2]], name="third"))
    opt.step()
    assert opt.last_stats.names == (*names, "third")
