"""pyco's CUDA kernels on a GPU: parity with torch.optim on CUDA, agreement with pyco's CPU kernels, CUDA-graph
capture and replay, GradScaler, reduced precision, 64-bit indexing, streams, determinism, no host
synchronization. Skipped without a GPU (tests/test_cuda_host.py covers the host side everywhere)."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from conftest import (TOL, assert_close_report, assert_state_match, grad_like, make_params, run_side_by_side,
                      run_with_float64_twin, set_grads, tensors_equal)
from test_parity import CONFIGS, HALF_CASES, STEPS, build, config_id
from test_stats import assert_stats_close

import pyco
from pyco._ext import has_cuda_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def on_cuda(t: torch.Tensor) -> torch.Tensor:
    return t.to(CUDA)


def cuda_params(shapes, dtype=torch.float32, seed=0):
    return make_params(shapes, dtype, seed, layout=on_cuda)


def test_cuda_kernels_are_built():
    assert has_cuda_kernels(), "a GPU is present but pyco was built without its CUDA kernels (PYCO_CUDA=ON)"
    assert pyco.info()["cuda_kernels"] is True


# ---- parity with torch.optim on CUDA -------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_random_configs_match_torch_on_cuda(config):
    ours, opt_ours, theirs, opt_theirs = build(config["kind"], config["groups"], config["dtype"], config["ref"],
                                               layout=on_cuda)
    last = len(ours) - 1
    has_grad = (lambda step, i: i != 0 and (i != last or step % 2 == 0)) if config["intermittent"] else \
        (lambda step, i: i != 0)
    run_side_by_side(opt_ours, ours, opt_theirs, theirs, STEPS, seed=1, has_grad=has_grad)
    assert_state_match(opt_ours, ours, opt_theirs, theirs, *TOL[config["dtype"]], check_step_dtype=False)
    assert ours[0] not in opt_ours.state
    assert opt_ours.last_stats.values.device.type == "cuda"
    if config["kind"] != "SGD":
        step = opt_ours.state[ours[last]]["step"]
        assert step.device.type == "cuda" and step.dtype == torch.float32
        assert step.item() == ((STEPS + 1) // 2 if config["intermittent"] else STEPS)


# ---- CPU and GPU kernels agree -------------------------------------------------------------------------

AGREEMENT = [
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.99), maximize=True)),
]
SHAPES = [(4097,), (3,), (), (0,), (70001,), (64, 33), (1,)]


def reference_stats(blocks, before: dict, grads: dict) -> torch.Tensor:
    """[k, 4] float64 on the CPU: Σg², Σu², Σg·u, Σθ² per block (tensors on any device)."""
    rows = torch.zeros(len(blocks), 4, dtype=torch.float64)
    for b, members in enumerate(blocks):
        for p in members:
            if grads[id(p)] is None:
                continue
            g, theta = grads[id(p)].double().cpu().reshape(-1), before[id(p)].double().cpu().reshape(-1)
            u = p.detach().double().cpu().reshape(-1) - theta
            rows[b] += torch.stack([(g * g).sum(), (u * u).sum(), (g * u).sum(), (theta * theta).sum()])
    return rows


def blocks_of(params):
    return {"big": [params[4], params[0]], "small": [params[1], params[2], params[3], params[6]],
            "matrix": [params[5]]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind, hyper", AGREEMENT)
def test_cpu_and_gpu_kernels_agree(kind, hyper, dtype):
    """Same IEEE operations in the same order (no FMA contraction on either side): SGD agrees bitwise; Adam
    to an ulp (its bias corrections use the device's pow). Statistics agree to rounding."""
    cpu, gpu = make_params(SHAPES, dtype, seed=3), cuda_params(SHAPES, dtype, seed=3)
    opt_cpu = getattr(pyco.optim, kind)(cpu, blocks=blocks_of(cpu), **hyper)
    opt_gpu = getattr(pyco.optim, kind)(gpu, blocks=blocks_of(gpu), **hyper)
    gen = torch.Generator().manual_seed(4)
    eps = torch.finfo(dtype).eps
    for step in range(6):
        set_grads([cpu], step, gen, has_grad=lambda s, i: i != 6 or s % 2 == 0)
        for a, b in zip(cpu, gpu):
            b.grad = None if a.grad is None else on_cuda(a.grad)
        before = {id(p): p.detach().clone() for p in gpu}
        grads = {id(p): None if p.grad is None else p.grad.clone() for p in gpu}
        opt_cpu.step()
        opt_gpu.step()
        for i, (a, b) in enumerate(zip(cpu, gpu)):
            if kind == "SGD":
                assert tensors_equal(a.detach(), b.detach().cpu()), f"step {step}: param {i} differs"
            else:
                assert_close_report(b.detach().cpu(), a.detach(), 2 * eps, 1e-12, f"step {step}: param {i}")
        expected = reference_stats([list(ps) for ps in blocks_of(gpu).values()], before, grads)
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        assert_stats_close(opt_gpu.last_stats.values.cpu(), expected, rtol, f"step {step}")
        if kind == "SGD":  # same trajectory: same sums up to their order
            assert_stats_close(opt_gpu.last_stats.values.cpu(), opt_cpu.last_stats.values, rtol, f"step {step}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind, hyper", HALF_CASES)
def test_reduced_precision_parameters(dtype, kind, hyper):
    """bf16/f16 storage with float32 arithmetic, rounded once per stored value, held against a float64 run on
    the same (rounded) gradients, as on the CPU: pyco's error is no larger than that of torch's own CUDA
    implementation (fused Adam/AdamW, for-loop SGD), and small. (Not an ulp of torch's fused CUDA Adam: it
    computes its bias corrections in double and rounds differently.)"""
    shapes = [(4097,), (17,), ()]
    ours, theirs = cuda_params(shapes, dtype, seed=5), cuda_params(shapes, dtype, seed=5)
    opt_ours = getattr(pyco.optim, kind)(ours, **hyper)
    opt_theirs = getattr(torch.optim, kind)(theirs, fused=kind != "SGD", foreach=False if kind == "SGD" else None,
                                            **hyper)
    wide = run_with_float64_twin(kind, hyper, opt_ours, ours, opt_theirs, theirs, STEPS, seed=6)
    eps = torch.finfo(dtype).eps
    for i, (a, b, w) in enumerate(zip(ours, theirs, wide)):
        err_ours = (a.detach().double() - w.detach()).abs().max().item() if a.numel() else 0.0
        err_theirs = (b.detach().double() - w.detach()).abs().max().item() if a.numel() else 0.0
        assert err_ours <= 1.5 * err_theirs + 2 * eps, f"param {i}: pyco {err_ours:.3g} vs torch {err_theirs:.3g}"
        assert_close_report(a.detach().double(), w.detach(), 8 * eps, STEPS * eps, f"param {i} vs float64")


# ---- CUDA graphs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, hyper", [
    ("Adam", dict(amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(betas=(0.8, 0.99))),
    ("SGD", dict(momentum=0.9, nesterov=True)),
])
def test_cuda_graph_capture_and_replay(kind, hyper):
    """capturable=True (Adam) with a device lr: each replay is one more correct step, the step counters
    advance on the device, the lr tensor's new values are used, and last_stats follows the replays."""
    shapes = [(4097,), (3,), (70001,)]
    ours, theirs = cuda_params(shapes, seed=7), cuda_params(shapes, seed=7)
    lr = torch.tensor(0.01, device=CUDA)
    extra = dict(capturable=True) if kind != "SGD" else {}
    opt = getattr(pyco.optim, kind)(ours, lr=lr, **extra, **hyper)
    ref = getattr(torch.optim, kind)(theirs, lr=0.01, foreach=False, **hyper)
    for p in ours:
        p.grad = torch.zeros_like(p)  # static gradients: the graph reads these buffers
    gen = torch.Generator().manual_seed(8)
    lrs = [0.01, 0.01, 0.01] + [0.01 * 0.9 ** k for k in range(1, 8)]

    def new_grads():
        grads = [grad_like(p, gen) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad.copy_(g)
            q.grad = g.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(3):  # eager warm-up: state is created here, not in the graph
            new_grads()
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    stats = opt.last_stats
    seen = []
    for k in range(3, len(lrs)):
        new_grads()
        lr.fill_(lrs[k])
        for group in ref.param_groups:
            group["lr"] = lrs[k]
        graph.replay()
        ref.step()
        torch.cuda.synchronize()
        assert_state_match(opt, ours, ref, theirs, *TOL[torch.float32], check_step_dtype=False)
        seen.append(stats.values.clone())
    if kind != "SGD":
        assert opt.state[ours[0]]["step"].item() == len(lrs)
    assert all(torch.isfinite(v).all() for v in seen) and not torch.equal(seen[0], seen[-1])


def test_whole_training_step_in_a_graph():
    """Forward, backward and step captured together: the gradients are allocated inside the graph, so the
    tensor table is uploaded during the capture (from pinned memory the graph keeps reading)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(CUDA)
    ref = copy.deepcopy(model)
    opt = pyco.optim.Adam(model.parameters(), lr=0.01, capturable=True)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01, foreach=False)
    x, y = torch.randn(16, 32, device=CUDA), torch.randn(16, 8, device=CUDA)

    def train_step(m, o):
        o.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            train_step(model, opt)
            train_step(ref, ref_opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for _ in range(5):
        x.copy_(torch.randn(16, 32, device=CUDA))
        y.copy_(torch.randn(16, 8, device=CUDA))
        graph.replay()
        train_step(ref, ref_opt)
    torch.cuda.synchronize()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert_close_report(a.detach(), b.detach(), 1e-5, 1e-6, name)
        assert opt.state[a]["step"].item() == 8


def test_no_host_synchronization_in_step():
    """Under torch's sync debug mode "error", a step (GradScaler's tensors, a device lr, nonfinite="skip",
    statistics) performs no synchronizing operation."""
    params = cuda_params([(4097,), (3,)])
    opts = [pyco.optim.Adam(params, lr=torch.tensor(0.01, device=CUDA), nonfinite="skip"),
            pyco.optim.SGD(params, lr=0.1, momentum=0.9)]
    for p in params:
        p.grad = torch.ones_like(p)
    for opt in opts:
        opt.step()  # state creation and the first plan upload happen here
        opt.grad_scale = torch.tensor(2.0, device=CUDA)
        opt.found_inf = torch.tensor(0.0, device=CUDA)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        del opt.grad_scale, opt.found_inf


def sleep_cycles(seconds: float) -> int:
    """torch.cuda._sleep cycles that keep this GPU busy for about `seconds` (measured, not assumed)."""
    probe = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * seconds * 1000.0 / max(start.elapsed_time(end), 1e-3))


@pytest.mark.parametrize("mode", ["plain", "grad_scaler", "nonfinite_skip"])
@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("kind, hyper", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01))])
def test_step_returns_while_the_device_is_still_busy(kind, hyper, stats, mode):
    """The host never waits for the device in step(), pyco's own CUDA runtime calls included (torch's sync
    debug mode cannot see those): behind ~100 ms of GPU sleep on the current stream, step() (here with a
    new float lr, so the params are uploaded through the staging pool) returns long before the sleep ends,
    and the step then happens on the device."""
    params = cuda_params([(4097,), (3,), (70001,)], seed=30)
    opt = getattr(pyco.optim, kind)(params, stats=stats, nonfinite="skip" if mode == "nonfinite_skip" else "apply",
                                    **hyper)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0) if mode == "grad_scaler" else None

    def step(k: int) -> None:
        for p in params:
            g = torch.full_like(p, 0.01 * (k + 1))
            p.grad = scaler.scale(g) if scaler is not None else g
        opt.param_groups[0]["lr"] = hyper["lr"] * 0.9 ** k
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    for k in range(3):  # state, plans, the device check and staging buffers are created here
        step(k)
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in params]
    cycles = sleep_cycles(0.1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    step(3)
    returned = time.perf_counter() - t0
    torch.cuda.synchronize()
    finished = time.perf_counter() - t0
    assert finished > 0.05, f"the sleep took {finished:.3f} s: the measurement means nothing"
    assert returned < 0.5 * finished, f"step() returned after {returned:.3f} s of a {finished:.3f} s sleep"
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before)), "the step did not happen"


@pytest.mark.parametrize("limits", [None, (4, 1 << 20)])
def test_staging_pool_stays_bounded(limits):
    """1000 steps with a float lr that changes every step upload 1000 different params buffers while the
    device lags behind: the pinned staging pool stays within its limits (with small limits the host waits
    for the oldest copy), and every step used its own lr: the result equals pyco's CPU kernels bitwise."""
    C = pyco._ext.cuda_kernels()
    previous = C.set_staging_limits(*limits) if limits else None
    try:
        shapes = [(4097,), (3,)]
        gpu, cpu = cuda_params(shapes, seed=31), make_params(shapes, torch.float32, seed=31)
        opts = [pyco.optim.SGD(ps, lr=0.1, momentum=0.9, stats=False) for ps in (gpu, cpu)]
        for p, q in zip(gpu, cpu):
            q.grad = torch.full_like(q, 0.5)
            p.grad = on_cuda(q.grad)
        for opt in opts:
            opt.step()
        torch.cuda.synchronize()
        start = C.staging_stats()
        torch.cuda._sleep(sleep_cycles(0.05))  # the copies queue up behind this
        worst = 0
        for k in range(1000):
            for opt in opts:
                opt.param_groups[0]["lr"] = 0.1 / (1.0 + 0.01 * k)
                opt.step()
            worst = max(worst, C.staging_stats()["buffers"])
        torch.cuda.synchronize()
        end = C.staging_stats()
        assert worst <= end["max_buffers"] and end["bytes"] <= max(end["max_bytes"], 4096)
        assert end["allocations"] - start["allocations"] <= end["max_buffers"]
        if limits:
            assert end["waits"] > start["waits"] and worst == limits[0]
        for a, b in zip(gpu, cpu):
            assert tensors_equal(a.detach().cpu(), b.detach())
    finally:
        if previous:
            C.set_staging_limits(*previous)


