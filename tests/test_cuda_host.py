"""The host side of pyco's CUDA path, tested without a GPU: what the build reports, the plan and params
buffers that pyco._C_cuda builds for the kernels, device grouping and validation, the errors (invalid
arguments: ValueError; the CUDA runtime: RuntimeError) and the driver check's messages, and the whole Python
launch path (pyco.optim._cuda) driven through a fake device whose "kernels" decode those buffers and run
the CPU kernels on them: it must give the CPU path's results bitwise, upload only what changed, check each
device once, and apply grad_scale / found_inf / the non-finite check / SGD's device init flag on the
"device"."""

from __future__ import annotations

import ctypes
import struct
from array import array

import pytest
import torch
from conftest import make_params, set_grads, tensors_equal

import pyco
from pyco._ext import _C, has_cuda_kernels
from pyco.optim import _cuda

needs_cuda_build = pytest.mark.skipif(not has_cuda_kernels(), reason="pyco was built without its CUDA kernels")

SGD_PARAMS = struct.Struct("<4d2?6xqi4x")  # SgdHyper (lr, momentum, dampening, wd, nesterov, maximize), LrSource
ADAM_PARAMS = struct.Struct("<5d3?5xqi4x")  # AdamHyper (lr, β1, β2, eps, wd, amsgrad, maximize, decoupled), LrSource


def test_info_reports_the_cuda_build():
    info = pyco.info()
    assert info["cuda_kernels"] is has_cuda_kernels()
    if has_cuda_kernels():
        assert info["cuda_architectures"] and info["cuda_version_at_build"]
    else:
        with pytest.raises(RuntimeError, match=r"no CUDA kernels .*PYCO_CUDA=ON pip install"):
            pyco._ext.cuda_kernels()


@needs_cuda_build
def test_params_layout_matches_the_device_structs():
    C = pyco._ext.cuda_kernels()
    assert C.PARAMS_BYTES == {"sgd": SGD_PARAMS.size, "adam": ADAM_PARAMS.size}
    h = _C.AdamHyper(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.5, amsgrad=True, maximize=False,
                     decoupled_weight_decay=True)
    raw = C.adam_params([h, h], lr_addresses=[0, 4096], lr_dtypes=[0, 1])
    assert len(raw) == 2 * ADAM_PARAMS.size
    assert ADAM_PARAMS.unpack_from(raw, ADAM_PARAMS.size) == (0.1, 0.9, 0.99, 1e-8, 0.5, True, False, True, 4096, 1)
    with pytest.raises(ValueError, match="float32 or float64"):
        C.adam_params([h], lr_addresses=[4096], lr_dtypes=[2])


def record(numel, block, address, group=0):
    return [address, address + 8, 0, 0, 0, 0, numel, 0, group, block]


def raises_cuda_error(match):
    """A failure of the CUDA runtime: pyco._C_cuda.CudaError, a RuntimeError and not a ValueError."""
    C = pyco._ext.cuda_kernels()

    class Check:
        def __enter__(self):
            self.raises = pytest.raises(C.CudaError, match=match)
            self.info = self.raises.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.raises.__exit__(*exc)
            assert isinstance(self.info.value, RuntimeError) and not isinstance(self.info.value, ValueError)
            return handled

    return Check()


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="calls the kernels with made-up addresses")
def test_launches_are_validated_before_the_device_is_touched():
    """Invalid arguments are ValueErrors raised before any CUDA call; with valid ones the first CUDA call
    fails here (no driver), and that is a RuntimeError."""
    C = pyco._ext.cuda_kernels()
    ok = dict(plan=64, num_records=1, num_chunks=1, num_blocks=1, dtypes=1, params=64, num_groups=1, partials=64,
              stats=64, device=0, stream=0)
    for name in ("sgd_step", "adam_step"):
        with raises_cuda_error("pyco CUDA: cudaGetDevice"):  # validation passed; no driver here
            getattr(C, name)(**ok)
        with pytest.raises(ValueError, match=r"statistics need a partials buffer"):
            getattr(C, name)(**{**ok, "partials": 0})
        with pytest.raises(ValueError, match=r"missing params"):
            getattr(C, name)(**{**ok, "params": 0})
        with pytest.raises(ValueError, match=r"grad_scale must be > 0"):
            getattr(C, name)(**ok, grad_scale_value=0.0)
    with raises_cuda_error("cudaGetDevice"):
        C.flag_nonfinite(flag=64, plan=64, num_records=1, num_chunks=1, num_blocks=1, device=0, stream=0)
    with pytest.raises(ValueError, match="missing flag"):
        C.flag_nonfinite(flag=0, plan=64, num_records=1, num_chunks=1, num_blocks=1, device=0, stream=0)
    with raises_cuda_error("cudaGetDevice"):
        C.upload(64, b"x", device=0, stream=0)
    with pytest.raises(ValueError, match="missing address"):
        C.upload(0, b"x", device=0, stream=0)
    with raises_cuda_error("cudaGetDevice"):
        C.stream_is_capturing(0, 0)
    assert C.device_count() == 0


