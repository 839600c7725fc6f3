"""What the fuzz suite and the boundary regressions share: pyco's optimizer beside torch.optim's on twin
parameters, the property every step must have (agree with torch.optim, or raise and change nothing), the odd
tensors the kernels must cope with, and a child process for the cases that could crash the interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import torch
from conftest import TOL, assert_close_report, random_tensor, snapshot, tensors_equal

import pyco

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

KINDS = ("SGD", "Adam", "AdamW")

# (rtol, atol) per parameter dtype. bfloat16/float16: torch rounds after every operation, pyco once per
# element, so the two differ by a few units in the last place (bfloat16 has 8 significant bits).
TOLERANCE = {**TOL, torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def twin(p: torch.Tensor) -> torch.nn.Parameter:
    """Same values; same strides where p is dense (a strided view becomes a contiguous copy)."""
    return torch.nn.Parameter(p.detach().clone())


def pair(kind: str, groups):
    """pyco's and torch's (for-loop implementation) optimizer ``kind`` over ``groups`` [(hyper, params)] and
    over twins of the same parameters: (ours, our params, theirs, their params)."""
    ours = [p for _, params in groups for p in params]
    theirs = [twin(p) for p in ours]
    it = iter(theirs)
    their_groups = [{**hyper, "params": [next(it) for _ in params]} for hyper, params in groups]
    our_groups = [{**hyper, "params": list(params)} for hyper, params in groups]
    opt_ours = getattr(pyco.optim, kind)(our_groups)
    opt_theirs = getattr(torch.optim, kind)(their_groups, foreach=False)
    return opt_ours, ours, opt_theirs, theirs


def difference(x, y, path: str = "") -> str | None:
    """Where two snapshots (conftest.snapshot) differ, or None: tensors bitwise whatever their layout (the odd
    state tensors of these suites: strided, meta), dicts, lists and plain values."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return path
        if (x.dtype, x.shape, x.device, x.layout) != (y.dtype, y.shape, y.device, y.layout):
            return path
        if x.is_meta:  # no values to compare
            return None
        dense = [t.clone(memory_format=torch.contiguous_format) for t in (x, y)]
        return None if tensors_equal(*dense) else path
    if isinstance(x, dict) and isinstance(y, dict):
        if x.keys() != y.keys():
            return f"{path} (keys {sorted(map(str, x))} -> {sorted(map(str, y))})"
        return next((d for k in x if (d := difference(x[k], y[k], f"{path}[{k!r}]")) is not None), None)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        if len(x) != len(y):
            return f"{path} (length {len(x)} -> {len(y)})"
        return next((d for i, (a, b) in enumerate(zip(x, y)) if (d := difference(a, b, f"{path}[{i}]")) is not None),
                    None)
    return None if x == y or (x != x and y != y) else path


def assert_snapshot_unchanged(before: dict, opt, params) -> None:
    """conftest.assert_unchanged for these suites' state tensors, which conftest.tensors_equal cannot compare
    (meta tensors, tensors whose last stride is not 1): the whole snapshot, bitwise."""
    where = difference(before, snapshot(opt, params))
    assert where is None, f"changed by a step that raised: {where}"


def may_refuse(opt, params) -> bool:
    """Whether pyco may refuse, as documented, a step that torch.optim takes: a state tensor of a parameter about
    to be updated has another dtype (torch may promote), shape (torch may broadcast) or device (torch takes a
    0-dim CPU tensor with any other) than the parameter."""
    return any(key != "step" and isinstance(value, torch.Tensor)
               and (value.dtype, value.shape, value.device) != (p.dtype, p.shape, p.device)
               for p in params if p.grad is not None for key, value in opt.state.get(p, {}).items())


def tolerance(dtypes) -> tuple[float, float]:
    """The loosest (rtol, atol) of ``dtypes`` (a parameter that was float16 once keeps float16's errors)."""
    return max(TOLERANCE[d][0] for d in dtypes), max(TOLERANCE[d][1] for d in dtypes)


def assert_agree(opt_ours, ours, opt_theirs, theirs, history=None) -> None:
    """Parameters, state keys, state tensors and step counts of the two optimizers agree (within the tolerance
    of each parameter's dtype, or of the dtypes in ``history[i]``; the step counter by value, whatever its
    dtype)."""
    for i, (p, q) in enumerate(zip(ours, theirs)):
        rtol, atol = tolerance([q.dtype, *(() if history is None else history[i])])
        assert_close_report(p.detach(), q.detach(), rtol, atol, f"param {i}")
        s, t = opt_ours.state.get(p, {}), opt_theirs.state.get(q, {})
        assert set(s) == set(t), f"param {i}: state keys {sorted(s)} != torch's {sorted(t)}"
        for key in t:
            if key == "step":
                assert s[key].numel() == 1 and s[key].item() == t[key].item(), \
                    f"param {i}: step {s[key]!r} != torch's {t[key]!r}"
            else:
                assert_close_report(s[key], t[key], rtol, atol, f"param {i}: state {key!r}")