def test_cuda_runtime_errors_are_runtime_errors():
    """Failures of the CUDA runtime are RuntimeErrors (pyco._C_cuda.CudaError); argument errors stay
    ValueErrors. The device check passes here and names a device that does not exist."""
    C = pyco._ext.cuda_kernels()
    C.check_device(0)
    missing = torch.cuda.device_count()
    with pytest.raises(C.CudaError, match=rf"CUDA device {missing} does not exist: the runtime sees {missing} "):
        C.check_device(missing)
    dst = torch.empty(8, dtype=torch.uint8, device=CUDA)
    with pytest.raises(RuntimeError, match="cudaSetDevice: cudaErrorInvalidDevice") as info:
        C.upload(dst.data_ptr(), b"12345678", device=missing, stream=0)
    assert isinstance(info.value, C.CudaError) and not isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="missing address"):
        C.upload(0, b"x", device=0, stream=0)
    facts = C.driver_facts()
    assert facts["driver_version"] // 1000 >= facts["runtime_version"] // 1000 and facts["device_count"] == missing


@pytest.mark.parametrize("skip", ["found_inf", "nonfinite"])
def test_sgd_device_init_flag_survives_a_skipped_first_step(skip):
    """The kernel half of SGD's device init flag: a first step skipped on the device leaves the flags at 0,
    the next one sets the buffers to d (torch's first step) and the flags to 1."""
    from test_cuda_host import DeviceFlagSGD

    hyper = dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01)
    shapes = [(70001,), (3,)]
    ours, theirs = cuda_params(shapes, seed=32), cuda_params(shapes, seed=32)
    opt = DeviceFlagSGD(ours, nonfinite="skip" if skip == "nonfinite" else "apply", **hyper)
    ref = torch.optim.SGD(theirs, foreach=False, **hyper)
    gen = torch.Generator().manual_seed(33)
    set_grads([ours], 0, gen)
    if skip == "found_inf":
        opt.found_inf = torch.tensor(1.0, device=CUDA)
    else:
        ours[1].grad[0] = math.inf
    before = [p.detach().clone() for p in ours]
    opt.step()
    assert bool(opt.last_stats.skipped) and all(tensors_equal(p.detach(), b) for p, b in zip(ours, before))
    assert [int(opt.init_flags[p]) for p in ours] == [0, 0]
    if skip == "found_inf":
        opt.found_inf = torch.tensor(0.0, device=CUDA)
    for step in (1, 2):
        set_grads([theirs], step, gen)
        for p, q in zip(ours, theirs):
            p.grad = q.grad.clone()
        opt.step()
        ref.step()
        assert not bool(opt.last_stats.skipped)
        assert [int(opt.init_flags[p]) for p in ours] == [1, 1]
        assert_state_match(opt, ours, ref, theirs, *TOL[torch.float32])


