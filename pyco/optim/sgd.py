"""SGD with momentum, torch.optim.SGD's semantics, one fused launch per step."""

from __future__ import annotations

import torch

from pyco._ext import _C
from pyco._kernels import STEP_FIELD
from pyco.optim import _compiled
from pyco.optim._door import check_state_tensor_for_step, kept_state
from pyco.optim._fused import FusedOptimizer, check_number, check_state_tensor


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent (optionally with momentum), a drop-in for :class:`torch.optim.SGD`.

    .. math::
        d_t = \pm g_t + \lambda\theta_{t-1}, \quad
        b_t = \begin{cases} d_t & t = 1 \\ \mu b_{t-1} + (1-\tau) d_t & t > 1 \end{cases}, \quad
        \theta_t = \theta_{t-1} - \gamma\,(d_t + \mu b_t \text{ if nesterov else } b_t)

    Args:
        params: parameters or param groups (as torch.optim).
        lr (float or 1-element Tensor, default 1e-3), momentum (default 0), dampening (default 0),
        weight_decay (default 0), nesterov (default False), maximize (default False): as torch.optim.SGD.
        foreach, fused: accepted for compatibility; pyco always runs its fused kernel.
        differentiable: must be False.
        blocks: named blocks of parameters for the statistics (a dict name -> tensors); default one block
            per param group.
        stats (default True): compute ``last_stats`` (Σg², Σu², Σg·u, Σθ² per block) in the update's pass.
        nonfinite ("apply", "skip" or "skip-block", default "apply"): "apply" updates with whatever the gradients hold,
            as torch.optim does (``last_stats.finite`` tells); "skip" checks first and, if any gradient is
            inf or NaN, changes nothing and counts ``skipped_steps``. On CUDA the check is a kernel and the
            decision stays on the device (no synchronization): ``skipped_steps`` does not count it and
            ``last_stats.skipped`` is a 0-dim bool tensor on the device, as under GradScaler.
            "skip-block" (CPU parameters) skips only the blocks whose gradients hold an inf or NaN and
            updates the others; ``last_stats.skipped_blocks`` names the skipped ones (their rows are zero).

    CUDA parameters are updated by pyco's CUDA kernels (when built: ``pyco.info()["cuda_kernels"]``), one
    launch per device on torch's current stream, without host synchronization; ``last_stats.values`` then
    lives on the device (reading it waits for the step).

    Example::

        opt = pyco.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.last_stats.grad_sq   # float64 tensor, one entry per block
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, blocks=None, stats=True,
                 nonfinite="apply"):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        self._check_group(defaults)
        super().__init__(params, defaults, blocks=blocks, stats=stats, nonfinite=nonfinite)
        # CUDA parameters: a device int32 per momentum buffer, 0 until a step that used the buffer was applied
        # (skips are decided on the device, so the host cannot know whether a new buffer was initialized).
        self._momentum_initialized: dict[torch.Tensor, torch.Tensor] = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._momentum_initialized = {}  # buffers that exist count as initialized
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    @staticmethod
    def _check_group(group: dict) -> None:
        check_number("learning rate", group["lr"])
        momentum = check_number("momentum value", group["momentum"])
        dampening = check_number("dampening value", group["dampening"], low=-float("inf"))
        check_number("weight_decay value", group["weight_decay"])
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    @staticmethod
    def _hyper(group: dict):
        return _C.SgdHyper(lr=float(group["lr"]), momentum=float(group["momentum"]),
                           dampening=float(group["dampening"]), weight_decay=float(group["weight_decay"]),
                           nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))

    _kernel = staticmethod(_C.sgd_step)
    _rule = "sgd"  # pyco._C_cuda's sgd_* functions and the custom operator pyco::sgd_step

    # The compiled step's view of a group (pyco.optim._compiled): hyper-parameters, flags and state names
    _HYPER_NAMES = ("lr", "momentum", "dampening", "weight_decay")
    _HYPER_FLAGS = ("nesterov", "maximize")
    _STATE_NAMES = ("momentum_buffer",)

    @staticmethod
    def _hyper_values(group: dict) -> tuple[tuple, tuple]:
        return ((group["lr"], group["momentum"], group["dampening"], group["weight_decay"]),
                (group["nesterov"], group["maximize"]))

    @staticmethod
    def _group_from_values(values, flags) -> dict:
        lr, momentum, dampening, weight_decay = values
        return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=bool(flags[0]), maximize=bool(flags[1]))

    @staticmethod
    def _slots(group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _states(self, p: torch.Tensor, group: dict, pending: dict, where: str):
        """The state tensors of p's record, checked; a missing buffer is created in ``pending``."""
        if group["momentum"] == 0:
            return (), None, 0, []
        entry = self.state.get(p)
        buf = None if entry is None else entry.get("momentum_buffer")
        flags = 0
        fresh = buf is None
        if fresh:
            # The kernel sets a fresh buffer to d, as torch does with grad.clone() on the first step.
            buf = torch.zeros_like(p, memory_format=torch.preserve_format)
            pending[p] = {"momentum_buffer": buf}
            flags = _C.FLAG_FRESH_MOMENTUM
        else:
            check_state_tensor_for_step(type(self).__name__, where, "momentum_buffer", p, buf)
        kept = kept_state(p, [("momentum_buffer", buf)])
        if not self._uses_cuda_kernels(p):
            return (buf,), None, flags, kept
        # On CUDA "fresh" lives on the device: the kernel reads the flag and sets it when the step is applied.
        initialized = self._momentum_initialized.get(p)
        if fresh or initialized is None:
            initialized = torch.full((), 0 if fresh else 1, dtype=torch.int32, device=p.device)
            self._momentum_initialized[p] = initialized
        return (buf,), initialized, _C.FLAG_MOMENTUM_INIT, kept + [(STEP_FIELD, None, initialized)]

    def state_dict(self) -> dict:
        """torch's layout. A CUDA momentum buffer that no applied step has initialized yet (every step since
        it was made was skipped on the device) is left out, as torch would have none; reading the flags
        waits for the device."""
        state = super().state_dict()
        if not self._momentum_initialized:
            return state
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        params = [p for p in self._momentum_initialized if id(p) in index]
        flags = torch.stack([self._momentum_initialized[p].cpu() for p in params]) if params else []
        for p, flag in zip(params, flags):
            entry = state["state"].get(index[id(p)])
            if entry is not None and int(flag) == 0 and "momentum_buffer" in entry:
                state["state"][index[id(p)]] = {k: v for k, v in entry.items() if k != "momentum_buffer"}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._momentum_initialized = {}  # loaded buffers are initialized ones

    @staticmethod
    def _check_state_entry(where: str, p: torch.Tensor, entry: dict, group: dict) -> None:
        buf = entry.get("momentum_buffer")
        if buf is not None:
            check_state_tensor(where, "momentum_buffer", p, buf)


_compiled.RULES[SGD._rule] = SGD
