"""Record one real optimizer step and decompose its loss change at the point it started from."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyco.blocks import Blocks, by_group
from pyco.probe._evaluation import BufferLog, rng_state, set_rng_state
from pyco.probe.cross_terms import bypassing_ddp, check_options, check_params, cross_terms
from pyco.probe.report import CrossTerms


def record(optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor], blocks=None, *,
           mode: str = "full", dtype: torch.dtype | None = None, alone: bool = True,
           max_batch: int | None = None, process_group=None) -> CrossTerms:
    """Takes one step ``optimizer.step(closure)`` and returns the :func:`cross_terms` decomposition of
    the step it took, Δ = θ_after − θ_before, at θ_before on the closure's batch.

    Everything that can be checked before the step is (the options, the blocks, the parameters): bad
    arguments raise with nothing changed. Afterwards the parameters, gradients, optimizer state,
    random-number state and module buffers (batch-norm statistics) are bitwise what the plain
    ``optimizer.step(closure)`` leaves: the step runs
    first, exactly as without the probe; then the pre-step parameters, buffers and random state are put
    back for the probe, and the post-step ones restored after it.

    The probe's loss is what the closure calls ``backward`` on: the closure is re-run with
    ``torch.autograd.backward`` (which ``Tensor.backward`` calls) intercepted, so it builds the graph and
    calls no backward; several backward calls (micro-batches) add up, as their gradients would. Works with
    any optimizer and any wrapper (Gauss–Seidel, block-coordinate) that takes a closure. The real step runs
    attention on whatever ``scaled_dot_product_attention`` backend the caller selected; the probe's
    re-evaluations run it on the math backend (``torch.nn.attention.sdpa_kernel``), since the flash and
    memory-efficient kernels have no double backward (see :func:`cross_terms`).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (or wrapper with ``step(closure)`` and ``param_groups``).
        closure: zero-argument callable that clears the gradients, computes the loss on a fixed batch,
            calls ``backward`` and returns the loss, as for ``torch.optim.LBFGS``.
        blocks: the partition to report on (default: one block per param group, ``by_group``); it must
            cover every parameter of the optimizer exactly once.
        mode, dtype, alone, max_batch: as for :func:`cross_terms`.
        process_group: as for :func:`cross_terms`: the report for the global batch. Under
            ``DistributedDataParallel`` the closure may call the DDP model: the real step goes through it
            (gradients all-reduced by DDP), and the probe's re-evaluations call its ``module`` directly.

    Example::

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        report = pyco.probe.record(opt, closure, pyco.blocks.by_module(model))
        print(report.table())
    """
    return _record(optimizer, closure, blocks, mode=mode, dtype=dtype, alone=alone, max_batch=max_batch,
                   process_group=process_group)[0]


def _record(optimizer, closure, blocks, *, mode, dtype, alone, max_batch, process_group):
    """:func:`record`, returning (the report, what ``optimizer.step(closure)`` returned)."""
    check_options(mode, dtype, alone, max_batch, process_group)  # everything checked before the real step
    if not (hasattr(optimizer, "param_groups") and callable(getattr(optimizer, "step", None))):
        raise TypeError(f"record: optimizer must be a torch.optim.Optimizer (or an order wrapping one), got "
                        f"{type(optimizer).__name__}")
    if not callable(closure):
        raise TypeError(f"record: closure must be callable (it computes the loss and calls backward), got "
                        f"{type(closure).__name__}")
    blocks = by_group(optimizer) if blocks is None else Blocks.of(blocks)
    blocks.check_covers([p for g in optimizer.param_groups for p in g["params"]])
    check_params(blocks)
    params = blocks.params()
    before_rng = rng_state()
    before = [p.detach().clone() for p in params]
    with BufferLog() as buffers:
        returned = optimizer.step(closure)
    update = [p.detach() - b for p, b in zip(params, before)]
    after = _State.capture(params, buffers)
    try:
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        buffers.restore()
        set_rng_state(before_rng)
        with bypassing_ddp(buffers.modules):
            report = cross_terms(CapturedLoss(closure), blocks, update, mode=mode, dtype=dtype, alone=alone,
                                 max_batch=max_batch, process_group=process_group)
            return report, returned
    finally:
        after.restore()


class _State:
    """Parameters, gradients, module buffers and random state as the real step left them."""

    @classmethod
    def capture(cls, params, buffers: BufferLog) -> "_State":
        self = cls()
        self.params = [(p, p.detach().clone()) for p in params]
        owned = {id(p): p for m in buffers.modules for p in m.parameters(recurse=False)}
        owned.update({id(p): p for p in params})
        self.grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in owned.values()]
        self.buffers = buffers.current()
        self.rng = rng_state()
        return self

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in self.params:
                p.copy_(saved)
            for p, grad, saved in self.grads:
                p.grad = grad
                if grad is not None:
                    grad.copy_(saved)
            for module, name, buf, saved in self.buffers:
                module._buffers[name] = buf
                buf.copy_(saved)
        set_rng_state(self.rng)


class CapturedLoss:
    """A loss function made from a closure: runs it with every ``torch.autograd.backward`` call captured
    instead of run, and returns the sum of the captured losses (Σ (t·gradient).sum() for a call with an
    explicit ``gradient``)."""

    def __init__(self, closure: Callable[[], torch.Tensor]):
        self.closure = closure

    def __call__(self) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def capture(tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None,
                    inputs=None):
            if inputs is not None:
                raise ValueError("pyco.probe.record: the closure calls backward(inputs=...); the probe needs the "
                                 "gradient with respect to every parameter: drop inputs=")
            tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
            grads = grad_tensors if grad_tensors is not None else grad_variables
            grads = [grads] if isinstance(grads, torch.Tensor) or grads is None else list(grads)
            grads = grads * len(tensors) if len(grads) == 1 else grads
            for t, g in zip(tensors, grads):
                captured.append(t if g is None else (t * g).sum())

        real = torch.autograd.backward
        torch.autograd.backward = capture
        try:
            self.closure()
        finally:
            torch.autograd.backward = real
        if not captured:
            raise ValueError("pyco.probe.record: the closure called no backward; it must compute the loss and "
                             "call loss.backward(), as for torch.optim.LBFGS")
        return captured[0] if len(captured) == 1 else torch.stack([c.reshape(()) for c in captured]).sum()
