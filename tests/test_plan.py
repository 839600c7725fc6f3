"""The launch plan (pyco._C.Plan, pyco.optim._door): a steady step is planned, and every change between
steps that could make a cached record wrong sends the step back to Python, which either re-plans (and
gives torch's result) or refuses with nothing changed."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import TOL, assert_state_match, clone_params, make_params, set_grads

import pyco
from pyco._ext import _C

KINDS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01)),
]
IDS = ["sgd", "momentum", "adam", "amsgrad", "adamw"]


class Pair:
    """pyco's and torch's optimizer over equal parameters, stepped on the same gradients."""

    def __init__(self, kind, hyper, shapes=((5, 3), (7,), (2, 2, 2)), dtype=torch.float64, layout=None):
        self.ours = make_params(shapes, dtype, layout=layout)
        self.theirs = clone_params(self.ours)
        self.opt = getattr(pyco.optim, kind)(self.ours, **hyper)
        self.ref = getattr(torch.optim, kind)(self.theirs, foreach=False, **hyper)
        self.gen = torch.Generator().manual_seed(1)
        self.steps = 0

    def step(self, n=1):
        for _ in range(n):
            set_grads([self.ours, self.theirs], self.steps, self.gen)
            self.opt.step()
            self.ref.step()
            self.steps += 1

    def check(self):
        rtol, atol = TOL[self.ours[0].dtype]
        assert_state_match(self.opt, self.ours, self.ref, self.theirs, rtol, atol)

    @property
    def launches(self):
        return dict(self.opt._launches)


@pytest.mark.parametrize("kind, hyper", KINDS, ids=IDS)
def test_steady_steps_are_planned_and_equal_torch(kind, hyper):
    pair = Pair(kind, hyper)
    pair.step(6)
    pair.check()
    assert pair.launches == {"prepared": 1, "planned": 5}


def replace_data(pair, shape_same=True):
    p, q = pair.ours[0], pair.theirs[0]
    new = torch.randn(p.shape if shape_same else (p.numel() + 3,), dtype=p.dtype)
    with torch.no_grad():
        p.data = new.clone()
        q.data = new.clone()


def edit_in_place(pair):
    with torch.no_grad():
        pair.ours[1].mul_(0.5)
        pair.theirs[1].mul_(0.5)


def replace_state(pair):
    key = next(k for k in ("momentum_buffer", "exp_avg") if k in pair.opt.state[pair.ours[2]])
    value = torch.randn_like(pair.ours[2])
    pair.opt.state[pair.ours[2]][key] = value.clone()
    pair.ref.state[pair.theirs[2]][key] = value.clone()


def drop_grad(pair):
    pair.ours[1].grad = None
    pair.theirs[1].grad = None


def lr_schedule(pair):
    for opt in (pair.opt, pair.ref):
        opt.param_groups[0]["lr"] *= 0.5


EDITS = [
    (replace_data, True),        # p.data swapped: another address, the plan is rebuilt
    (edit_in_place, False),      # an in-place op moves the version counter: looked at again, still valid
    (replace_state, True),       # a state tensor replaced by another object
    (lr_schedule, False),        # hyper-parameters are read at every step
]
CHANGES = [(kind, hyper, edit, replans) for kind, hyper in KINDS for edit, replans in EDITS
           if not (edit is replace_state and kind == "SGD" and not hyper.get("momentum"))]  # plain SGD: no state


@pytest.mark.parametrize("kind, hyper, edit, replans", CHANGES,
                         ids=[f"{kind}-{hyper}-{edit.__name__}" for kind, hyper, edit, _ in CHANGES])
def test_changes_between_steps(kind, hyper, edit, replans):
    pair = Pair(kind, hyper)
    pair.step(2)
    edit(pair)
    before = pair.launches
    pair.step(3)
    pair.check()
    after = pair.launches
    assert after["prepared"] - before["prepared"] == (1 if replans else 0)
    assert after["planned"] - before["planned"] == (2 if replans else 3)


@pytest.mark.parametrize("kind, hyper", KINDS, ids=IDS)
def test_a_gradient_that_comes_and_goes(kind, hyper):
    pair = Pair(kind, hyper)
    pair.step(2)
    ours, theirs, gen = pair.ours, pair.theirs, pair.gen
    for step in range(4):  # parameter 1 has a gradient every other step
        set_grads([ours, theirs], 100 + step, gen, has_grad=lambda s, i: i != 1 or step % 2 == 0)
        pair.opt.step()
        pair.ref.step()
    pair.check()


@pytest.mark.parametrize("kind, hyper", KINDS, ids=IDS)
def test_param_groups_edited_in_place(kind, hyper):
    pair = Pair(kind, hyper)
    pair.step(2)
    for opt, params in ((pair.opt, pair.ours), (pair.ref, pair.theirs)):
        del opt.param_groups[0]["params"][1]  # params[1] is no longer in the optimizer
    pair.step(2)
    for opt, params in ((pair.opt, pair.ours), (pair.ref, pair.theirs)):
        opt.param_groups[0]["params"].append(params[1])
    pair.step(2)
    pair.check()


def test_a_grown_parameter_is_refused_with_nothing_changed():
    pair = Pair("Adam", dict(lr=0.01))
    pair.step(2)
    p = pair.ours[0]
    before = {k: v.clone() for k, v in pair.opt.state[p].items()}
    with torch.no_grad():
        p.data = torch.zeros(4_000_000, dtype=p.dtype)
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"param 0 of group 0.*state 'exp_avg' has shape \[5, 3\]"):
        pair.opt.step()
    assert all(torch.equal(before[k], v) for k, v in pair.opt.state[p].items())
    assert torch.equal(p, torch.zeros_like(p))


def test_a_state_tensor_resized_in_place_is_seen():
    pair = Pair("SGD", dict(lr=0.1, momentum=0.9))
    pair.step(2)
    buf = pair.opt.state[pair.ours[0]]["momentum_buffer"]
    buf.resize_(4)  # same object, same address: only its version counter says it changed
    pair.ours[0].grad = torch.ones_like(pair.ours[0])
    with pytest.raises(RuntimeError, match=r"state 'momentum_buffer' has shape \[4\]"):
        pair.opt.step()


@pytest.mark.parametrize("kind, hyper", KINDS, ids=IDS)
def test_complex_and_transposed_parameters_are_planned(kind, hyper):
    for dtype, layout in ((torch.complex128, None), (torch.float64, lambda t: t.t() if t.dim() == 2 else t)):
        pair = Pair(kind, hyper, shapes=((4, 3), (6,)), dtype=dtype, layout=layout)
        pair.step(4)
        pair.check()
        assert pair.launches["planned"] == 3


def test_layouts_that_need_copies_are_prepared_every_step():
    pair = Pair("Adam", dict(lr=0.01), shapes=((6, 4),), layout=lambda t: t[:, ::2])  # not dense
    pair.step(3)
    pair.check()
    assert pair.launches == {"prepared": 3, "planned": 0}


def planned_sgd(params):
    """SGD with momentum over ``params`` after one step on gradients of ones: the optimizer, its plan for a full
    step and the param groups' lists that refresh takes."""
    opt = pyco.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, opt._plans[("all",)][0], [g["params"] for g in opt.param_groups]


