"""Adam and AdamW, torch.optim's semantics, one fused launch per step."""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

from pyco._ext import _C
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
    _rule = "adam"  # pyco._C_cuda's adam_* functions

    def _states(self, p: torch.Tensor, group: dict):
        state = self.state[p]
        if len(state) == 0:
            state["step"] = (  # torch's non-fused layout on the CPU, its fused one on CUDA
                torch.tensor(0.0, dtype=_get_scalar_dtype()) if p.is_cpu
                else torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device))
            # Exponential moving averages of the gradient and of its square
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            # Running maximum of exp_avg_sq
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        ams = state["max_exp_avg_sq"] if group["amsgrad"] else None
        return (state["exp_avg"], state["exp_avg_sq"], ams), state["step"], 0

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
        # The kernel increments the counter in place: it must be a float32/float64 scalar on the CPU for CPU
        # parameters, on the parameter's device for CUDA ones.
        step = None if not entry else entry.get("step")
        if step is None:
            return
        device = torch.device("cpu") if p.is_cpu else p.device
        if not (isinstance(step, torch.Tensor) and step.dtype in _STEP_DTYPES and step.device == device
                and step.dim() == 0):
            dtype = _get_scalar_dtype(is_fused=not p.is_cpu)
            if isinstance(step, torch.Tensor):
                entry["step"] = step.detach().reshape(()).to(device=device, dtype=dtype)
            else:
                entry["step"] = torch.tensor(float(step), dtype=dtype, device=device)


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
