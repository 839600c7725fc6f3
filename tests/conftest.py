"""Shared helpers of pyco's test-suite: seeded parameters and gradients, side-by-side runs of two optimizers,
and comparisons that report the worst mismatch."""

from __future__ import annotations

import copy

import pytest
import torch

# (rtol, atol) for comparing trajectories of the same arithmetic done in a different order.
TOL = {
    torch.float64: (1e-12, 1e-14),
    torch.complex128: (1e-12, 1e-14),
    torch.float32: (1e-6, 1e-5),
    torch.complex64: (1e-6, 1e-5),
}

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def random_tensor(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Standard normal values drawn in double precision, then cast: same numbers whatever the dtype."""
    wide = torch.complex128 if dtype.is_complex else torch.float64
    return torch.randn(shape, generator=gen, dtype=wide).to(dtype)


def make_params(shapes, dtype=torch.float64, seed: int = 0, layout=None) -> list[torch.nn.Parameter]:
    """Parameters of the given shapes with seeded values. ``layout(t)`` may return a view of t (a transposed
    or strided view) that becomes the parameter itself, strides included."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        t = random_tensor(shape, dtype, gen)
        params.append(torch.nn.Parameter(layout(t) if layout is not None else t))
    return params


def clone_params(params) -> list[torch.nn.Parameter]:
    """Same values and (for dense tensors) same strides."""
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grad_like(p: torch.Tensor, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A random gradient with the parameter's dtype and (where it is dense) its memory layout."""
    g = torch.empty_like(p)
    g.copy_(random_tensor(p.shape, p.dtype, gen) * scale)
    return g


def set_grads(param_lists, step: int, gen: torch.Generator, has_grad=None, scale: float = 1.0) -> None:
    """Gives every list in ``param_lists`` the same fresh gradients. ``has_grad(step, i)`` False leaves
    parameter i without a gradient (None) for that step."""
    first = param_lists[0]
    for i, p in enumerate(first):
        if has_grad is not None and not has_grad(step, i):
            for params in param_lists:
                params[i].grad = None
            continue
        g = grad_like(p, gen, scale)
        for params in param_lists:
            params[i].grad = g.clone()


def run_side_by_side(opt_a, params_a, opt_b, params_b, steps: int, seed: int = 0, has_grad=None,
                     each_step=None, scale: float = 1.0) -> None:
    """Runs ``steps`` steps of both optimizers on the same fresh random gradients.
    ``each_step(step)`` runs after both optimizers stepped (schedulers, checks)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    for step in range(steps):
        set_grads([params_a, params_b], step, gen, has_grad, scale)
        opt_a.step()
        opt_b.step()
        if each_step is not None:
            each_step(step)


def run_with_float64_twin(kind: str, hyper: dict, opt_ours, ours, opt_theirs, theirs, steps: int, seed: int):
    """Steps pyco's and torch's optimizers on the same random gradients, and beside them torch's for-loop
    ``kind`` on float64 copies of ``ours`` fed the same (rounded) gradients; returns the float64 copies."""
    wide = [torch.nn.Parameter(p.detach().double()) for p in ours]
    opt_wide = getattr(torch.optim, kind)(wide, foreach=False, **hyper)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        set_grads([ours, theirs], step, gen)
        for w, p in zip(wide, ours):
            w.grad = p.grad.double()
        for opt in (opt_ours, opt_theirs, opt_wide):
            opt.step()
    return wide


def assert_close_report(actual, expected, rtol: float, atol: float, what: str = "", equal_nan=False) -> None:
    """torch.testing.assert_close, with the worst element (index, values, error, allowance) in the message."""
    if not isinstance(actual, torch.Tensor):
        actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan)
    except AssertionError:
        a = actual.detach().reshape(-1)
        e = expected.detach().reshape(-1)
        if a.is_complex():
            a, e = torch.view_as_real(a).reshape(-1), torch.view_as_real(e).reshape(-1)
        a, e = a.double(), e.double()
        err = (a - e).abs()
        excess = err - (atol + rtol * e.abs())
        excess = torch.where(torch.isnan(excess), torch.full_like(excess, float("inf")), excess)
        i = int(excess.argmax())
        raise AssertionError(
            f"{what}: worst mismatch at flat index {i} of {a.numel()}: actual {a[i].item()!r}, expected "
            f"{e[i].item()!r}, |diff| {err[i].item():.3e} > atol {atol:g} + rtol {rtol:g}*|expected| "
            f"({(atol + rtol * e[i].abs()).item():.3e}); {int((excess > 0).sum())} elements out of tolerance"
        ) from None


def assert_state_match(opt_a, params_a, opt_b, params_b, rtol: float, atol: float, check_step_dtype=True):
    """Parameters and optimizer state of two optimizers over corresponding parameter lists."""
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_close_report(pa.detach(), pb.detach(), rtol, atol, f"param {i}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sb:
            va, vb = sa[key], sb[key]
            if key == "step":
                assert va.item() == vb.item(), f"param {i}: step {va.item()} != {vb.item()}"
                if check_step_dtype:
                    assert va.dtype == vb.dtype and va.dim() == vb.dim() == 0, f"param {i}: step {va!r} vs {vb!r}"
            else:
                assert_close_report(va, vb, rtol, atol, f"param {i}: state {key!r}")


def snapshot(opt, params) -> dict:
    """A deep copy of everything an optimizer step or a failed call could change."""
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "state": {} if opt is None else {i: copy.deepcopy(dict(opt.state[p]))
                                         for i, p in enumerate(params) if p in opt.state},
        "param_groups": None if opt is None else [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "n_groups": None if opt is None else len(opt.param_groups),
        "group_params": None if opt is None else [[id(p) for p in g["params"]] for g in opt.param_groups],
        "skipped_steps": getattr(opt, "skipped_steps", None),
    }


def tensors_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bitwise equality: NaN equals the same NaN, 0.0 differs from -0.0 (sparse tensors compared through
    their dense form)."""
    if x.layout != y.layout or x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.is_sparse:
        x, y = x.to_dense(), y.to_dense()
    return torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def assert_unchanged(before: dict, opt, params, *, grads=True, skipped=0) -> None:
    """Bitwise: parameters, gradients, state tensors and param_groups are as in ``before``; skipped_steps
    grew by ``skipped``."""
    after = snapshot(opt, params)
    for i, (x, y) in enumerate(zip(before["params"], after["params"])):
        assert tensors_equal(x, y), f"param {i} changed"
    if grads:
        for i, (x, y) in enumerate(zip(before["grads"], after["grads"])):
            assert (x is None) == (y is None) and (x is None or tensors_equal(x, y)), f"grad {i} changed"
    assert before["state"].keys() == after["state"].keys(), "optimizer state gained or lost entries"
    for i, entry in before["state"].items():
        assert entry.keys() == after["state"][i].keys(), f"state of param {i} gained or lost keys"
        for key, value in entry.items():
            other = after["state"][i][key]
            same = tensors_equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"state {key!r} of param {i} changed"
    assert before["n_groups"] == after["n_groups"], "param_groups changed length"
    assert before["group_params"] == after["group_params"], "param_groups hold different parameters"
    if before["skipped_steps"] is not None:
        assert after["skipped_steps"] == before["skipped_steps"] + skipped, "skipped_steps"
    for gb, ga in zip(before["param_groups"] or [], after["param_groups"] or []):
        assert gb.keys() == ga.keys(), "a param group gained or lost keys"
        for k in gb:
            same = (torch.equal(gb[k], ga[k]) if isinstance(gb[k], torch.Tensor) else gb[k] == ga[k]
                    or (gb[k] != gb[k] and ga[k] != ga[k]))
            assert same, f"param group entry {k!r} changed: {gb[k]!r} -> {ga[k]!r}"


@pytest.fixture
def threads():
    """Lets a test change torch's thread count; restores it afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)