# ---- the driver/device check ----------------------------------------------------------------------------

@needs_cuda_build
def test_driver_problems_say_what_to_install():
    """The verdicts of check_device on made-up facts (a pure function)."""
    C = pyco._ext.cuda_kernels()
    old = C.driver_problem(driver_version=12040, runtime_version=13000, device_count=1, kernel_module="550.54.15")
    assert old.startswith("pyco CUDA: the NVIDIA driver is 550.54.15 (for CUDA 12.4); pyco's CUDA kernels were "
                          "built with CUDA 13.0 and need driver >= 580: update the driver, or rebuild pyco against "
                          "the CUDA toolkit your driver supports (`CUDACXX=")
    assert old.endswith("pip install .`), or use torch.optim")
    unknown = C.driver_problem(driver_version=12080, runtime_version=13000, device_count=1)
    assert "the NVIDIA driver is one for CUDA 12.8; " in unknown and "driver >= 580" in unknown
    assert "need driver >= 525" in C.driver_problem(driver_version=11080, runtime_version=12040, device_count=1)
    assert "need a driver for CUDA 14.0 or newer" in C.driver_problem(driver_version=13000, runtime_version=14000,
                                                                      device_count=1)
    none = C.driver_problem(driver_version=0, runtime_version=13000, device_count=0)
    assert "no NVIDIA driver was found" in none and "install the NVIDIA driver" in none and "580" in none
    no_device = C.driver_problem(driver_version=13000, runtime_version=13000, device_count=0,
                                 count_error="cudaErrorNoDevice: no CUDA-capable device is detected")
    assert "reports no CUDA device (cudaGetDeviceCount: cudaErrorNoDevice: no CUDA-capable device" in no_device
    assert "CUDA_VISIBLE_DEVICES" in no_device
    assert C.driver_problem(driver_version=13000, runtime_version=13000, device_count=2, device=2) == (
        "pyco CUDA: CUDA device 2 does not exist: the runtime sees 2 device(s)")
    # usable: the same major version (minor-version compatibility) or a newer driver
    for driver, runtime in [(13000, 13000), (13000, 13010), (13020, 13000), (14000, 13000), (12090, 12000)]:
        assert C.driver_problem(driver_version=driver, runtime_version=runtime, device_count=1) == "", (driver, runtime)


@needs_cuda_build
def test_check_device_raises_the_verdict_on_this_machine():
    """check_device reads the real facts: it raises exactly driver_problem's message (a RuntimeError) when
    there is one, as on a machine without a driver or GPU, and passes otherwise."""
    C = pyco._ext.cuda_kernels()
    facts = C.driver_facts()
    assert facts["runtime_version"] // 1000 >= 11 and facts["minimum_driver"] > 0
    verdict = C.driver_problem(**{k: facts[k] for k in ("driver_version", "runtime_version", "device_count",
                                                         "count_error", "kernel_module")}, device=0)
    if verdict:
        with raises_cuda_error(None) as info:
            C.check_device(0)
        assert str(info.value) == verdict
    else:
        C.check_device(0)