def step_both(opt_ours, ours, opt_theirs, theirs, history=None) -> str:
    """One step of each. pyco must agree with torch.optim, or raise and change nothing; when torch raises pyco
    must raise; pyco may refuse a step torch takes only for a documented reason (:func:`may_refuse`).
    Returns "agreed", "both raised" or "refused" (the optimizers must not be stepped further after a raise)."""
    allowed = may_refuse(opt_ours, ours)
    before = snapshot(opt_ours, ours)
    try:
        opt_theirs.step()
        theirs_error = None
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, pyco must raise too
        theirs_error = exc
    try:
        opt_ours.step()
    except Exception as exc:  # noqa: BLE001
        assert_snapshot_unchanged(before, opt_ours, ours)
        if theirs_error is not None:
            return "both raised"
        assert allowed, f"pyco raised {type(exc).__name__}: {exc}, but torch.optim took the step"
        return "refused"
    assert theirs_error is None, \
        f"torch.optim raised {type(theirs_error).__name__}: {theirs_error}, but pyco took the step"
    assert_agree(opt_ours, ours, opt_theirs, theirs, history)
    return "agreed"


def optimizer_with_grads(kind: str, shapes=((1000,),), dtype=torch.float32, *, steps: int = 1, seed: int = 0,
                         **hyper):
    """pyco's optimizer ``kind`` over fresh random parameters after ``steps`` steps (so that its state exists),
    each parameter holding a fresh random gradient: (optimizer, params). Same seed, same everything."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(random_tensor(shape, dtype, gen)) for shape in shapes]
    opt = getattr(pyco.optim, kind)(params, **hyper)

    def fresh_grads():
        for p in params:
            p.grad = random_tensor(p.shape, dtype, gen)

    for _ in range(steps):
        fresh_grads()
        opt.step()
    fresh_grads()
    return opt, params


# ---- gradients in the layouts a user can hand over -----------------------------------------------------------

def grad_values(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random gradient values; float16 ones at least 0.05 in magnitude, so that Adam's v = (1 - beta2) g^2
    stays clear of float16's subnormal range, where torch (rounding after every operation) and pyco (rounding
    once) differ by more than a few units in the last place."""
    g = random_tensor(shape, dtype, gen)
    return torch.where(g < 0, g - 0.05, g + 0.05) if dtype == torch.float16 else g


def odd_grad(p: torch.Tensor, how: str, gen: torch.Generator) -> torch.Tensor:
    """A gradient for p whose values are random and whose memory is unusual: ``expanded`` (stride 0, one value),
    ``negbit`` (contiguous with the negation bit set: memory holds -g), ``imag_of_conj`` (the imaginary part of a
    conjugated complex tensor: negation bit and stride 2; real dtypes), ``conj`` (conjugation bit; complex dtypes).
    ``dense``: the parameter's layout. The values a reader must see are ``g`` itself (g.resolve_neg() ...)."""
    if how == "expanded":
        return grad_values((), p.dtype, gen).expand(p.shape)
    if how == "imag_of_conj" and p.dtype in (torch.float32, torch.float64):
        wide = torch.complex64 if p.dtype == torch.float32 else torch.complex128
        return random_tensor(p.shape, wide, gen).conj().imag
    if how == "conj" and p.dtype.is_complex:
        return random_tensor(p.shape, p.dtype, gen).conj_physical().conj()
    if how in ("negbit", "imag_of_conj", "conj"):
        return torch._neg_view(-grad_values(p.shape, p.dtype, gen))  # the public ops make none contiguous
    g = torch.empty_like(p)
    g.copy_(grad_values(p.shape, p.dtype, gen))
    return g


def plain(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The values of g in an ordinary tensor with the layout of ``like`` (what torch.optim's twin receives)."""
    out = torch.empty_like(like)
    out.copy_(g)
    return out


# ---- cases that could crash the interpreter: a child process ------------------------------------------------

CHILD_PRELUDE = f"""
import sys
sys.path.insert(0, {TESTS_DIR!r})
import torch
import pyco
from _agreement import expect_refusal, optimizer_with_grads, pair, step_both
"""


def run_child(body: str, timeout: float = 180.0, env: dict | None = None, note=None) -> str:
    """Runs ``body`` (Python, indented freely) in a fresh interpreter after CHILD_PRELUDE, warnings as errors
    (as pytest runs this suite), and returns its standard output. A crash (signal, sanitizer abort), an
    exception or a timeout fails, with the child's output and ``note()`` (more context) in the message."""
    __tracebackhide__ = True  # pytest: the failure is the child's, shown in the message
    code = CHILD_PRELUDE + textwrap.dedent(body)
    more = lambda: "" if note is None else f"\n{note()}"  # noqa: E731
    try:
        done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                              timeout=timeout, cwd=TESTS_DIR, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:  # its output comes as bytes, text=True or not
        so_far = [out.decode(errors="replace") if isinstance(out, bytes) else out or ""
                  for out in (exc.stdout, exc.stderr)]
        raise AssertionError(f"child timed out after {timeout:g} s (deadlock?){more()}\n--- output so far\n"
                             f"{so_far[0]}\n{so_far[1][-12000:]}") from None
    if done.returncode < 0:
        how = f"crashed with {signal.Signals(-done.returncode).name}"
    else:
        how = f"exited with code {done.returncode}"
    assert done.returncode == 0, \
        f"child {how}{more()}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-12000:]}"
    return done.stdout


def expect_refusal(opt, params, exc_type, *words) -> str:
    """Steps ``opt``, which must raise ``exc_type`` with every one of ``words`` in its message and change
    nothing (bitwise); returns a line for the child's output."""
    before = snapshot(opt, params)
    try:
        opt.step()
    except exc_type as exc:
        assert_snapshot_unchanged(before, opt, params)
        missing = [w for w in words if w not in str(exc)]
        assert not missing, f"{type(exc).__name__} message {str(exc)!r} does not name {missing}"
        return f"RAISED {type(exc).__name__}"
    raise AssertionError(f"{type(opt).__name__}.step() did not raise {exc_type.__name__}")
