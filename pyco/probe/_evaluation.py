"""One fixed batch, evaluated again and again at shifted parameters: the probe's ground rules.

Inside ``with FixedBatch(loss_fn, params, dtype) as batch``, every ``batch.loss(...)``:

- starts from the random-number state the block was entered with (torch's CPU generator and, when CUDA is
  initialised, every CUDA generator), so dropout draws the same masks each time;
- starts from the same module buffers (batch-norm running statistics and counters). The modules are found
  by a global forward pre-hook the first time each one runs, before it can change its buffers;
- runs ``scaled_dot_product_attention`` on its math backend, since the fused CPU and GPU kernels have no
  double backward;
- with ``dtype`` (say ``torch.float64``), runs the model in that dtype: the given parameters, every parameter
  and floating-point buffer of the modules that run, and the floating-point tensors passed positionally to
  a module's forward are cast. Other tensors (targets, constants made inside ``forward``) keep their dtype
  and meet the cast ones through torch's type promotion.

On exit every parameter points at its original storage again, buffers hold their original values (in the
original tensors) and the random-number state is the one on entry: the model is bitwise as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def rng_state() -> tuple:
    """torch's random-number state: the CPU generator's and, if CUDA is initialised, every device's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class BufferLog:
    """Module buffers as they were before their module first ran, found by a global forward pre-hook.

    ``entries`` holds (module, name, tensor, saved copy) in the order the modules ran. ``on_first`` (if
    given) is called with each newly seen module after its buffers were saved."""

    def __init__(self, on_first: Callable[[nn.Module], None] | None = None):
        self.entries: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self.modules: list[nn.Module] = []
        self._seen: set[int] = set()
        self._on_first = on_first
        self._handle = None

    def hook(self, module: nn.Module, args):
        if id(module) not in self._seen:
            self._seen.add(id(module))
            self.modules.append(module)
            for name, buf in module._buffers.items():
                if buf is not None:
                    self.entries.append((module, name, buf, buf.detach().clone()))
            if self._on_first is not None:
                self._on_first(module)
        return None

    def __enter__(self) -> "BufferLog":
        self._handle = nn.modules.module.register_module_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def restore(self) -> None:
        """Every logged buffer back in its module, holding its saved values (bitwise)."""
        with torch.no_grad():
            for module, name, buf, saved in self.entries:
                module._buffers[name] = buf
                buf.copy_(saved)

    def current(self) -> list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
        """(module, name, tensor, copy of its values) for every logged buffer as it is now."""
        return [(m, n, m._buffers[n], m._buffers[n].detach().clone()) for m, n, _, _ in self.entries]


def _cast_args(args, dtype: torch.dtype):
    def cast(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != dtype:
            return a.to(dtype)
        if isinstance(a, (tuple, list)):
            return type(a)(cast(x) for x in a)
        return a

    return cast(args)


class FixedBatch:
    """Evaluates ``loss_fn`` at shifts of ``params`` under the rules in the module docstring."""

    def __init__(self, loss_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor],
                 dtype: torch.dtype | None = None):
        self.loss_fn = loss_fn
        self.params = list(params)
        self.dtype = dtype
        self._original: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (param, its original .data)
        self._buffers = BufferLog(on_first=self._first_seen)
        self._stack = contextlib.ExitStack()

    # -- entering and leaving --------------------------------------------------------------------------
    def __enter__(self) -> "FixedBatch":
        self._rng = rng_state()
        self._stack.enter_context(self._buffers)
        if self.dtype is not None:
            for p in self.params:
                self._cast_param(p)
            self._stack.enter_context(self._input_cast())
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._stack.close()
        finally:
            for p, data in self._original.values():
                p.data = data
            self._buffers.restore()
            set_rng_state(self._rng)

    @contextlib.contextmanager
    def _input_cast(self):
        handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: _cast_args(args, self.dtype))
        try:
            yield
        finally:
            handle.remove()

    # -- dtype casts (the originals are kept and put back on exit) ----------------------------------------
    def _cast_param(self, p: torch.Tensor) -> None:
        if id(p) not in self._original and p.is_floating_point() and p.dtype != self.dtype:
            self._original[id(p)] = (p, p.data)
            p.data = p.data.to(self.dtype)

    def _first_seen(self, module: nn.Module) -> None:
        if isinstance(module, nn.parallel.DistributedDataParallel) and "forward" not in module.__dict__:
            raise TypeError(
                "the probe's loss_fn calls a DistributedDataParallel model, whose reducer cannot differentiate "
                "twice; call its module (ddp.module) in loss_fn, and pass process_group= for the global batch"
            )
        if self.dtype is not None:
            self._cast_module(module)

    def _cast_module(self, module: nn.Module) -> None:
        for p in module._parameters.values():
            if p is not None:
                self._cast_param(p)
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(self.dtype)

    def _reset_buffers(self) -> None:
        if self.dtype is None:
            self._buffers.restore()
            return
        with torch.no_grad():
            for module, name, _, saved in self._buffers.entries:
                module._buffers[name] = saved.to(self.dtype) if saved.is_floating_point() else saved.clone()

    # -- evaluation -----------------------------------------------------------------------------------
    def working(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor p holds during evaluations (its cast copy under ``dtype``)."""
        return p.data

    def loss(self, shifts: dict[int, torch.Tensor] | None = None, *, grad: bool = False) -> torch.Tensor:
        """loss_fn() with ``params[i]`` moved by ``shifts[i]``, as a 0-dim tensor (attached to the graph
        when ``grad``)."""
        set_rng_state(self._rng)
        self._reset_buffers()
        base = {}
        try:
            for i, d in (shifts or {}).items():
                p = self.params[i]
                base[i] = p.data
                p.data = p.data + d
            with torch.set_grad_enabled(grad), sdpa_kernel([SDPBackend.MATH]):
                out = self.loss_fn()
        finally:
            for i, data in base.items():
                self.params[i].data = data
        return check_scalar(out)


def check_scalar(out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"loss_fn must return the loss as a scalar tensor, got {type(out).__name__}")
    if out.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar loss, got a tensor of shape {list(out.shape)}; reduce it "
            f"(loss.mean() or loss.sum()) inside loss_fn"
        )
    if not out.is_floating_point():
        raise TypeError(f"loss_fn must return a floating-point loss, got {out.dtype}")
    return out.reshape(())