def test_refresh_names_what_changed():
    params = make_params([(3,), (4,)])
    opt, plan, groups = planned_sgd(params)
    assert plan.refresh(groups, opt.state) is None
    params[1].grad.data = params[1].grad.float()  # .data skips the checks of the .grad setter
    assert "dtype changed" in plan.refresh(groups, opt.state)
    params[1].grad = torch.ones(4, dtype=torch.float64)[None].expand(2, 4)[0]  # a row of an expanded view
    assert plan.refresh(groups, opt.state) is None  # contiguous, 4 elements: fine
    params[1].grad = torch._neg_view(torch.randn(4, dtype=torch.float64))  # contiguous, negation bit set
    assert "negation bit" in plan.refresh(groups, opt.state)
    params[1].grad = None
    assert "no gradient now" in plan.refresh(groups, opt.state)
    params[1].grad = torch.ones(4, dtype=torch.float64)
    assert "changed" in plan.refresh([groups[0][:1]], opt.state)
    opt.state[params[0]]["momentum_buffer"] = torch.zeros(3, dtype=torch.float64)
    assert "replaced" in plan.refresh(groups, opt.state)


def test_refresh_reads_every_gradient_of_many_parameters():
    """refresh reads each gradient a few parameters before it checks it: a change is still named at its own
    index (the first parameter, inside and past the read-ahead, the last), and no gradient is leaked."""
    params = make_params([(i + 1,) for i in range(20)])
    opt, plan, groups = planned_sgd(params)
    counts = [sys.getrefcount(p.grad) for p in params]
    for k in (0, 2, 3, 10, 19):
        g = params[k].grad
        params[k].grad = None
        assert f"parameter {k} has no gradient now" in plan.refresh(groups, opt.state)
        params[k].grad = g
        g.data = g.float()
        assert f"gradient {k}: dtype changed" in plan.refresh(groups, opt.state)
        g.data = g.double()
        assert plan.refresh(groups, opt.state) is None
        plan.drop_held()
    del g
    assert [sys.getrefcount(p.grad) for p in params] == counts
    opt.step()
    assert opt._launches["planned"] == 1