@needs_cuda_build
def test_plan_sorts_records_by_block_and_counts_chunks():
    C = pyco._ext.cuda_kernels()
    chunk = C.CHUNK_ELEMS
    table = array("q", record(5, 1, 64) + record(2 * chunk + 1, 0, 128) + record(0, 1, 192) + record(chunk, 1, 256))
    hyper = _C.SgdHyper(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    plan, num_chunks, dtypes = C.sgd_plan(table, [hyper], num_blocks=3)
    words = array("q", plan)
    assert num_chunks == 5 and dtypes == 1 << _C.DTYPE_CODES["float32"] and len(words) == 4 * 10 + 5 + 4 + 5
    assert [words[10 * i] for i in range(4)] == [128, 64, 192, 256]  # block 0, then block 1 in table order
    assert list(words[40:45]) == [0, 3, 4, 4, 5]  # first chunk of each record, then the total
    assert list(words[45:49]) == [0, 3, 5, 5]  # first chunk of each block (block 2 is empty)
    assert list(words[49:54]) == [0, 0, 0, 1, 3]  # the record of each chunk (record 2 has none)
    with pytest.raises(ValueError, match=r"tensor 1: block index 3 out of range"):
        C.sgd_plan(array("q", record(5, 0, 64) + record(5, 3, 64)), [hyper], num_blocks=3)
    momentum = _C.SgdHyper(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    with pytest.raises(ValueError, match="missing optimizer state"):
        C.sgd_plan(table, [momentum], num_blocks=3)


@needs_cuda_build
def test_staging_pool_reports_its_limits():
    """The pinned staging pool's counters and limits (the bound itself is tested with a fake device in
    csrc/tests/test_cuda_rules.cu and on a GPU in tests/test_cuda.py)."""
    C = pyco._ext.cuda_kernels()
    stats = C.staging_stats()
    assert set(stats) == {"buffers", "bytes", "captured", "captured_bytes", "allocations", "frees", "waits",
                          "max_buffers", "max_bytes"}
    assert stats["buffers"] <= stats["max_buffers"] and stats["allocations"] - stats["frees"] == stats["buffers"]
    previous = C.set_staging_limits(3, 1 << 20)
    try:
        assert previous == (stats["max_buffers"], stats["max_bytes"])
        assert C.staging_stats()["max_buffers"] == 3 and C.staging_stats()["max_bytes"] == 1 << 20
        with pytest.raises(ValueError, match="staging limits must be >= 1"):
            C.set_staging_limits(0, 1 << 20)
    finally:
        C.set_staging_limits(*previous)
    assert C.set_staging_limits(*previous) == previous


# ---- device grouping and validation ---------------------------------------------------------------------

def test_split_by_device_keeps_every_group():
    a, b = torch.zeros(2), torch.zeros(3, device="meta")
    c = torch.zeros(4)
    work = [(0, {}, [(0, a, a), (1, b, b)]), (1, {}, [(0, c, c)])]  # (param index, param, grad)
    parts = _cuda.split_by_device(work)
    assert [d.type for d, _ in parts] == ["cpu", "meta"]
    cpu_part, meta_part = parts[0][1], parts[1][1]
    assert [len(triples) for _, _, triples in cpu_part] == [1, 1] and cpu_part[1][2][0][1] is c
    assert [len(triples) for _, _, triples in meta_part] == [1, 0] and meta_part[0][2][0][1] is b
    assert _cuda.split_by_device(work[1:]) == [(torch.device("cpu"), work[1:])]


def test_cpu_and_cuda_parameters_in_one_step_are_refused_by_name():
    params = make_params([(3,), (2, 2)])
    opt = pyco.optim.SGD(params, lr=0.1)
    parts = [(torch.device("cpu"), [(0, opt.param_groups[0], [(0, params[0], params[0])])]),
             (torch.device("cuda", 0), [(0, opt.param_groups[0], [(1, params[1], params[1])])])]
    with pytest.raises(ValueError, match=r"param 0 of group 0 \(shape \[3\].* on cpu and param 1 of group 0 "
                                         r"\(shape \[2, 2\].* on cuda:0.*one optimizer per device"):
        _cuda.check_devices(opt, parts)


def test_parameters_on_other_devices_are_refused():
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"param 0 of group 0 .* is on meta, but pyco has CPU and CUDA kernels only"):
        pyco.optim.Adam([p])


def test_capturable_needs_cuda_parameters():
    with pytest.raises(ValueError, match=r"capturable=True needs pyco's CUDA kernels"):
        pyco.optim.Adam(make_params([(3,)]), capturable=True)


def test_device_lr_is_checked_without_reading_it():
    lr = torch.tensor(0.1, device="meta")  # a device tensor whose value cannot be read at all
    pyco.optim.Adam._check_group(dict(lr=lr, eps=1e-8, betas=(0.9, 0.999), weight_decay=0.0))
    with pytest.raises(ValueError, match="must be 1-element"):
        pyco.optim.Adam._check_group(dict(lr=torch.zeros(2, device="meta"), eps=1e-8, betas=(0.9, 0.999),
                                          weight_decay=0.0))


# ---- the launch path through a fake device ------------------------------------------------------------

def read(address: int, fmt: str):
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, ctypes.string_at(address, size))[0]


