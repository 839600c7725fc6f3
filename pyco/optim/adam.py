"""Adam and AdamW, torch.optim's semantics, one fused launch per step."""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

from pyco._ext import _C
from pyco.optim import _compiled
from pyco.optim._door import check_state_tensor_for_step, kept_state
from pyco.optim._fused import FusedOptimizer, check_number, check_state_tensor

_STEP_DTYPES = (torch.float32, torch.float64)


class Adam(FusedOptimizer):
    r"""Adam, a drop-in for :class:`torch.optim.Adam` (and, with ``decoupled_weight_decay``, AdamW).

    .. math::
        d_t = \pm g_t\ (+\lambda\theta_{t-1}), \quad m_t = m_{t-1} + (1-\beta_1)(d_t - m_{t-1}), \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) d_t^2, \\
        \theta_t = \theta_{t-1}(1-\gamma\lambda)^{[\text{decoupled}]}
                   - \frac{\gamma}{1-\beta_1^t}\, \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon},
        \quad \hat v_t = \max(\hat v_{t-1}, v_t) \text{ if amsgrad else } v_t

    Args:
        params: parameters or param groups (as torch.optim).
        lr (float or 1-element Tensor, default 1e-3), betas (default (0.9, 0.999)), eps (default 1e-8),
        weight_decay (default 0), amsgrad (default False), maximize (default False),
        decoupled_weight_decay (default False): as torch.optim.Adam.
        foreach, fused: accepted for compatibility; pyco always runs its fused kernel.
        capturable (default False): on CUDA every pyco step is capturable in a CUDA graph (step counters
            live on the device and are advanced by the kernel, a tensor ``lr`` on the device is read by the
            kernel at every launch, GradScaler's scale and found_inf are applied on the device); True is
            accepted for CUDA parameters and refused for CPU ones. Capture after a few eager warm-up steps
            (state is created on the first), as torch's CUDA-graph documentation prescribes.
        differentiable: must be False.
        blocks, stats, nonfinite: see :class:`pyco.optim.SGD`.

    State per parameter, in torch's layout: ``step`` (scalar tensor: float32/float64 on the CPU for CPU
    parameters; float32 on the parameter's device for CUDA ones, as torch's fused layout), ``exp_avg``,
    ``exp_avg_sq`` and ``max_exp_avg_sq`` (amsgrad), so torch and pyco checkpoints load into each other.

    Example::

        opt = pyco.optim.Adam(model.parameters(), lr=3e-4)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.last_stats.to_dict()
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, blocks=None, stats=True, nonfinite="apply"):
        _check_tensor_options(lr, betas, foreach, capturable)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._check_group(defaults)
        super().__init__(params, defaults, blocks=blocks, stats=stats, nonfinite=nonfinite)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                               ("differentiable", False), ("fused", None), ("decoupled_weight_decay", False)):
                group.setdefault(key, value)

    @staticmethod
    def _check_group(group: dict) -> None:
        check_number("learning rate", group["lr"])
        check_number("epsilon value", group["eps"])
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        check_number("beta parameter at index 0", betas[0], high=1.0)
        check_number("beta parameter at index 1", betas[1], high=1.0)
        check_number("weight_decay value", group["weight_decay"])

    @staticmethod
    def _hyper(group: dict):
        beta1, beta2 = group["betas"]
        return _C.AdamHyper(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                            weight_decay=float(group["weight_decay"]), amsgrad=bool(group["amsgrad"]),
                            maximize=bool(group["maximize"]),
                            decoupled_weight_decay=bool(group["decoupled_weight_decay"]))

    _kernel = staticmethod(_C.adam_step)
    _rule = "adam"  # pyco._C_cuda's adam_* functions and the custom operator pyco::adam_step

    # The compiled step's view of a group (pyco.optim._compiled): hyper-parameters, flags and state names
    _HYPER_NAMES = ("lr", "beta1", "beta2", "eps", "weight_decay")
    _HYPER_FLAGS = ("amsgrad", "maximize", "decoupled_weight_decay")
    _STATE_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    @staticmethod
    def _hyper_values(group: dict) -> tuple[tuple, tuple]:
        beta1, beta2 = group["betas"]
        return ((group["lr"], beta1, beta2, group["eps"], group["weight_decay"]),
                (group["amsgrad"], group["maximize"], group["decoupled_weight_decay"]))

    @staticmethod
    def _group_from_values(values, flags) -> dict:
        lr, beta1, beta2, eps, weight_decay = values
        return dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=bool(flags[0]),
                    maximize=bool(flags[1]), decoupled_weight_decay=bool(flags[2]))

    @staticmethod
    def _slots(group: dict) -> tuple[str, ...]:
        return _AMSGRAD_SLOTS if group["amsgrad"] else _SLOTS

    def _states(self, p: torch.Tensor, group: dict, pending: dict, where: str):
        """The state tensors of p's record, checked; missing ones (and a step counter that must change
        representation) are created in ``pending``."""
        entry = self.state.get(p) or {}
        new = {}
        if not entry:
            new["step"] = (  # torch's non-fused layout on the CPU, its fused one on CUDA
                torch.tensor(0.0, dtype=_get_scalar_dtype()) if p.is_cpu
                else torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device))
            # Exponential moving averages of the gradient and of its square
            new["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            new["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in entry:
            # Running maximum of exp_avg_sq
            new["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        owner = type(self).__name__
        slots = []
        for name in self._slots(group):
            if name in new:
                slots.append((name, new[name]))
                continue
            if name not in entry:
                raise KeyError(f"{owner}: {where}: state has no {name!r} (it has {sorted(entry)}); clear the "
                               f"entry (`optimizer.state[p].clear()`) to start this parameter afresh")
            check_state_tensor_for_step(owner, where, name, p, entry[name])
            slots.append((name, entry[name]))
        step = new.get("step")
        if step is None:
            if "step" not in entry:
                raise KeyError(f"{owner}: {where}: state has no 'step' (it has {sorted(entry)})")
            step = _step_counter(entry["step"], p, f"{owner}: {where}")
            if step is not entry["step"]:
                new["step"] = step
        if new:
            pending[p] = new
        tensors = tuple(t for _, t in slots) + ((None,) if len(slots) == 2 else ())
        return tensors, step, 0, kept_state(p, slots, step)

    @staticmethod
    def _check_state_entry(where: str, p: torch.Tensor, entry: dict, group: dict) -> None:
        required = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        for name in ["step", *required]:
            if name not in entry:
                raise ValueError(f"state_dict: {where}: missing '{name}' (has {sorted(entry)})")
        step = entry["step"]
        if isinstance(step, torch.Tensor) and step.numel() != 1:
            raise ValueError(f"state_dict: {where}: 'step' has shape {list(step.shape)}, expected a scalar")
        if not isinstance(step, (torch.Tensor, int, float)) or float(step) < 0:
            raise ValueError(f"state_dict: {where}: 'step' must be a non-negative number, got {step!r}")
        for name in required:
            check_state_tensor(where, name, p, entry[name])

    def _normalize_state(self, entry: dict | None, p: torch.Tensor) -> None:
        step = None if not entry else entry.get("step")
        if step is not None:
            entry["step"] = _step_counter(step, p, "state_dict")


def _check_tensor_options(lr, betas, foreach, capturable) -> None:
    """torch.optim.Adam's rules for tensor hyper-parameters, with its exception type (ValueError)."""
    if isinstance(lr, torch.Tensor):
        if foreach and not capturable:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True "
                             "(as torch.optim.Adam); pyco's kernel ignores foreach: leave it None")
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {list(lr.shape)}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    if any(tensors) and not all(tensors):
        raise ValueError(f"betas must be either both floats or both Tensors, got {[type(b).__name__ for b in betas]}")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True "
                                 "(as torch.optim.Adam); pyco's kernel ignores foreach: leave it None")
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element, got shape {list(b.shape)}")