# ---- GradScaler and non-finite gradients ---------------------------------------------------------------

@pytest.mark.parametrize("kind, hyper", [
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
])
def test_grad_scaler_skips_on_the_device(kind, hyper):
    shapes = [(4097,), (3,), ()]
    ours, theirs = cuda_params(shapes, seed=9), cuda_params(shapes, seed=9)
    opt = getattr(pyco.optim, kind)(ours, **hyper)
    ref = getattr(torch.optim, kind)(theirs, foreach=False, **hyper)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12, growth_interval=2)
    gen = torch.Generator().manual_seed(10)
    for step in range(8):
        grads = [grad_like(p, gen) for p in ours]
        if step in (2, 5):
            grads[1].view(-1)[1] = math.inf
        opt.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(ours, grads))
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in ours]
        state_before = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(ours)
                        if p in opt.state}
        scaler.step(opt)
        scaler.update()
        if step in (2, 5):
            assert bool(opt.last_stats.skipped)
            assert not opt.last_stats.values.any()
            for i, p in enumerate(ours):
                assert tensors_equal(p.detach(), before[i]), f"step {step}: param {i} changed"
                for k, v in state_before.get(i, {}).items():
                    assert tensors_equal(opt.state[p][k], v), f"step {step}: state {k} of param {i} changed"
            continue
        assert not bool(opt.last_stats.skipped)
        for p, g in zip(ours, grads):
            assert torch.equal(p.grad, g), "after the step .grad holds the unscaled gradient"
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        ref.step()
        assert_state_match(opt, ours, ref, theirs, *TOL[torch.float32], check_step_dtype=False)


