"""What pyco's optimizers share: validation at the door, blocks, the launch, GradScaler, statistics.

A rule (SGD, Adam) supplies its hyper-parameter checks, its state and its kernel; this base class turns a
step into one kernel launch over every parameter of every group.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import warnings
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from pyco import _dtensor
from pyco import blocks as _blocks
from pyco._ext import has_cuda_kernels
from pyco._kernels import SUPPORTED_DTYPES, grads_all_finite
from pyco.optim import _door
from pyco.stats import BlockStats

log = logging.getLogger("pyco")

NONFINITE_POLICIES = ("apply", "skip", "skip-block")


def check_number(name: str, value, *, low: float = 0.0, high: float | None = None, high_open: bool = True) -> float:
    """Validates a hyper-parameter (a number or a 1-element tensor) and returns it as a float. A tensor in
    device memory is checked for its shape only, and NaN returned: reading it would wait for the device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            label = "lr" if name == "learning rate" else name  # torch's wording
            raise ValueError(f"Tensor {label} must be 1-element, got shape {list(value.shape)}")
        if value.device.type != "cpu":
            return math.nan
        number = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_":
        number = float(value)  # Python and numpy scalars
    elif getattr(value, "shape", None) == () and getattr(getattr(value, "dtype", None), "kind", "") in "fiu":
        number = float(value)  # a 0-d numpy array
    else:
        raise TypeError(f"Invalid {name}: {value!r} (expected a number)")
    bound = "" if high is None else (f" < {high}" if high_open else f" <= {high}")
    if math.isnan(number) or number < low or (high is not None and (number >= high if high_open else number > high)):
        raise ValueError(f"Invalid {name}: {value} (expected {low} <= {name}{bound})")
    return number