def fields(records: array, r: int) -> slice:
    return slice(10 * r, 10 * r + 10)


STEP_FIELD, CODES_FIELD = 5, 7


class FakeDevice:
    """pyco._C_cuda with its kernels replaced by host emulations over the same buffers (host memory here):
    the plan and params are decoded and the CPU kernels run on the records they hold."""

    def __init__(self, real, capturing=False):
        self.real = real
        self.no_device = real.device_count() == 0
        self.capturing = capturing
        self.uploads = []  # sizes
        self.launches = 0
        self.checked = []  # devices passed to check_device
        self.unusable = None  # a message: check_device raises it as the real one would
        self.CHUNK_ELEMS, self.PARAMS_BYTES = real.CHUNK_ELEMS, real.PARAMS_BYTES
        self.FLAG_MOMENTUM_INIT_FLAG = real.FLAG_MOMENTUM_INIT_FLAG
        self.sgd_plan, self.adam_plan = real.sgd_plan, real.adam_plan
        self.sgd_params, self.adam_params = real.sgd_params, real.adam_params

    def upload(self, dst, data, *, device, stream):
        self.uploads.append(len(data))
        ctypes.memmove(dst, bytes(data), len(data))

    def stream_is_capturing(self, device, stream):
        return self.capturing

    def check_device(self, device):
        self.checked.append(device)
        if self.unusable:
            raise self.real.CudaError(self.unusable)

    def records(self, plan, num_records):
        return array("q", ctypes.string_at(plan, num_records * 80)) if num_records else array("q")

    def check_arguments(self, name, **kw):
        """Without a device, the real function must accept the arguments and fail only where it starts
        talking to the driver: its validation passed."""
        if self.no_device:
            with raises_cuda_error("pyco CUDA: cudaGetDevice"):
                getattr(self.real, name)(**{**kw, "device": 0})

    def flag_nonfinite(self, *, flag, plan, num_records, num_chunks, num_blocks, device, stream):
        self.check_arguments("flag_nonfinite", flag=flag, plan=plan, num_records=num_records,
                             num_chunks=num_chunks, num_blocks=num_blocks, device=device, stream=stream)
        if not _C.grads_all_finite(self.records(plan, num_records), num_threads=1):
            ctypes.memmove(flag, struct.pack("<f", 1.0), 4)

    def _step(self, rule, layout, kernel, *, plan, num_records, num_chunks, num_blocks, dtypes, params, num_groups,
              grad_scale, grad_scale_value, found_inf, partials, stats, device, stream):
        self.launches += 1
        assert num_chunks == 0 or partials or not stats
        if found_inf and read(found_inf, "<f") != 0.0:
            if stats:
                ctypes.memset(stats, 0, num_blocks * 32)
            return
        hypers = []
        for g in range(num_groups):
            fields = layout.unpack(ctypes.string_at(params + g * layout.size, layout.size))
            lr_address, lr_dtype = fields[-2:]
            lr = read(lr_address, "<d" if lr_dtype == 1 else "<f") if lr_address else fields[0]
            if rule == "sgd":
                hypers.append(_C.SgdHyper(lr=lr, momentum=fields[1], dampening=fields[2], weight_decay=fields[3],
                                          nesterov=fields[4], maximize=fields[5]))
            else:
                hypers.append(_C.AdamHyper(lr=lr, beta1=fields[1], beta2=fields[2], eps=fields[3],
                                           weight_decay=fields[4], amsgrad=fields[5], maximize=fields[6],
                                           decoupled_weight_decay=fields[7]))
        scale = read(grad_scale, "<f") if grad_scale else grad_scale_value
        records, init_flags = self.host_flags(self.records(plan, num_records))
        kernel(records, hypers, grad_scale=scale, stats=stats, num_blocks=num_blocks, num_threads=1)
        for address in init_flags:  # the finalize kernel's work, in a step that was applied
            ctypes.memmove(address, struct.pack("<i", 1), 4)

    def host_flags(self, records: array) -> tuple[array, list[int]]:
        """SGD's device init flag (kFlagMomentumInitFlag: `step` holds an int32's address, the buffer is fresh
        iff it is 0) as the CPU kernel's host flag; returns the records and the flags' addresses."""
        init, fresh = self.FLAG_MOMENTUM_INIT_FLAG << 16, _C.FLAG_FRESH_MOMENTUM << 16
        addresses = []
        for r in range(len(records) // 10):
            rec = records[fields(records, r)]
            if rec[CODES_FIELD] & init:
                addresses.append(rec[STEP_FIELD])
                rec[CODES_FIELD] = rec[CODES_FIELD] & ~init | (fresh if read(rec[STEP_FIELD], "<i") == 0 else 0)
                rec[STEP_FIELD] = 0
                records[fields(records, r)] = rec
        return records, addresses

    def sgd_step(self, **kw):
        self.check_arguments("sgd_step", **kw)
        self._step("sgd", SGD_PARAMS, _C.sgd_step, **kw)

    def adam_step(self, **kw):
        self.check_arguments("adam_step", **kw)
        self._step("adam", ADAM_PARAMS, _C.adam_step, **kw)


class Stream:
    cuda_stream = 0


@pytest.fixture
def fake_device(monkeypatch):
    fake = FakeDevice(pyco._ext.cuda_kernels())
    monkeypatch.setattr(_cuda, "cuda_kernels", lambda: fake)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(_cuda, "check_devices", lambda opt, parts: None)  # CPU tensors play the device's
    monkeypatch.setattr(_cuda, "_USABLE_DEVICES", set())
    return fake


def device_step(opt):
    """What FusedOptimizer.step does for CUDA parameters, on these CPU ones."""
    return _cuda.launch(opt, opt._collect()[0], opt._block_names, opt._block_index)


CASES = [
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.99))),
]
SHAPES = [(4097,), (3,), (), (0,), (70000,), (2, 3)]