def test_nonfinite_skip_on_cuda():
    params = cuda_params([(4097,), (3,)])
    opt = pyco.optim.Adam(params, lr=0.01, nonfinite="skip")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    step_before = opt.state[params[0]]["step"].clone()
    params[1].grad[2] = math.nan
    opt.step()
    assert bool(opt.last_stats.skipped)
    assert all(tensors_equal(p.detach(), b) for p, b in zip(params, before))
    assert torch.equal(opt.state[params[0]]["step"], step_before)
    params[1].grad[2] = 1.0
    opt.step()
    assert not bool(opt.last_stats.skipped) and opt.state[params[0]]["step"].item() == 2


def test_nonfinite_check_over_many_chunks():
    """The non-finite check's blocks race to set one flag; blocks that start after it is set skip their scan
    (every thread still reaches the barrier). Infs in the first and the last chunk, or none."""
    chunk = pyco._ext.cuda_kernels().CHUNK_ELEMS
    params = cuda_params([(64 * chunk + 5,), (3,)], seed=34)
    opt = pyco.optim.SGD(params, lr=0.1, nonfinite="skip")
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0] = math.inf
    params[0].grad[-1] = math.nan
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        opt.step()
        assert bool(opt.last_stats.skipped)
    assert all(tensors_equal(p.detach(), b) for p, b in zip(params, before))
    params[0].grad[0] = params[0].grad[-1] = 1.0
    opt.step()
    assert not bool(opt.last_stats.skipped) and torch.equal(params[0].detach(), before[0] - 0.1)


