"""The host side of pyco's CUDA path, tested without a GPU: what the build reports, the plan and params
buffers that pyco._C_cuda builds for the kernels, device grouping and validation, and the whole Python
launch path (pyco.optim._cuda) driven through a fake device whose "kernels" decode those buffers and run
the CPU kernels on them: it must give the CPU path's results bitwise, upload only what changed, and apply
grad_scale / found_inf / the non-finite check on the "device"."""

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


@needs_cuda_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="calls the kernels with made-up addresses")
def test_launches_are_validated_before_the_device_is_touched():
    C = pyco._ext.cuda_kernels()
    ok = dict(plan=64, num_records=1, num_chunks=1, num_blocks=1, dtypes=1, params=64, num_groups=1, partials=64,
              stats=64, device=0, stream=0)
    for name in ("sgd_step", "adam_step"):
        with pytest.raises(ValueError, match="cudaGetDevice"):  # validation passed; no driver here
            getattr(C, name)(**ok)
        with pytest.raises(ValueError, match=r"statistics need a partials buffer"):
            getattr(C, name)(**{**ok, "partials": 0})
        with pytest.raises(ValueError, match=r"missing params"):
            getattr(C, name)(**{**ok, "params": 0})
        with pytest.raises(ValueError, match=r"grad_scale must be > 0"):
            getattr(C, name)(**ok, grad_scale_value=0.0)
    with pytest.raises(ValueError, match="cudaGetDevice"):
        C.flag_nonfinite(flag=64, plan=64, num_records=1, num_chunks=1, num_blocks=1, device=0, stream=0)
    with pytest.raises(ValueError, match="missing flag"):
        C.flag_nonfinite(flag=0, plan=64, num_records=1, num_chunks=1, num_blocks=1, device=0, stream=0)


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


# ---- device grouping and validation ---------------------------------------------------------------------

def test_split_by_device_keeps_every_group():
    a, b = torch.zeros(2), torch.zeros(3, device="meta")
    c = torch.zeros(4)
    work = [(0, {}, [(a, a), (b, b)]), (1, {}, [(c, c)])]
    parts = _cuda.split_by_device(work)
    assert [d.type for d, _ in parts] == ["cpu", "meta"]
    cpu_part, meta_part = parts[0][1], parts[1][1]
    assert [len(pairs) for _, _, pairs in cpu_part] == [1, 1] and cpu_part[1][2][0][0] is c
    assert [len(pairs) for _, _, pairs in meta_part] == [1, 0] and meta_part[0][2][0][0] is b
    assert _cuda.split_by_device(work[1:]) == [(torch.device("cpu"), work[1:])]


def test_cpu_and_cuda_parameters_in_one_step_are_refused_by_name():
    params = make_params([(3,), (2, 2)])
    opt = pyco.optim.SGD(params, lr=0.1)
    parts = [(torch.device("cpu"), [(0, opt.param_groups[0], [(params[0], params[0])])]),
             (torch.device("cuda", 0), [(0, opt.param_groups[0], [(params[1], params[1])])])]
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


class FakeDevice:
    """pyco._C_cuda with its kernels replaced by host emulations over the same buffers (host memory here):
    the plan and params are decoded and the CPU kernels run on the records they hold."""

    def __init__(self, real, capturing=False):
        self.real = real
        self.no_device = real.device_count() == 0
        self.capturing = capturing
        self.uploads = []  # sizes
        self.launches = 0
        self.CHUNK_ELEMS, self.PARAMS_BYTES = real.CHUNK_ELEMS, real.PARAMS_BYTES
        self.sgd_plan, self.adam_plan = real.sgd_plan, real.adam_plan
        self.sgd_params, self.adam_params = real.sgd_params, real.adam_params

    def upload(self, dst, data, *, device, stream):
        self.uploads.append(len(data))
        ctypes.memmove(dst, bytes(data), len(data))

    def stream_is_capturing(self, device, stream):
        return self.capturing

    def records(self, plan, num_records):
        return array("q", ctypes.string_at(plan, num_records * 80)) if num_records else array("q")

    def check_arguments(self, name, **kw):
        """Without a device, the real function must accept the arguments and fail only where it starts
        talking to the driver: its validation passed."""
        if self.no_device:
            with pytest.raises(ValueError, match="pyco CUDA: cudaGetDevice"):
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
        kernel(self.records(plan, num_records), hypers, grad_scale=scale, stats=stats, num_blocks=num_blocks,
               num_threads=1)

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
    return fake


def device_step(opt):
    """What FusedOptimizer.step does for CUDA parameters, on these CPU ones."""
    return _cuda.launch(opt, opt._collect(), opt._block_names, opt._block_index)


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