@needs_cuda_build
@pytest.mark.parametrize("kind, hyper", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_path_matches_the_cpu_path(fake_device, kind, hyper, dtype):
    ours, theirs = make_params(SHAPES, dtype, seed=1), make_params(SHAPES, dtype, seed=1)
    blocks = lambda ps: {"a": [ps[4], ps[0]], "b": [ps[1], ps[2], ps[3]], "c": [ps[5]]}  # noqa: E731
    opt = getattr(pyco.optim, kind)(ours, blocks=blocks(ours), **hyper)
    ref = getattr(pyco.optim, kind)(theirs, blocks=blocks(theirs), **hyper)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        set_grads([ours, theirs], step, gen, has_grad=lambda s, i: i != 5 or s % 2 == 0)
        device_step(opt)
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert tensors_equal(a.detach(), b.detach()), f"step {step}: param {i}"
            for key, value in ref.state[b].items():
                assert tensors_equal(opt.state[a][key], value), f"step {step}: param {i} state {key}"
        assert tensors_equal(opt.last_stats.values, ref.last_stats.values), f"step {step}: statistics"
        assert opt.last_stats.skipped is False


@needs_cuda_build
def test_unchanged_buffers_are_not_uploaded_again(fake_device):
    params = make_params([(5,), (7,)], torch.float32)
    opt = pyco.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    device_step(opt)
    assert len(fake_device.uploads) == 2  # plan and params
    device_step(opt)
    assert len(fake_device.uploads) == 3  # the momentum buffers are no longer fresh: a new plan
    device_step(opt)
    assert len(fake_device.uploads) == 3
    opt.param_groups[0]["lr"] = 0.05
    device_step(opt)
    assert fake_device.uploads[3:] == [fake_device.PARAMS_BYTES["sgd"]]  # params only
    params[1].grad = torch.ones_like(params[1])  # a new gradient tensor: a new plan
    device_step(opt)
    assert len(fake_device.uploads) == 5
    assert fake_device.launches == 5


@needs_cuda_build
def test_buffers_read_by_a_captured_graph_are_kept(fake_device):
    params = make_params([(5,)], torch.float32)
    opt = pyco.optim.Adam(params, lr=0.1)
    params[0].grad = torch.ones_like(params[0])
    device_step(opt)
    plan = opt._device_plans[torch.device("cpu")]
    assert plan.keep == []
    fake_device.capturing = True
    device_step(opt)
    kept = list(plan.keep)
    assert {id(t) for t in kept} == {id(plan.plan), id(plan.params), id(plan.partials)}
    fake_device.capturing = False
    opt.param_groups[0]["lr"] = 0.2
    device_step(opt)
    assert plan.keep == kept and plan.params is not kept[1]


@needs_cuda_build
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_grad_scale_and_found_inf_are_read_on_the_device(fake_device, found):
    ours, theirs = make_params([(4097,), (3,)], torch.float32), make_params([(4097,), (3,)], torch.float32)
    opt, ref = pyco.optim.Adam(ours, lr=0.01), pyco.optim.Adam(theirs, lr=0.01)
    gen = torch.Generator().manual_seed(3)
    set_grads([ours, theirs], 0, gen, scale=1024.0)
    before = [p.detach().clone() for p in ours]
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(found)
    stats = device_step(opt)
    assert isinstance(stats.skipped, torch.Tensor) and bool(stats.skipped) == bool(found)
    assert opt.skipped_steps == 0  # decided on the device: not counted
    if found:
        assert all(tensors_equal(p.detach(), b) for p, b in zip(ours, before))
        assert opt.state[ours[0]]["step"].item() == 0 and not stats.values.any()
        return
    ref.grad_scale = 1024.0
    ref.step()
    for a, b in zip(ours, theirs):
        assert tensors_equal(a.detach(), b.detach()) and tensors_equal(a.grad, b.grad)
    assert tensors_equal(stats.values, ref.last_stats.values)


@needs_cuda_build
def test_nonfinite_skip_is_decided_on_the_device(fake_device):
    params = make_params([(4097,), (3,)], torch.float32)
    opt = pyco.optim.SGD(params, lr=0.1, nonfinite="skip")
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[1] = float("inf")
    before = [p.detach().clone() for p in params]
    stats = device_step(opt)
    assert bool(stats.skipped) and all(tensors_equal(p.detach(), b) for p, b in zip(params, before))
    params[1].grad[1] = 1.0
    stats = device_step(opt)
    assert not bool(stats.skipped) and not torch.equal(params[0].detach(), before[0])


@needs_cuda_build
def test_each_device_is_checked_once(fake_device):
    params = make_params([(5,)], torch.float32)
    opt = pyco.optim.Adam(params, lr=0.1)
    params[0].grad = torch.ones_like(params[0])
    for _ in range(3):
        device_step(opt)
    pyco.optim.Adam(params, lr=0.1)  # another optimizer on the same device: no second check
    device_step(opt)
    assert fake_device.checked == [None]  # the fake's "device" is the CPU: index None
    assert fake_device.launches == 4


@needs_cuda_build
def test_an_unusable_device_stops_the_step_and_is_checked_again(fake_device):
    params = make_params([(5,)], torch.float32)
    opt = pyco.optim.Adam(params, lr=0.1)
    params[0].grad = torch.ones_like(params[0])
    before = params[0].detach().clone()
    fake_device.unusable = "pyco CUDA: the NVIDIA driver is 550.54.15 (for CUDA 12.4); ..."
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"driver is 550\.54\.15"):
            device_step(opt)
    assert fake_device.checked == [None, None] and fake_device.launches == 0 and not fake_device.uploads
    assert tensors_equal(params[0].detach(), before) and not opt.state.get(params[0])
    fake_device.unusable = None
    device_step(opt)
    device_step(opt)
    assert fake_device.checked == [None, None, None] and fake_device.launches == 2