class FusedOptimizer(Optimizer):
    """Base of pyco.optim's optimizers. Subclasses define ``_check_group``, ``_hyper``, ``_kernel``,
    ``_states`` (lazy state creation) and ``_check_state_entry``."""

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale / found_inf; unscaling is fused

    def __init__(self, params, defaults: dict, *, blocks=None, stats: bool = True, nonfinite: str = "apply"):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (expected one of {NONFINITE_POLICIES})")
        if defaults.get("differentiable"):
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True; use torch.optim.{type(self).__name__}"
            )
        if defaults.get("capturable") and not has_cuda_kernels():
            raise ValueError(
                f"capturable=True needs pyco's CUDA kernels, which this build does not have; "
                f"leave capturable=False (the CPU kernels never synchronize) or use torch.optim.{type(self).__name__}"
            )
        self._results: dict = {"last_stats": None}  # what a step leaves (a dict: a compiled step writes into it)
        super().__init__(params, defaults)
        self.stats = bool(stats)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._block_spec = None if blocks is None else _blocks.Blocks.of(blocks)
        self._block_names, self._block_index = _blocks.resolve(self.param_groups, self._block_spec)
        self._foreign_blocks = None  # (Blocks, groups snapshot, names, index, where) of the last step_blocks
        self._lock = threading.RLock()  # one step at a time: steps from several threads are serialised
        self._plans: dict = {}  # launch kind -> (Plan, signature, blocks, device, names) (pyco.optim._door)
        self._launches = {"planned": 0, "prepared": 0}  # how the launches were prepared (tests read it)

    # Attributes of pyco's own that a copy or a pickle keeps (torch.optim.Optimizer.__getstate__ keeps only
    # defaults, state and param_groups); the id()-keyed lookups are rebuilt instead.
    _PICKLED = ("stats", "nonfinite", "last_stats", "skipped_steps", "_block_spec")

    def __getstate__(self):
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        state["last_stats"] = self.last_stats
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._results = {"last_stats": self.__dict__.pop("last_stats", None)}
        for key, value in (("stats", True), ("nonfinite", "apply"), ("skipped_steps", 0), ("_block_spec", None)):
            self.__dict__.setdefault(key, value)
        self._block_names, self._block_index = _blocks.resolve(self.param_groups, self._block_spec)
        self._foreign_blocks = None
        self._lock = threading.RLock()
        self._plans = {}
        self._launches = {"planned": 0, "prepared": 0}

    # ---- construction -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        _check_new_group(param_group, len(self.param_groups))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        try:
            self._check_group(group)
            for pi, p in enumerate(group["params"]):
                self._check_param(gi, pi, p)
            if hasattr(self, "_block_names"):  # a group added after construction: it becomes its own block
                spec = self._block_spec
                if spec is not None:
                    spec = _blocks.Blocks([*spec.items(), (str(group.get("name", f"group{gi}")), group["params"])])
                names, index = _blocks.resolve(self.param_groups, spec)
                self._block_spec, self._block_names, self._block_index = spec, names, index
        except Exception:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def _check_param(self, gi: int, pi: int, p: torch.Tensor) -> None:
        where = f"{type(self).__name__}: {_blocks.describe_param(gi, pi, p)}"
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{where} has unsupported dtype {p.dtype}; pyco updates float32, float64, float16, bfloat16 "
                "and complex64/complex128 parameters"
            )
        if p.device.type == "cuda" and not has_cuda_kernels():
            raise ValueError(
                f"{where} is on {p.device}, but this build of pyco has CPU kernels only; rebuild pyco where nvcc "
                f"is found (`PYCO_CUDA=ON pip install .`), keep the model on the CPU, or use "
                f"torch.optim.{type(self).__name__} for CUDA tensors"
            )
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"{where} is on {p.device}, but pyco has CPU and CUDA kernels only; use "
                f"torch.optim.{type(self).__name__} for {p.device.type} tensors"
            )
        if self.param_groups[gi].get("capturable") and p.device.type != "cuda":
            raise ValueError(
                f"capturable=True needs pyco's CUDA kernels and CUDA parameters, but {where} is on {p.device}; "
                f"leave capturable=False (the CPU kernels never synchronize)"
            )

    @property
    def block_names(self) -> tuple[str, ...]:
        return self._block_names

    @property
    def last_stats(self) -> BlockStats | None:
        """The statistics of the last step (:class:`pyco.stats.BlockStats`), None before the first step and
        with ``stats=False``."""
        return self._results["last_stats"]

    @last_stats.setter
    def last_stats(self, value: BlockStats | None) -> None:
        self._results["last_stats"] = value

    # ---- the step -----------------------------------------------------------------------------------

    def _collect(self, only: dict[int, list] | None = None):
        """Parameters with gradients, per group (every group, in order), after checking every gradient, and
        every parameter considered (``candidates``, with or without a gradient). ``only`` ({group index:
        [(param index, param)]}) restricts the parameters looked at. Changes nothing.

        DTensor parameters (FSDP2): ``sharding`` (pyco._dtensor.Sharding) says how they lie on their mesh,
        and the work holds their gradients' local shards; None when no parameter is a DTensor."""
        sharding = self._sharding()
        work, candidates = [], []
        for gi, group in enumerate(self.param_groups):
            triples = []
            for pi, p in (enumerate(group["params"]) if only is None else only.get(gi, ())):
                candidates.append(p)
                g = p.grad
                if g is None:
                    continue
                q = p
                if sharding is not None:  # check the global shapes, then the local shards the kernel reads
                    if g.shape != p.shape or g.dtype != p.dtype:
                        self._reject_grad(gi, pi, p, g)
                    _dtensor.check_grad(type(self).__name__, _blocks.describe_param(gi, pi, p), p, g)
                    q, g = p.to_local(), g.to_local()
                if (g.is_sparse or g.dtype != q.dtype or q.dtype not in SUPPORTED_DTYPES or g.shape != q.shape
                        or g.layout != torch.strided or not ((q.is_cpu and g.is_cpu) or _on_one_cuda_device(q, g))):
                    self._reject_grad(gi, pi, p, g)
                triples.append((pi, p, g))
            work.append((gi, group, triples))
        return work, candidates, sharding

    def _sharding(self):
        """pyco._dtensor.Sharding of the parameters when they are DTensors, else None (checked every time: no
        plan is kept for DTensor parameters)."""
        cls = _dtensor.dtensor_type()
        if cls is None or not any(isinstance(p, cls) for group in self.param_groups for p in group["params"]):
            return None
        return _dtensor.sharding_of(
            type(self).__name__, [((gi, pi), p) for gi, group in enumerate(self.param_groups)
                                  for pi, p in enumerate(group["params"])],
            lambda where, p: _blocks.describe_param(where[0], where[1], p))

    def _reject_grad(self, gi: int, pi: int, p: torch.Tensor, g: torch.Tensor) -> None:
        self._check_param(gi, pi, p)
        where = f"{type(self).__name__}: {_blocks.describe_param(gi, pi, p)}"
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(
                f"{where} has a sparse gradient ({g.layout}), which pyco does not support; use "
                "torch.optim.SparseAdam or a dense embedding (nn.Embedding(sparse=False))"
            )
        raise ValueError(
            f"{where} has a gradient of {g.dtype}, shape {list(g.shape)} on {g.device}; "
            "it must match the parameter's dtype, shape and device"
        )

    def _skip(self, reason: str, names: tuple[str, ...] | None = None) -> None:
        self.skipped_steps += 1
        self.last_stats = BlockStats.zeros(names or self._block_names, skipped=True) if self.stats else None
        log.warning("%s: step skipped (%s); parameters and state unchanged", type(self).__name__, reason)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Performs one optimization step over every group in a single kernel launch.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.

        A step is all or nothing: every tensor is checked before anything is written, and a step that
        raises leaves parameters, gradients and state as they were. Steps of one optimizer from several
        threads are serialised (the closure included).

        Under ``torch.compile`` the launch is the custom operator ``pyco::adam_step``/``pyco::sgd_step`` in the
        graph (pyco.optim._compiled); DTensor (FSDP2) parameters are updated through their local shards
        (pyco._dtensor).
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"{type(self).__name__}.step: closure must be callable (or None), "
                            f"got {type(closure).__name__}")
        if torch.compiler.is_compiling():
            return self._compiled_step(closure)
        with self._lock:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._launch(("all",), lambda: (None, self._block_names, self._block_index))
            return loss

    def _compiled_step(self, closure):
        """``step`` as torch.compile traces it: the launch is the custom operator pyco::<rule>_step inside the
        graph (pyco.optim._compiled). What it cannot express there (skipping on inf/NaN, GradScaler, CUDA and
        DTensor parameters) runs the eager step outside the graph, at the cost of a graph break. Not
        serialised by the optimizer's lock (a graph cannot take a Python lock)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._compilable():
            _eager_launch(self)
            return loss
        from pyco.optim import _compiled
        from pyco.optim._door import check_written_param

        owner = type(self).__name__
        names, index = self._block_names, self._block_index
        for group in self.param_groups:
            self._check_group(_compiled.without_tensors(group))
        written, grads, layout, pending = [], [], [], {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if (g.is_sparse or g.dtype != p.dtype or p.dtype not in SUPPORTED_DTYPES or g.shape != p.shape
                        or g.layout != torch.strided or not g.is_cpu):
                    self._reject_grad(gi, pi, p, g)
                where = _blocks.describe_param(gi, pi, p)
                check_written_param(owner, where, p)
                states, step, flags, _ = self._states(p, group, pending, where)
                states = [t for t in states if t is not None]
                written.append(p)
                written.extend(states)
                if step is not None:
                    written.append(step)
                grads.append(g)
                layout.extend((gi, pi, index[id(p)], flags, len(states), int(step is not None)))
        hypers, hyper_tensors, hyper_slots, group_flags = _compiled.hyper_args(self, self.param_groups)
        values = _compiled.OPS[self._rule](written, grads, layout, hypers, hyper_tensors, hyper_slots, group_flags,
                                           owner, len(self.param_groups), len(names), self.stats)
        for p, new in pending.items():  # the step went ahead: its new state enters the optimizer's
            self.state[p].update(new)
        self._results["last_stats"] = BlockStats(names, values) if self.stats else None
        return loss

    def _compilable(self) -> bool:
        """True when a traced step can be one custom operator call in the graph."""
        if (self.nonfinite != "apply" or getattr(self, "grad_scale", None) is not None
                or getattr(self, "found_inf", None) is not None):
            return False
        return all(type(p) in _PLAIN and p.is_cpu for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step_blocks(self, blocks: _blocks.Blocks, active) -> BlockStats | None:
        """Updates only the parameters of the ``active`` blocks of ``blocks``, in one kernel launch.

        Every other parameter, its optimizer state included, is left untouched, as if its ``.grad`` were None.
        This is how :mod:`pyco.orders` moves any subset of blocks at the cost of one launch.

        Args:
            blocks (pyco.blocks.Blocks): a partition of this optimizer's parameters, which may differ from the
                optimizer's own ``blocks`` (an order wrapper's, for instance).
            active (iterable of str): names of the blocks of ``blocks`` to update, each once.

        Returns the statistics of the launch, one row per block of ``blocks`` (rows of inactive blocks are
        zero); ``last_stats`` holds the same. None when ``stats=False``.

        Example::

            blocks = pyco.blocks.by_module(model)
            opt = pyco.optim.SGD(model.parameters(), lr=0.1)
            loss.backward()
            opt.step_blocks(blocks, ["3"])   # only module 3 moves
        """
        if torch.compiler.is_compiling():
            return _eager_step_blocks(self, blocks, active)
        with self._lock:
            active = tuple(active)
            if len(set(active)) != len(active):
                twice = sorted({name for name in active if active.count(name) > 1}, key=str)
                raise ValueError(f"step_blocks: blocks {twice} are named more than once in active; name each "
                                 "block once (a block moves once per launch)")
            return self._launch(("blocks", id(blocks), active), lambda: self._active_params(blocks, active), blocks)

    def _active_params(self, blocks: _blocks.Blocks, active: tuple) -> tuple[dict, tuple[str, ...], dict]:
        """For a step_blocks launch prepared in Python: ({group index: [(param index, param)]} of the active
        blocks, in group order; the names and param -> row map of ``blocks``)."""
        names, index, where = self._resolve_foreign(blocks)
        only: dict[int, list] = {}  # only the active blocks' tensors are looked at, not every parameter
        for name in active:
            if name not in blocks:
                raise KeyError(f"step_blocks: no block named {name!r}; blocks are {list(names)}")
            for p in blocks[name]:
                gi, pi = where[id(p)]
                only.setdefault(gi, []).append((pi, p))
        for pairs in only.values():
            pairs.sort(key=lambda pair: pair[0])
        return only, names, index

    def _resolve_foreign(self, blocks: _blocks.Blocks) -> tuple[tuple[str, ...], dict[int, int], dict[int, tuple]]:
        """Names, param -> row map and param -> (group, index in group) for ``blocks``, checked to cover this
        optimizer's parameters exactly once; cached while ``blocks`` and the param groups stay the same (an
        order wrapper passes the same Blocks every step)."""
        cached = getattr(self, "_foreign_blocks", None)
        if cached is None or cached[0] is not blocks or not _same_groups(cached[1], self.param_groups):
            if not isinstance(blocks, _blocks.Blocks):
                raise TypeError(f"step_blocks: blocks must be a pyco.blocks.Blocks, got {type(blocks).__name__}")
            names, index = _blocks.resolve(self.param_groups, blocks)
            where = {id(p): (gi, pi) for gi, group in enumerate(self.param_groups)
                     for pi, p in enumerate(group["params"])}
            snapshot = [list(group["params"]) for group in self.param_groups]
            self._foreign_blocks = cached = (blocks, snapshot, names, index, where)
        return cached[2], cached[3], cached[4]

    @staticmethod
    def _uses_cuda_kernels(p: torch.Tensor) -> bool:
        """True for the parameters pyco's CUDA kernels update (the tests' fake device says so of CPU ones)."""
        return p.is_cuda

    def _signature(self) -> tuple:
        """What decides the records' layout besides the tensors: each group's state slots, the device."""
        return tuple(self._slots(group) for group in self.param_groups)

    def _launch(self, key, resolve, blocks=None) -> BlockStats | None:
        """One kernel launch, planned when a plan for ``key`` still holds, prepared in Python otherwise:
        ``resolve()`` gives (the parameters to look at, None for all; the statistics' block names; param ->
        block row), and is called only then."""
        for group in self.param_groups:
            self._check_group(group)
        groups = [group["params"] for group in self.param_groups]
        signature = self._signature()
        cached = self._plans.get(key)
        if cached is not None and cached[1] == signature and cached[2] is blocks and isinstance(self.state, dict):
            plan, device, names = cached[0], cached[3], cached[4]
            if plan.refresh(groups, self.state) is None:
                self._launches["planned"] += 1
                if device is None:
                    return self._run_plan(plan, names)
                from pyco.optim import _cuda

                return _cuda.launch_plan(self, plan, device, names)
        self._plans.pop(key, None)
        only, names, index = resolve()
        work, candidates, sharding = self._collect(only)
        if any(self._uses_cuda_kernels(p) for _, _, triples in work for _, p, _ in triples):
            if self.nonfinite == "skip-block":
                raise ValueError(f"{type(self).__name__}: nonfinite='skip-block' is implemented for CPU parameters "
                                 "only; use nonfinite='skip' (the whole step) for CUDA parameters")
            from pyco.optim import _cuda  # one launch per device, no host synchronization

            tables = _cuda.prepare(self, work, index, candidates, sharded=sharding is not None)
            self._launches["prepared"] += 1
            stats = _cuda.launch_tables(self, tables, names, sharding)
            if len(tables) == 1:
                self._keep_plan(key, _door.make_plan(self, tables[0][1], groups), signature, blocks, tables[0][0],
                                names)
            return stats
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and _any_rank(sharding, float(found_inf) != 0.0):
            self._skip("GradScaler found inf or NaN gradients", names)
            return self.last_stats
        threads = torch.get_num_threads()
        grads = [g for _, _, triples in work for _, _, g in triples]
        if self.nonfinite == "skip" and _any_rank(sharding, not grads_all_finite(grads, threads)):
            self._skip("non-finite gradients, nonfinite='skip'", names)
            return self.last_stats
        skipped_blocks = ()
        if self.nonfinite == "skip-block":
            work, skipped_blocks = _drop_nonfinite_blocks(work, names, index, threads, sharding)
            if skipped_blocks:
                log.warning("%s: blocks %s skipped (non-finite gradients, nonfinite='skip-block'); their parameters "
                            "and state unchanged", type(self).__name__, list(skipped_blocks))
        prepared = _door.prepare(self, work, index, candidates, sharded=sharding is not None)
        self._launches["prepared"] += 1
        hypers = [self._hyper(group) for group in self.param_groups]
        grad_scale = getattr(self, "grad_scale", None)
        values = torch.zeros(len(names), 4, dtype=torch.float64) if self.stats else None
        prepared.commit(self.state)
        try:
            self._kernel(
                prepared.table.records,
                hypers,
                grad_scale=1.0 if grad_scale is None else float(grad_scale),
                stats=0 if values is None else values.data_ptr(),
                num_blocks=len(names),
                num_threads=threads,
            )
        except BaseException:
            prepared.rollback()
            raise
        prepared.table.write_back(grads=grad_scale is not None and float(grad_scale) != 1.0)
        if sharding is not None and values is not None:
            sharding.sum_(values)  # the sums over the local shards become the sums over the whole tensors
        if not skipped_blocks:
            self._keep_plan(key, _door.make_plan(self, prepared, groups), signature, blocks, None, names)
        self.last_stats = None if values is None else BlockStats(names, values, skipped_blocks=skipped_blocks)
        return self.last_stats

    def _keep_plan(self, key, plan, signature, blocks, device, names) -> None:
        if plan is None:
            return
        if len(self._plans) >= _door.MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = (plan, signature, blocks, device, names)

    def _run_plan(self, plan, names: tuple[str, ...]) -> BlockStats | None:
        """A planned launch (its gradients' addresses were put in by ``plan.refresh``)."""
        threads = torch.get_num_threads()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:
            plan.drop_held()
            self._skip("GradScaler found inf or NaN gradients", names)
            return self.last_stats
        if self.nonfinite == "skip" and not plan.all_finite(num_threads=threads):
            plan.drop_held()
            self._skip("non-finite gradients, nonfinite='skip'", names)
            return self.last_stats
        bad = plan.nonfinite_blocks(num_threads=threads) if self.nonfinite == "skip-block" else []
        skipped_blocks = tuple(names[b] for b in bad)
        if skipped_blocks:
            log.warning("%s: blocks %s skipped (non-finite gradients, nonfinite='skip-block'); their parameters "
                        "and state unchanged", type(self).__name__, list(skipped_blocks))
        grad_scale = getattr(self, "grad_scale", None)
        values = torch.zeros(len(names), 4, dtype=torch.float64) if self.stats else None
        getattr(plan, f"{self._rule}_step")(
            [self._hyper(group) for group in self.param_groups],
            grad_scale=1.0 if grad_scale is None else float(grad_scale),
            stats=0 if values is None else values.data_ptr(),
            num_blocks=len(names),
            num_threads=threads,
            skip_blocks=bad,
        )
        self.last_stats = None if values is None else BlockStats(names, values, skipped_blocks=skipped_blocks)
        return self.last_stats

    # ---- checkpoints --------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads torch.optim's layout (from pyco or torch). Every entry is checked first: a state dict that
        does not fit these parameters raises and nothing is loaded."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        saved_state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict must be a dict with 'state' (dict) and 'param_groups' (list)")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"state_dict: param group {gi} must be a dict with a 'params' list, "
                                 f"got {type(saved).__name__}")
            try:  # the saved group alone must hold this rule's hyper-parameters: SGD's does not fit Adam
                self._check_group({k: v for k, v in saved.items() if k != "params"})
            except KeyError as exc:
                raise ValueError(
                    f"state_dict: param group {gi} has no {exc.args[0]!r} (it has {sorted(saved)}); was it saved "
                    f"by another optimizer than {type(self).__name__}?"
                ) from None
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} of the state_dict has {len(saved.get('params', ()))} parameters, "
                    f"this optimizer's has {len(group['params'])}"
                )
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            self._check_group(merged)
            for pi, (key, p) in enumerate(zip(saved["params"], group["params"])):
                entry = saved_state.get(key)
                if entry:
                    self._check_state_entry(f"{_blocks.describe_param(gi, pi, p)}", p, entry, merged)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                self._normalize_state(self.state.get(p), p)

    def _normalize_state(self, entry: dict | None, p: torch.Tensor) -> None:
        """Hook for rules whose state needs a fixed representation after loading (Adam's step counter)."""


