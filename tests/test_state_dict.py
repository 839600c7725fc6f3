"""Checkpoints: torch.optim's layout, exchanged both ways mid-run; bad state dicts are refused whole."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TOL, assert_state_match, assert_unchanged, make_params, set_grads, snapshot

import pyco

SHAPES = [(4097,), (3,), (), (0,), (6, 5)]
CASES = [
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, amsgrad=True, maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
]
CHAINS = [("torch", "pyco"), ("pyco", "torch", "pyco"), ("pyco", "pyco"), ("torch", "pyco", "torch")]
LEG = 7  # steps per implementation in a chain


def make_opt(impl: str, kind: str, params, hyper: dict):
    groups = [dict(params=params[:2], **hyper), dict(params=params[2:], **{**hyper, "lr": hyper["lr"] / 2})]
    if impl == "torch":
        return torch.optim.__dict__[kind](groups, foreach=False)
    return pyco.optim.__dict__[kind](groups)


def has_grad(step: int, i: int) -> bool:
    return i != 1 or step % 3 == 0  # parameter 1 has a gradient every third step only


@pytest.mark.parametrize("chain", CHAINS, ids=["-".join(c) for c in CHAINS])
@pytest.mark.parametrize("kind, hyper", CASES)
def test_checkpoint_exchange_continues_the_trajectory(kind, hyper, chain):
    """A run handed over by state_dict between implementations every LEG steps ends where an uninterrupted
    torch run ends."""
    ref_params = make_params(SHAPES, seed=1)
    ref_opt = make_opt("torch", kind, ref_params, hyper)
    params = make_params(SHAPES, seed=1)
    opt = None
    gen = torch.Generator().manual_seed(2)
    step = 0
    for impl in chain:
        fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
        new_opt = make_opt(impl, kind, fresh, hyper)
        if opt is not None:
            # deepcopy: as after torch.save/torch.load (load_state_dict may keep the tensors it is given)
            new_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        params, opt = fresh, new_opt
        for _ in range(LEG):
            set_grads([params, ref_params], step, gen, has_grad)
            opt.step()
            ref_opt.step()
            step += 1
    assert isinstance(opt, torch.optim.Optimizer)
    assert_state_match(opt, params, ref_opt, ref_params, *TOL[torch.float64])


@pytest.fixture(params=[torch.float32, torch.float64], ids=["default-float32", "default-float64"])
def default_dtype(request):
    """torch keeps Adam's step in float64 when that is the default dtype; pyco must follow."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(saved)


@pytest.mark.parametrize("kind, hyper", CASES)
def test_state_dict_layout_matches_torch(kind, hyper, default_dtype):
    sds = []
    for impl in ("pyco", "torch"):
        params = make_params(SHAPES, seed=3)
        opt = make_opt(impl, kind, params, hyper)
        gen = torch.Generator().manual_seed(4)
        for step in range(3):
            set_grads([params], step, gen, lambda s, i: i != 1)  # parameter 1: no gradient, no state
            opt.step()
        sds.append(opt.state_dict())
    ours, theirs = sds
    assert ours.keys() == theirs.keys()
    assert [g.keys() for g in ours["param_groups"]] == [g.keys() for g in theirs["param_groups"]]
    for g_ours, g_theirs in zip(ours["param_groups"], theirs["param_groups"]):
        assert {k: v for k, v in g_ours.items() if k not in ("foreach", "fused")} == \
            {k: v for k, v in g_theirs.items() if k not in ("foreach", "fused")}
    assert ours["state"].keys() == theirs["state"].keys() and 1 not in ours["state"]
    for key, entry in theirs["state"].items():
        assert ours["state"][key].keys() == entry.keys()
        for name, value in entry.items():
            mine = ours["state"][key][name]
            assert type(mine) is type(value) and mine.dtype == value.dtype and mine.shape == value.shape, name
    if kind != "SGD":
        step = ours["state"][0]["step"]
        assert step.dtype == default_dtype and step.dim() == 0 and step.item() == 3.0


