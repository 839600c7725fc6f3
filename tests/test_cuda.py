"""pyco's CUDA kernels on a GPU: parity with torch.optim on CUDA, agreement with pyco's CPU kernels, CUDA-graph
capture and replay, GradScaler, reduced precision, 64-bit indexing, streams, determinism, no host
synchronization. Skipped without a GPU (tests/test_cuda_host.py covers the host side everywhere)."""

from __future__ import annotations

import copy
import math

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
    """bf16/f16 storage with float32 arithmetic, rounded once per stored value: Adam within an ulp of torch's
    fused CUDA Adam; every rule close to a float64 run on the same gradients."""
    shapes = [(4097,), (17,), ()]
    ours, theirs = cuda_params(shapes, dtype, seed=5), cuda_params(shapes, dtype, seed=5)
    opt_ours = getattr(pyco.optim, kind)(ours, **hyper)
    opt_theirs = getattr(torch.optim, kind)(theirs, fused=kind != "SGD", foreach=False if kind == "SGD" else None,
                                            **hyper)
    wide = run_with_float64_twin(kind, hyper, opt_ours, ours, opt_theirs, theirs, STEPS, seed=6)
    eps = torch.finfo(dtype).eps
    for i, (a, b, w) in enumerate(zip(ours, theirs, wide)):
        if kind != "SGD":
            assert_close_report(a.detach().float(), b.detach().float(), eps, 1e-6, f"param {i} vs torch fused")
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
    opt.load_state_dict(ref.state_dict())
    assert all(opt.state[p]["step"].device.type == "cuda" for p in ours)
    run_side_by_side(opt, ours, ref, theirs, 3, seed=19)
    assert_state_match(opt, ours, ref, theirs, *TOL[torch.float32], check_step_dtype=False)
