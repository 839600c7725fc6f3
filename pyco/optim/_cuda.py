"""pyco's optimizers on CUDA tensors: one kernel launch per device, no host synchronization in ``step()``.

The tensor table is the CPU kernels' (:class:`pyco._kernels.Table`, device addresses instead of host ones).
Per device an optimizer keeps a :class:`DevicePlan`: the table's plan (its records sorted by block, the chunk
table) and the param groups' hyper-parameters, in device memory, uploaded asynchronously (pinned staging,
``cudaMemcpyAsync`` on the current stream) only when they change. A steady-state step therefore copies
nothing to the device, and a captured CUDA graph replays buffers that stay alive as long as the optimizer.
What changes every step is passed by address: GradScaler's ``grad_scale`` / ``found_inf``, a tensor ``lr``,
the statistics and their scratch. Everything runs on ``torch.cuda.current_stream(device)``.

Skips decided on the device (GradScaler's ``found_inf``; ``nonfinite="skip"``, whose check is a kernel
too) leave parameters, state and step counters unchanged without the host knowing: ``skipped_steps`` does
not count them and ``last_stats.skipped`` is a 0-dim bool tensor on the device (reading it waits for the step).
"""

from __future__ import annotations

from array import array

import torch

from pyco import blocks as _blocks
from pyco._ext import cuda_kernels
from pyco._kernels import DTYPE_CODES, Table
from pyco.optim import _door
from pyco.stats import FIELDS, BlockStats

_LR_DTYPES = (torch.float32, torch.float64)