_compiled.RULES[Adam._rule] = Adam  # AdamW too: its groups carry decoupled_weight_decay=True
_SLOTS = ("exp_avg", "exp_avg_sq")
_AMSGRAD_SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _step_counter(step, p: torch.Tensor, where: str) -> torch.Tensor:
    """``step`` as the counter the kernel increments in place: a one-element float32/float64 tensor on the
    CPU for CPU parameters, on the parameter's device for CUDA ones. ``step`` itself when it is one; else a
    new tensor of the same value (an int64 step, as torch accepts, becomes float32). Raises RuntimeError
    for anything that is not one number."""
    device = torch.device("cpu") if p.is_cpu else p.device
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise RuntimeError(f"{where}: 'step' has {step.numel()} elements (shape {list(step.shape)}); "
                               "expected one number, the count of steps taken")
        # (A traced step cannot ask for the negation bit; the operator refuses such a counter when it runs.)
        if (step.dtype in _STEP_DTYPES and step.device == device and step.layout == torch.strided
                and (torch.compiler.is_compiling() or not step.is_neg())):
            return step
        return step.detach().reshape(()).to(device=device, dtype=_get_scalar_dtype(is_fused=not p.is_cpu)).clone()
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        return torch.tensor(float(step), dtype=_get_scalar_dtype(is_fused=not p.is_cpu), device=device)
    raise RuntimeError(f"{where}: 'step' is a {type(step).__name__}, expected a number or a one-element tensor")


class AdamW(Adam):
    r"""AdamW, a drop-in for :class:`torch.optim.AdamW`: Adam with decoupled weight decay
    (θ ← θ·(1 − γλ) before the Adam step). Default ``weight_decay=1e-2``. See :class:`Adam`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, blocks=None,
                 stats=True, nonfinite="apply"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, blocks=blocks, stats=stats, nonfinite=nonfinite)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