class OnFakeDevice:
    """Mixed into a pyco optimizer: its (CPU) parameters count as CUDA ones, so that ``step()`` takes the
    CUDA path, planned launches and SGD's device init flags included, on the fake device."""

    @staticmethod
    def _uses_cuda_kernels(p):
        return True

    @property
    def init_flags(self):
        return self._momentum_initialized


class DeviceFlagSGD(OnFakeDevice, pyco.optim.SGD):
    """pyco's SGD as on a CUDA device: its momentum records carry the device init flag (one int32 per
    momentum buffer, 0 until a step is applied to it; the kernels set it) in the record's `step` field, flag
    bit FLAG_MOMENTUM_INIT instead of the host's FLAG_FRESH_MOMENTUM."""


@needs_cuda_build
@pytest.mark.parametrize("skip", ["found_inf", "nonfinite"])
def test_sgd_first_step_skipped_on_the_device_keeps_the_buffer_fresh(fake_device, skip):
    """A first step skipped on the device (GradScaler's found_inf, nonfinite="skip") leaves the device init
    flags at 0: the next step sets the momentum buffers to d, so it equals torch.optim.SGD's first step
    (b = d), not b = μ·0 + (1 − τ)·d; later steps follow torch's."""
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01)
    shapes = [(4097,), (3,)]
    ours, theirs = make_params(shapes, torch.float32, seed=21), make_params(shapes, torch.float32, seed=21)
    opt = DeviceFlagSGD(ours, nonfinite="skip" if skip == "nonfinite" else "apply", **hyper)
    ref = torch.optim.SGD(theirs, foreach=False, **hyper)
    gen = torch.Generator().manual_seed(22)
    set_grads([ours], 0, gen)
    if skip == "found_inf":
        opt.found_inf = torch.tensor(1.0)
    else:
        ours[1].grad[0] = float("inf")
    before = [p.detach().clone() for p in ours]
    assert bool(device_step(opt).skipped)
    assert all(tensors_equal(p.detach(), b) for p, b in zip(ours, before))
    assert [int(opt.init_flags[p]) for p in ours] == [0, 0]
    if skip == "found_inf":
        opt.found_inf = torch.tensor(0.0)
    for step in (1, 2):
        set_grads([ours, theirs], step, gen)
        assert not bool(device_step(opt).skipped)
        ref.step()
        assert [int(opt.init_flags[p]) for p in ours] == [1, 1]
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"],
                                       rtol=1e-6, atol=1e-7, msg=f"step {step}: momentum buffer of param {i}")
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step}: param {i}")