class DevicePlan:
    """One optimizer's device buffers on one device: the plan and params of the last launch (rebuilt when
    the table or the hyper-parameters change) and the statistics scratch. Buffers read by a captured graph
    are kept for the optimizer's lifetime (``keep``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.records = None  # host table (array('q')) and num_blocks the plan was built from
        self.num_blocks = -1
        self.plan = None  # uint8 device tensor
        self.num_records = 0
        self.num_chunks = 0
        self.dtypes = 0  # mask of the storage types present: one update kernel each
        self.num_groups = 0
        self.params_bytes = None
        self.params = None  # uint8 device tensor
        self.partials = None  # float64 device tensor [num_chunks * 4]
        self.stream = None  # the stream the buffers were last used on
        self.keep: list[torch.Tensor] = []

    def prepare(self, C, rule: str, table: Table, hypers, lr_addresses, lr_dtypes, num_blocks: int, stats: bool,
                stream, capturing: bool) -> None:
        if self.stream is not None and stream.cuda_stream != self.stream.cuda_stream and not capturing:
            # The caching allocator must not hand these buffers out while the new stream may still read them.
            for t in (self.plan, self.params, self.partials):
                if t is not None:
                    t.record_stream(stream)
        self.stream = stream
        if self.records is None or num_blocks != self.num_blocks or table.records != self.records:
            plan, self.num_chunks, self.dtypes = getattr(C, f"{rule}_plan")(table.records, hypers,
                                                                            num_blocks=num_blocks)
            self.plan = self._upload(C, plan, stream)
            self.records, self.num_blocks, self.num_records = table.records, num_blocks, len(table)
            self.partials = None
        params = getattr(C, f"{rule}_params")(hypers, lr_addresses=lr_addresses, lr_dtypes=lr_dtypes)
        if params != self.params_bytes:
            self.params = self._upload(C, params, stream)
            self.params_bytes, self.num_groups = params, len(hypers)
        if stats and self.num_chunks and (self.partials is None or self.partials.numel() < self.num_chunks * 4):
            self.partials = torch.empty(self.num_chunks * len(FIELDS), dtype=torch.float64, device=self.device)
        if capturing:
            self.keep.extend(t for t in (self.plan, self.params, self.partials)
                             if t is not None and all(t is not k for k in self.keep))

    def _upload(self, C, data: bytes, stream) -> torch.Tensor | None:
        if not data:
            return None
        dst = torch.empty(len(data), dtype=torch.uint8, device=self.device)
        C.upload(dst.data_ptr(), data, device=self.device.index, stream=stream.cuda_stream)
        return dst

    def addresses(self) -> dict:
        return dict(plan=_address(self.plan), num_records=self.num_records, num_chunks=self.num_chunks,
                    num_blocks=self.num_blocks, dtypes=self.dtypes, params=_address(self.params),
                    num_groups=self.num_groups)


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def split_by_device(work) -> list[tuple[torch.device, list]]:
    """``work`` (from ``FusedOptimizer._collect``) per device of its parameters, devices in order of first
    appearance; every group stays in every part (group indices index the hyper-parameters)."""
    devices: dict[torch.device, None] = {}
    for _, _, triples in work:
        for _, p, _ in triples:
            devices.setdefault(p.device, None)
    if len(devices) <= 1:
        return [(device, work) for device in devices]
    return [(device, [(gi, group, [t for t in triples if t[1].device == device]) for gi, group, triples in work])
            for device in devices]


def check_devices(opt, parts) -> None:
    """One launch per CUDA device; CPU and CUDA parameters in one step are refused, naming one of each."""
    types = {device.type for device, _ in parts}
    if types <= {"cuda"}:
        return
    found = {}
    for device, work in parts:
        for gi, group, triples in work:
            for pi, p, _ in triples[:1]:
                found.setdefault(device.type, f"{_blocks.describe_param(gi, pi, p)} on {device}")
    raise ValueError(
        f"{type(opt).__name__}: parameters on several kinds of device in one step ({found.get('cpu')} and "
        f"{found.get('cuda')}); pyco launches one kernel per CUDA device and cannot mix CPU and CUDA tensors "
        "in one optimizer: move the model to one device, or use one optimizer per device"
    )


def _hypers(opt, device: torch.device, keep: list) -> tuple[list, list[int], list[int]]:
    """The groups' hyper-parameters for a launch on ``device``; a tensor lr in device memory is passed by
    address (read by the kernel at every launch: no synchronization, and a captured graph sees its updates)."""
    hypers, lr_addresses, lr_dtypes = [], [], []
    for group in opt.param_groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device.type == "cuda":
            if lr.device != device or lr.dtype not in _LR_DTYPES:
                lr = lr.to(device=device, dtype=lr.dtype if lr.dtype in _LR_DTYPES else torch.float32,
                           non_blocking=True)
                keep.append(lr)
            hypers.append(opt._hyper({**group, "lr": 0.0}))
            lr_addresses.append(lr.data_ptr())
            lr_dtypes.append(DTYPE_CODES[lr.dtype])
        else:
            hypers.append(opt._hyper(group))
            lr_addresses.append(0)
            lr_dtypes.append(0)
    return hypers, lr_addresses, lr_dtypes


def _on(t: torch.Tensor, device: torch.device, keep: list) -> torch.Tensor:
    """t as a float32 tensor on device (t itself when it already is one)."""
    moved = t.to(device=device, dtype=torch.float32, non_blocking=True)
    keep.append(moved)
    return moved


# Devices whose driver and kernel image passed check_device in this process (once each).
_USABLE_DEVICES: set = set()


def check_device_usable(C, parts) -> None:
    """Once per device and process, before its first launch: pyco._C_cuda.check_device raises a RuntimeError
    that says what to install when the NVIDIA driver is too old for the CUDA runtime pyco was built with,
    the device does not exist, or this build has no kernel image for it."""
    for device, _ in parts:
        if device not in _USABLE_DEVICES:
            C.check_device(device.index)
            _USABLE_DEVICES.add(device)


class PlannedTable:
    """A refreshed :class:`pyco._C.Plan` seen as a table: its records, nothing to write back, no state to
    create."""

    def __init__(self, plan):
        self.plan = plan
        self.records = array("q")
        self.records.frombytes(plan.records())
        self.keep: list[torch.Tensor] = []

    def __len__(self) -> int:
        return self.plan.num_records

    def write_back(self, *, grads: bool) -> None:
        self.plan.drop_held()  # the launch is enqueued: the caching allocator orders any reuse after it


def prepare(opt, work, index: dict[int, int], candidates, *, sharded: bool = False
            ) -> list[tuple[torch.device, _door.Prepared]]:
    """Every device's table, checked (state still pending), before anything is uploaded or launched. The
    candidates go with a single device's table (a plan can take it over); several devices are prepared in
    Python every step. ``sharded``: DTensor parameters (see pyco.optim._door.prepare)."""
    parts = split_by_device(work)
    check_devices(opt, parts)
    return [(device, _door.prepare(opt, part, index, candidates if len(parts) == 1 else [], sharded=sharded))
            for device, part in parts]


def launch(opt, work, names: tuple[str, ...], index: dict[int, int]) -> BlockStats | None:
    """``FusedOptimizer._launch`` for CUDA parameters prepared in Python: one launch per device; sets and
    returns ``last_stats``."""
    return launch_tables(opt, prepare(opt, work, index, []), names)


def launch_plan(opt, plan, device: torch.device, names: tuple[str, ...]) -> BlockStats | None:
    """A planned launch on one device (``plan.refresh`` has put this step's gradients in)."""
    return launch_tables(opt, [(device, PlannedTable(plan))], names)


def launch_tables(opt, tables, names: tuple[str, ...], sharding=None) -> BlockStats | None:
    """One launch per device of ``tables`` ([(device, Prepared or PlannedTable)]); a Prepared's pending state
    is committed just before the launches and rolled back if they raise. ``sharding`` (DTensor parameters,
    pyco._dtensor.Sharding): the skip flags and the statistics are all-reduced over the mesh, on the device."""
    C = cuda_kernels()
    check_device_usable(C, tables)
    rule = opt._rule
    plans = opt.__dict__.setdefault("_device_plans", {})
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    num_blocks = len(names)
    keep: list[torch.Tensor] = []  # temporaries that must outlive the launches (stream-ordered frees)

    prepared = []
    for device, door in tables:
        table = door.table if isinstance(door, _door.Prepared) else door
        hypers, lr_addresses, lr_dtypes = _hypers(opt, device, table.keep)
        plan = plans.get(device)
        if plan is None:
            plan = plans[device] = DevicePlan(device)
        stream = torch.cuda.current_stream(device)
        capturing = C.stream_is_capturing(device.index, stream.cuda_stream)
        plan.prepare(C, rule, table, hypers, lr_addresses, lr_dtypes, num_blocks, opt.stats, stream, capturing)
        prepared.append((device, plan, table, stream))
    doors = [door for _, door in tables if isinstance(door, _door.Prepared)]
    for door in doors:
        door.commit(opt.state)
    try:

    # What skips the step, decided on the device: GradScaler's found_inf, the non-finite check.
        flags = [None if found_inf is None else _on(found_inf, device, keep) for device, *_ in prepared]
        if opt.nonfinite == "skip":
            for i, (device, plan, _, stream) in enumerate(prepared):
                flag = torch.zeros((), dtype=torch.float32, device=device) if flags[i] is None else flags[i].clone()
                C.flag_nonfinite(flag=flag.data_ptr(), plan=_address(plan.plan), num_records=plan.num_records,
                                 num_chunks=plan.num_chunks, num_blocks=plan.num_blocks, device=device.index,
                                 stream=stream.cuda_stream)
                flags[i] = flag
            if len(prepared) > 1:  # every device skips, or none does
                first = prepared[0][0]
                total = sum(f.to(first, non_blocking=True) for f in flags)
                flags = [total if device == first else _on(total, device, keep) for device, *_ in prepared]
        if sharding is not None:  # every rank skips, or none does (a copy: GradScaler's found_inf is its own)
            flags = [None if f is None else sharding.any(f.clone()) for f in flags]

        values = None
        for (device, plan, table, stream), flag in zip(prepared, flags):
            dev_values = torch.empty((num_blocks, len(FIELDS)), dtype=torch.float64, device=device) if opt.stats else None
            scale_address, scale_value = 0, 1.0
            if isinstance(grad_scale, torch.Tensor):
                scale_address = _on(grad_scale, device, keep).data_ptr()
            elif grad_scale is not None:
                scale_value = float(grad_scale)
            getattr(C, f"{rule}_step")(
                **plan.addresses(), grad_scale=scale_address, grad_scale_value=scale_value,
                found_inf=_address(flag), partials=_address(plan.partials) if opt.stats else 0,
                stats=_address(dev_values) if num_blocks else 0, device=device.index, stream=stream.cuda_stream)
            table.write_back(grads=grad_scale is not None)
            if dev_values is not None:
                values = dev_values if values is None else values.add_(dev_values.to(values.device, non_blocking=True))
    except BaseException:  # nothing was enqueued, or the device reported an error: the state goes back
        for door in doors:
            door.rollback()
        raise

    if sharding is not None and values is not None:
        sharding.sum_(values)  # the sums over the local shards become the sums over the whole tensors
    skipped = False if flags[0] is None else flags[0] != 0
    opt.last_stats = None if values is None else BlockStats(names, values, skipped)
    return opt.last_stats