# ---- sizes, streams, determinism, devices --------------------------------------------------------------

@pytest.mark.slow
def test_tensor_over_2_pow_31_elements():
    """64-bit indexing: one float32 tensor of 2^31 + 37 elements (17 GB with its gradient)."""
    n = 2 ** 31 + 37
    if torch.cuda.get_device_properties(CUDA).total_memory < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of GPU memory")
    p = torch.nn.Parameter(torch.ones(n, device=CUDA))
    p.grad = torch.full((n,), 2.0, device=CUDA)
    tail = torch.arange(n - 5, n, device=CUDA)
    p.grad[tail] = torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0], device=CUDA)
    opt = pyco.optim.SGD([p], lr=0.5)
    opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p.detach()[tail].cpu(), torch.tensor([-0.5, -1.0, -1.5, -2.0, -2.5]))
    assert p.detach()[2 ** 31 - 1].item() == 0.0 and p.detach()[2 ** 31 + 1].item() == 0.0
    assert int((p.detach() == 0.0).sum()) == n - 5
    g_sq = 4.0 * (n - 5) + 9 + 16 + 25 + 36 + 49
    u_sq = 1.0 * (n - 5) + 0.25 * (9 + 16 + 25 + 36 + 49)
    assert opt.last_stats.values.cpu().tolist() == [[g_sq, u_sq, -2.0 * (n - 5) - 0.5 * 135, float(n)]]