@needs_cuda_build
def test_device_init_flags_keep_the_plan(fake_device):
    """With the flag on the device the records do not change after the first step: nothing is uploaded
    again (with the host flag the plan changes once, when the buffers stop being fresh)."""
    params = make_params([(5,), (7,)], torch.float32)
    opt = DeviceFlagSGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(3):
        device_step(opt)
    assert len(fake_device.uploads) == 2 and fake_device.launches == 3  # plan and params, once
    plan = opt._device_plans[torch.device("cpu")]
    assert plan.dtypes & fake_device.real.PLAN_INIT_FLAGS


@needs_cuda_build
def test_a_buffer_no_applied_step_initialized_is_left_out_of_the_state_dict(fake_device):
    """Every step since the buffers were made was skipped on the device: torch would have no momentum
    buffer, so the state_dict has none either (and loads into torch.optim.SGD as a fresh start)."""
    params = make_params([(5,), (7,)], torch.float32)
    opt = DeviceFlagSGD(params, lr=0.1, momentum=0.9, dampening=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.tensor(1.0)
    device_step(opt)
    assert all("momentum_buffer" in opt.state[p] for p in params)  # made for the step, left as zeros
    assert all("momentum_buffer" not in entry for entry in opt.state_dict()["state"].values())
    opt.found_inf = torch.tensor(0.0)
    device_step(opt)
    state = opt.state_dict()["state"]
    assert all(torch.equal(state[i]["momentum_buffer"], torch.ones_like(p)) for i, p in enumerate(params))
    opt.load_state_dict(opt.state_dict())
    assert opt.init_flags == {}  # loaded buffers are initialized ones


@needs_cuda_build
@pytest.mark.parametrize("kind, hyper", CASES)
def test_planned_device_steps_match_the_cpu_path(fake_device, kind, hyper):
    """step() on the (fake) device: prepared once, then planned; bitwise the CPU path's results."""
    ours, theirs = make_params(SHAPES, torch.float32, seed=3), make_params(SHAPES, torch.float32, seed=3)
    opt = type(f"Device{kind}", (OnFakeDevice, getattr(pyco.optim, kind)), {})(ours, **hyper)
    ref = getattr(pyco.optim, kind)(theirs, **hyper)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        set_grads([ours, theirs], step, gen)
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert tensors_equal(a.detach(), b.detach()), f"step {step}: param {i}"
        assert tensors_equal(opt.last_stats.values, ref.last_stats.values), f"step {step}: statistics"
    assert opt._launches == {"prepared": 1, "planned": 3}