def test_the_plan_keeps_the_memory_it_writes_alive():
    """A parameter whose .data is swapped after the plan was made: the old storage stays alive as long as
    the plan (so a launch racing with the swap writes memory that exists), and the next step re-plans."""
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = pyco.optim.SGD([p], lr=1.0)
    p.grad = torch.ones(1000)
    opt.step()
    plan = opt._plans[("all",)][0]
    old = p.untyped_storage()
    with torch.no_grad():
        p.data = torch.zeros(1000)
    assert "address changed" in plan.refresh([[p]], opt.state)
    assert old.data_ptr() != p.data_ptr()
    opt.step()
    assert torch.equal(p.detach(), torch.full((1000,), -1.0))


def test_many_small_tensors_statistics_are_deterministic_across_threads(threads):
    shapes = [(n,) for n in (1, 3, 64, 63, 65, 4097) * 40]
    results = []
    for count in (1, 2, 3):
        threads(count)
        params = make_params(shapes, torch.float32)
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        opt = pyco.optim.Adam(params, lr=0.01)
        opt.step()
        opt.step()
        results.append((torch.cat([p.detach().reshape(-1) for p in params]), opt.last_stats.values.clone()))
    for flat, stats in results[1:]:
        assert torch.equal(flat, results[0][0]) and torch.equal(stats, results[0][1])
    grads = torch.cat([p.grad.double().reshape(-1) for p in params])
    assert abs(results[0][1][0, 0].item() - float((grads ** 2).sum())) <= 1e-5 * float((grads ** 2).sum())


def test_plan_refuses_a_table_that_does_not_fit():
    p = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="whole records"):
        _C.Plan([[p]], [(p, 0, [])], b"12345678")


def test_step_blocks_launches_are_planned_per_set_of_blocks():
    params = make_params([(3,), (4,), (5,)])
    opt = pyco.optim.SGD(params, lr=0.1, momentum=0.9)
    blocks = pyco.blocks.Blocks([("a", params[:1]), ("b", params[1:])])
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(3):
        opt.step_blocks(blocks, ["a"])
        opt.step_blocks(blocks, ["b"])
    assert opt._launches == {"prepared": 2, "planned": 4}
    moved = params[2].detach().clone()
    del opt.param_groups[0]["params"][2]  # params[2], in block "b", is no longer the optimizer's
    with pytest.raises(ValueError, match=r"block 'b' holds a parameter of shape \[5\], which is not a parameter of "
                                         r"the optimizer"):
        opt.step_blocks(blocks, ["b"])
    assert torch.equal(params[2].detach(), moved)
    opt.step_blocks(pyco.blocks.Blocks([("a", params[:1]), ("b", params[1:2])]), ["b"])  # blocks that fit
    assert torch.equal(params[2].detach(), moved)