@pytest.mark.parametrize("legacy_step", [3, 3.0, torch.tensor(3.0, dtype=torch.float64), torch.tensor([3.0])])
def test_legacy_step_representations_load(legacy_step):
    """Older checkpoints hold 'step' as a number (or a 1-element tensor): loaded, counted on."""
    params = make_params([(5,)], seed=5)
    opt = pyco.optim.Adam(params, lr=0.01)
    params[0].grad = torch.ones_like(params[0])
    for _ in range(3):
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = legacy_step
    other_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = pyco.optim.Adam(other_params, lr=0.01)
    other.load_state_dict(sd)
    other_params[0].grad = torch.ones_like(params[0])
    opt.step()
    other.step()
    assert torch.equal(params[0], other_params[0])
    assert float(other.state[other_params[0]]["step"]) == 4.0


def drop(key):
    def mutate(sd):
        del sd["state"][LAST][key]
    return mutate


def put(key, value):
    def mutate(sd):
        sd["state"][LAST][key] = value
    return mutate


def reshape_state(key):
    def mutate(sd):
        sd["state"][LAST][key] = torch.zeros(7, 6, dtype=torch.float64)
    return mutate


def extra_group(sd):
    sd["param_groups"].append({**sd["param_groups"][-1], "params": [99]})


def fewer_params(sd):
    sd["param_groups"][-1]["params"] = sd["param_groups"][-1]["params"][:-1]


def set_group(key, value):
    def mutate(sd):
        sd["param_groups"][-1][key] = value
    return mutate


LAST = len(SHAPES) - 1  # the bad entry is the last one: every entry before it is valid
BAD = [
    ("Adam", dict(amsgrad=False), drop("exp_avg"), r"param 2 of group 1 .*missing 'exp_avg'"),
    ("Adam", dict(amsgrad=True), drop("max_exp_avg_sq"), r"missing 'max_exp_avg_sq'"),
    ("Adam", dict(amsgrad=False), drop("step"), r"missing 'step'"),
    ("AdamW", dict(amsgrad=False), reshape_state("exp_avg_sq"), r"'exp_avg_sq' has shape \[7, 6\], expected \[6, 5\]"),
    ("Adam", dict(amsgrad=False), put("exp_avg", [1.0, 2.0]), r"'exp_avg' is list, expected a tensor"),
    ("Adam", dict(amsgrad=False), put("step", torch.tensor([1.0, 2.0])), r"'step' has shape \[2\], expected a scalar"),
    ("Adam", dict(amsgrad=False), put("step", -1.0), r"'step' must be a non-negative number"),
    ("Adam", dict(amsgrad=False), extra_group, r"state_dict has 3 param groups, this optimizer has 2"),
    ("SGD", dict(momentum=0.9), extra_group, r"state_dict has 3 param groups, this optimizer has 2"),
    ("Adam", dict(amsgrad=False), fewer_params, r"param group 1 of the state_dict has 2 parameters.* has 3"),
    ("SGD", dict(momentum=0.9), reshape_state("momentum_buffer"), r"'momentum_buffer' has shape \[7, 6\]"),
    ("Adam", dict(amsgrad=False), set_group("lr", -1.0), r"Invalid learning rate"),
    ("Adam", dict(amsgrad=False), set_group("betas", (0.9, 1.0)), r"Invalid beta parameter at index 1"),
    ("SGD", dict(momentum=0.9), set_group("momentum", -0.5), r"Invalid momentum value"),
]


@pytest.mark.parametrize("kind, hyper, mutate, message", BAD, ids=[f"{b[0]}-{b[2].__name__}-{i}" for i, b in
                                                                   enumerate(BAD)])
def test_bad_state_dict_is_refused_and_nothing_loaded(kind, hyper, mutate, message):
    params = make_params(SHAPES, seed=6)
    opt = make_opt("pyco", kind, params, dict(lr=0.01, **hyper))
    gen = torch.Generator().manual_seed(7)
    for step in range(2):
        set_grads([params], step, gen)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():  # a loadable state dict would change every tensor of the state
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.numel() and key != "step":
                value.add_(1.0)
            elif key == "step":
                entry[key] = value + 5
    for group in sd["param_groups"]:
        group["lr"] = 0.5
    mutate(sd)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert_unchanged(before, opt, params)
    # ... and the optimizer still works and still loads a good state dict.
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    set_grads([params], 2, gen)
    opt.step()


@pytest.mark.parametrize("bad", [None, [], {"state": {}}, {"param_groups": []}, {"state": [], "param_groups": []}])
def test_malformed_state_dict(bad):
    params = make_params([(3,)], seed=8)
    opt = pyco.optim.Adam(params)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="state_dict must be a dict with 'state'"):
        opt.load_state_dict(bad)
    assert_unchanged(before, opt, params)