def _check_new_group(param_group, index: int) -> None:
    """What torch.optim accepts with a KeyError, refused clearly: a group without 'params'. A parameter twice
    in one group gets torch's warning and is kept once (the fused kernel moves each tensor once per step)."""
    if not isinstance(param_group, dict):
        return  # torch's own message
    if "params" not in param_group:
        raise ValueError(f"param group {index} has no 'params' entry: give a dict with 'params' (an iterable of "
                         f"tensors) and, optionally, hyper-parameters")
    params = param_group["params"]
    if isinstance(params, torch.Tensor) or isinstance(params, set):
        return  # torch's own handling (a single tensor; a set is refused)
    params = list(params)
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if id(p) in seen:
            shape = list(p.shape) if isinstance(p, torch.Tensor) else "?"
            warnings.warn(f"optimizer contains a parameter group with duplicate parameters (param group {index}: "
                          f"params {seen[id(p)]} and {i} are the same tensor, shape {shape}); pyco keeps the first "
                          "and updates each tensor once per step. Give each parameter once", UserWarning,
                          stacklevel=4)
            continue
        seen[id(p)] = i
    param_group["params"] = [p for i, p in enumerate(params) if seen.get(id(p)) == i]


def _any_rank(sharding, flag: bool) -> bool:
    """``flag``, or (DTensor parameters) whether it holds on any rank of their mesh: every rank decides alike."""
    return flag if sharding is None else sharding.any_true(flag)