def test_runs_on_the_current_stream():
    """The step is ordered after work queued on the current (non-default) stream: it reads the gradients
    written there after a long sleep; on any other stream it would read the old ones."""
    shapes = [(4097,), (3,)]
    ours, ref = cuda_params(shapes, seed=11), cuda_params(shapes, seed=11)
    opt, opt_ref = pyco.optim.Adam(ours, lr=0.01), pyco.optim.Adam(ref, lr=0.01)
    for p, q in zip(ours, ref):
        p.grad = torch.zeros_like(p)
        q.grad = torch.full_like(q, 0.5)
    opt_ref.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on this stream
        for p in ours:
            p.grad.fill_(0.5)
        opt.step()
        stats = opt.last_stats.values
    stream.synchronize()
    for a, b in zip(ours, ref):
        assert tensors_equal(a.detach(), b.detach())
    assert torch.equal(stats, opt_ref.last_stats.values)


@pytest.mark.parametrize("kind, hyper", [("Adam", dict(lr=0.01, amsgrad=True)), ("SGD", dict(lr=0.1, momentum=0.9))])
def test_bitwise_identical_run_to_run(kind, hyper):
    shapes = [(70001,), (4097,), (3,), (256, 129)]
    results = []
    for _ in range(2):
        params = cuda_params(shapes, seed=12)
        opt = getattr(pyco.optim, kind)(params, **hyper)
        gen = torch.Generator().manual_seed(13)
        stats = []
        for step in range(5):
            set_grads([params], step, gen)
            opt.step()
            stats.append(opt.last_stats.values.clone())
        results.append(([p.detach().clone() for p in params], stats,
                        [{k: v.clone() for k, v in opt.state[p].items()} for p in params]))
    (p1, s1, st1), (p2, s2, st2) = results
    assert all(tensors_equal(a, b) for a, b in zip(p1, p2))
    assert all(tensors_equal(a, b) for a, b in zip(s1, s2))
    assert all(tensors_equal(a[k], b[k]) for a, b in zip(st1, st2) for k in a)


def test_device_lr_tensor_equals_float_lr():
    ours, theirs = cuda_params([(4097,)], seed=14), cuda_params([(4097,)], seed=14)
    opt = pyco.optim.AdamW(ours, lr=torch.tensor(0.02, device=CUDA))
    ref = pyco.optim.AdamW(theirs, lr=float(torch.tensor(0.02)))
    run_side_by_side(opt, ours, ref, theirs, 5, seed=15)
    assert tensors_equal(ours[0].detach(), theirs[0].detach())


def test_cpu_and_cuda_parameters_in_one_optimizer_are_refused():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4, device=CUDA))]
    opt = pyco.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"param 0 of group 0 .* on cpu and param 1 of group 0 .* on cuda:0"):
        opt.step()
    assert torch.equal(params[0].detach(), torch.ones(3))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_one_launch_per_device():
    ours = [torch.nn.Parameter(torch.randn(4097, device=f"cuda:{d}")) for d in (0, 1)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = pyco.optim.Adam(ours, lr=0.01)
    ref = torch.optim.Adam(theirs, lr=0.01, foreach=False)
    run_side_by_side(opt, ours, ref, theirs, 5, seed=16)
    assert_state_match(opt, ours, ref, theirs, *TOL[torch.float32], check_step_dtype=False)
    assert opt.last_stats.values.device == torch.device("cuda:0")


def test_torch_checkpoint_loads_on_cuda():
    """A torch Adam checkpoint (CPU step counters) loads into pyco's CUDA Adam: counters move to the device."""
    theirs, ours = cuda_params([(4097,), (3,)], seed=17), cuda_params([(4097,), (3,)], seed=17)
    ref = torch.optim.Adam(theirs, lr=0.01, foreach=False)
    opt = pyco.optim.Adam(ours, lr=0.01)
    run_side_by_side(ref, theirs, opt, ours, 3, seed=18)
    # load_state_dict keeps tensors that are already on the right device: a copy, or both optimizers would
    # update the same exp_avg / exp_avg_sq
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert all(opt.state[p]["exp_avg"].data_ptr() != ref.state[q]["exp_avg"].data_ptr() for p, q in zip(ours, theirs))
    assert all(opt.state[p]["step"].device.type == "cuda" for p in ours)
    run_side_by_side(opt, ours, ref, theirs, 3, seed=19)
    assert_state_match(opt, ours, ref, theirs, *TOL[torch.float32], check_step_dtype=False)