def _drop_nonfinite_blocks(work, names: tuple[str, ...], index: dict[int, int], threads: int, sharding=None):
    """``work`` without the parameters of the blocks whose gradients hold an inf or NaN (on any rank, for
    DTensor parameters), and those blocks' names."""
    grads: dict[int, list] = {}
    for _, _, triples in work:
        for _, p, g in triples:
            grads.setdefault(index[id(p)], []).append(g)
    bad = {b for b, gs in grads.items() if not grads_all_finite(gs, threads)}
    if sharding is not None:
        flags = torch.zeros(len(names), dtype=torch.float64)
        flags[sorted(bad)] = 1.0
        bad = {int(b) for b in sharding.any(flags).nonzero().flatten().tolist()}
    if not bad:
        return work, ()
    kept = [(gi, group, [t for t in triples if index[id(t[1])] not in bad]) for gi, group, triples in work]
    return kept, tuple(names[b] for b in sorted(bad))


def _same_groups(snapshot: list[list], groups: list[dict]) -> bool:
    """True when every param group still holds the same tensors, in the same order, as ``snapshot``."""
    return len(snapshot) == len(groups) and all(
        len(saved) == len(group["params"]) and all(a is b for a, b in zip(saved, group["params"]))
        for saved, group in zip(snapshot, groups))


@torch.compiler.disable
def _eager_launch(opt: FusedOptimizer) -> None:
    """The eager step's launch, called from a traced step that the graph cannot hold (a graph break)."""
    with opt._lock:
        opt._launch(("all",), lambda: (None, opt._block_names, opt._block_index))


@torch.compiler.disable
def _eager_step_blocks(opt: FusedOptimizer, blocks, active):
    """step_blocks called from a traced function: the eager launch, outside the graph (a graph break)."""
    return opt.step_blocks(blocks, active)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensors a traced step hands to the operator (no DTensor)


def _on_one_cuda_device(p: torch.Tensor, g: torch.Tensor) -> bool:
    return p.is_cuda and g.is_cuda and p.get_device() == g.get_device() and has_cuda_kernels()


def check_state_tensor(where: str, name: str, p: torch.Tensor, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"state_dict: {where}: '{name}' is {type(value).__name__}, expected a tensor")
    if value.shape != p.shape:
        raise ValueError(
            f"state_dict: {where}: '{name}' has shape {list(value.shape)}, expected {list(p.shape)}; "
            "was this state saved for another model?"
        )
