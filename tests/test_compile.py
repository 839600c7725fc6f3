"""pyco's optimizers under torch.compile: the update is the custom operator pyco::<rule>_step inside the graph
(no more graph breaks than torch.optim's own step), and a compiled step gives the eager result, statistics
included: bitwise, since the same kernel runs on the same table. What a compiled step launches is checked as
an eager launch is, and a step that raises changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot

import pyco

dynamo = pytest.importorskip("torch._dynamo", reason="this torch has no torch.compile (torch._dynamo)")
if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):
    pytest.skip("this torch has no torch.library.custom_op", allow_module_level=True)

from torch._dynamo.utils import counters  # noqa: E402

# Warnings torch itself raises while tracing (its optimizers' jit-scripted helpers; the loss's .grad looked at
# when a frame resumes), not pyco's: the test-suite turns warnings into errors.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")]

OURS = {  # rule -> (pyco's class, torch's class, hyper-parameters)
    "adam": (pyco.optim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    "adamw-amsgrad": (pyco.optim.AdamW, torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
    "sgd-nesterov": (pyco.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
}
OP = {"adam": "pyco.adam_step", "adamw-amsgrad": "pyco.adam_step", "sgd-nesterov": "pyco.sgd_step"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def mlp(dtype=torch.float64, seed=0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def batch(step: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(5, 4, generator=gen, dtype=dtype), torch.randn(5, 3, generator=gen, dtype=dtype)


def backward(model, step, dtype=torch.float64):
    x, y = batch(step, dtype)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss


def breaks(fn) -> tuple[int, int, int, list[str]]:
    """(graph breaks, graphs, graph breaks dynamo counted while tracing, the graphs' call targets) of fn under
    torch._dynamo.explain."""
    dynamo.reset()
    counters.clear()
    explained = dynamo.explain(fn)()
    targets = [str(node.target) for g in explained.graphs for node in g.graph.nodes if node.op == "call_function"]
    return len(explained.break_reasons), explained.graph_count, sum(counters["graph_break"].values()), targets


def has_op(targets: list[str], op: str) -> bool:
    return f"{op}.default" in targets


def same(ours, reference, what: str) -> None:
    """Bitwise equality of parameters, state and statistics of two pyco optimizers."""
    opt, model = ours
    ref_opt, ref_model = reference
    for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
        assert torch.equal(p, q), f"{what}: param {i} differs by {float((p - q).abs().max()):.3e}"
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert state.keys() == ref_state.keys(), f"{what}: state keys of param {i}"
        for key in state:
            assert torch.equal(state[key], ref_state[key]), f"{what}: state {key!r} of param {i}"
    if ref_opt.last_stats is None:
        assert opt.last_stats is None
        return
    assert opt.last_stats.names == ref_opt.last_stats.names
    assert torch.equal(opt.last_stats.values, ref_opt.last_stats.values), (
        f"{what}: statistics {opt.last_stats.values} != {ref_opt.last_stats.values}")


@pytest.mark.parametrize("rule", list(OURS))
def test_step_has_no_more_graph_breaks_than_torch_optim(rule):
    counts = {}
    ours, theirs, hyper = OURS[rule]
    # torch.optim's peers on the CPU: the for-loop and foreach (torch._dynamo.explain shows no graph at all for
    # torch's fused=True step on the CPU, nothing to compare with)
    for name, make in [("pyco", lambda ps: ours(ps, **hyper)),
                       ("torch foreach=False", lambda ps: theirs(ps, foreach=False, fused=False, **hyper)),
                       ("torch foreach=True", lambda ps: theirs(ps, foreach=True, **hyper))]:
        model = mlp()
        opt = make(model.parameters())
        backward(model, 0)
        first = breaks(lambda: opt.step())  # the first step: state created inside the graph
        backward(model, 1)
        steady = breaks(lambda: opt.step())
        counts[name] = (first[:3], steady[:3])
        if name == "pyco":
            assert has_op(first[3], OP[rule]) and has_op(steady[3], OP[rule]), (first[3], steady[3])
            assert first[0] == steady[0] == 0 and first[2] == steady[2] == 0, counts
    for name in ("torch foreach=False", "torch foreach=True"):
        for mine, peer in zip(counts["pyco"], counts[name]):  # the first step, then the steady one
            assert all(a <= b for a, b in zip(mine, peer)), counts


def test_training_step_has_no_more_graph_breaks_than_torch_optim():
    counts = {}
    for name, make in [("pyco", lambda ps: pyco.optim.Adam(ps, lr=0.01)),
                       ("torch", lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False))]:
        model = mlp()
        opt = make(model.parameters())
        x, y = batch(0)

        def train():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        train()
        counts[name] = breaks(train)
    assert has_op(counts["pyco"][3], "pyco.adam_step"), counts["pyco"][3]
    assert all(a <= b for a, b in zip(counts["pyco"][:3], counts["torch"][:3])), counts


def test_compiled_training_step_equals_eager():
    """The forward, backward and step in one compiled function (float64, to 1e-12; the step's own arithmetic is
    the eager kernel's)."""
    model, ref_model = mlp(), mlp()
    opt = pyco.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = pyco.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)

    def train(m, o, x, y):
        o.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        o.step()
        return loss

    compiled = torch.compile(train, backend="aot_eager")
    for i in range(3):
        x, y = batch(i)
        loss, ref_loss = compiled(model, opt, x, y), train(ref_model, ref_opt, x, y)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.last_stats.values, ref_opt.last_stats.values, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("rule", list(OURS))
def test_compiled_step_equals_eager(rule, dtype):
    """From the first step (state created in the graph) on, with blocks and two param groups."""
    model, ref_model = mlp(dtype), mlp(dtype)

    ours, _, hyper = OURS[rule]

    def make(m):
        groups = [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.003}]
        return ours(groups, **hyper, blocks={"w": [m[0].weight, m[2].weight], "b": [m[0].bias, m[2].bias]})

    opt, ref_opt = make(model), make(ref_model)
    step = torch.compile(lambda: opt.step(), backend="aot_eager", fullgraph=True)
    for i in range(4):
        backward(model, i, dtype)
        backward(ref_model, i, dtype)
        step()
        ref_opt.step()
        same((opt, model), (ref_opt, ref_model), f"{rule}, step {i}")
    assert opt.last_stats.names == ("w", "b") and bool((opt.last_stats.update_sq > 0).all())


def test_compiled_step_equals_eager_with_the_default_backend():
    """One test with inductor (torch.compile's default backend), after an eager first step (one compilation)."""
    model, ref_model = mlp(torch.float32), mlp(torch.float32)
    opt, ref_opt = pyco.optim.AdamW(model.parameters(), lr=0.01), pyco.optim.AdamW(ref_model.parameters(), lr=0.01)
    step = torch.compile(lambda: opt.step())
    for i in range(3):
        backward(model, i, torch.float32)
        backward(ref_model, i, torch.float32)
        step() if i else opt.step()
        ref_opt.step()
        same((opt, model), (ref_opt, ref_model), f"step {i}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_tensor_lr_is_read_when_the_step_runs():
    model, ref_model = mlp(), mlp()
    lr, ref_lr = torch.tensor(0.01, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64)
    opt, ref_opt = pyco.optim.Adam(model.parameters(), lr=lr), pyco.optim.Adam(ref_model.parameters(), lr=ref_lr)
    step = torch.compile(lambda: opt.step(), backend="aot_eager", fullgraph=True)
    for i in range(4):
        backward(model, i)
        backward(ref_model, i)
        step()
        ref_opt.step()
        same((opt, model), (ref_opt, ref_model), f"step {i}")
        lr.mul_(0.5)  # a schedule on the tensor: no recompilation, the operator reads its value
        ref_lr.mul_(0.5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # the first step, the steady one
    lr.fill_(-1.0)
    backward(model, 9)
    before = snapshot(opt, list(model.parameters()))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        step()
    assert_unchanged(before, opt, list(model.parameters()))


def test_what_the_graph_cannot_hold_runs_the_eager_step():
    """nonfinite='skip' decides on the host: a compiled step runs the eager one (one graph break) and skips
    as it does."""
    model, ref_model = mlp(), mlp()
    opt = pyco.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nonfinite="skip")
    ref_opt = pyco.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, nonfinite="skip")
    step = torch.compile(lambda: opt.step(), backend="aot_eager")
    for i in range(3):
        backward(model, i)
        backward(ref_model, i)
        if i == 1:
            model[0].weight.grad[0, 0] = ref_model[0].weight.grad[0, 0] = float("inf")
        step()
        ref_opt.step()
        same((opt, model), (ref_opt, ref_model), f"step {i}")
    assert opt.skipped_steps == ref_opt.skipped_steps == 1
    backward(model, 5)
    assert not has_op(breaks(lambda: opt.step())[3], "pyco.sgd_step")  # the eager launch, outside the graph


def test_step_blocks_and_no_statistics_under_compile():
    """stats=False: no statistics in the graph either; step_blocks runs its eager launch (a graph break)."""
    model, ref_model = mlp(), mlp()
    blocks, ref_blocks = pyco.blocks.by_module(model), pyco.blocks.by_module(ref_model)
    opt = pyco.optim.Adam(model.parameters(), lr=0.01, stats=False)
    ref_opt = pyco.optim.Adam(ref_model.parameters(), lr=0.01, stats=False)
    step = torch.compile(lambda: (opt.step(), opt.step_blocks(blocks, ["2"])), backend="aot_eager")
    for i in range(2):
        backward(model, i)
        backward(ref_model, i)
        step()
        ref_opt.step()
        ref_opt.step_blocks(ref_blocks, ["2"])
        same((opt, model), (ref_opt, ref_model), f"step {i}")
    assert opt.last_stats is None


def test_bad_state_is_refused_under_compile_with_nothing_changed():
    model = mlp()
    opt = pyco.optim.Adam(model.parameters(), lr=0.01)
    step = torch.compile(lambda: opt.step(), backend="aot_eager")
    backward(model, 0)
    step()
    backward(model, 1)
    opt.state[model[2].weight]["exp_avg"] = torch.zeros(2, 2, dtype=torch.float64)  # not the parameter's shape
    params = list(model.parameters())
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' has shape \[2, 2\]"):
        step()
    assert_unchanged(before, opt, params)


def operator_args(written, grads, layout, *, hypers=(0.01, 0.9, 0.999, 1e-8, 0.0), flags=(0, 0, 1),
                  hyper_tensors=(), hyper_slots=()):
    return (list(written), list(grads), list(layout), list(hypers), list(hyper_tensors), list(hyper_slots),
            list(flags), "AdamW", 1, 1, True)


@pytest.mark.parametrize("case", ["state dtype", "state shape", "grad shape", "expanded param", "step counter",
                                  "layout", "negative tensor lr"])
def test_the_operator_checks_every_tensor_it_launches(case):
    """pyco::adam_step itself (what a compiled graph calls) refuses what the eager door refuses, with its
    exception type, before writing anything."""
    p = torch.randn(4, 3, dtype=torch.float64)
    g = torch.randn(4, 3, dtype=torch.float64)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    layout = [0, 0, 0, 0, 2, 1]
    kwargs = {}
    error, match = RuntimeError, None
    if case == "state dtype":
        v, match = torch.zeros(4, 3, dtype=torch.float32), "state 'exp_avg_sq' is torch.float32"
    elif case == "state shape":
        m, match = torch.zeros(3, 4, dtype=torch.float64), r"state 'exp_avg' has shape \[3, 4\]"
    elif case == "grad shape":
        g, error, match = torch.randn(12, dtype=torch.float64), ValueError, "gradient of torch.float64, shape \\[12\\]"
    elif case == "expanded param":
        p = torch.randn(1, 3, dtype=torch.float64).expand(4, 3)
        match = "overlapping elements"
    elif case == "step counter":
        step, match = torch.zeros(2), "'step' is torch.float32, shape \\[2\\]"
    elif case == "layout":
        layout, error, match = [0, 0, 3, 0, 2, 1], ValueError, "record 0 does not fit"
    elif case == "negative tensor lr":
        kwargs = dict(hyper_tensors=[torch.tensor(-1.0)], hyper_slots=[0])
        error, match = ValueError, "Invalid learning rate"
    before = [t.clone() for t in (p, g, m, v, step)]
    with pytest.raises(error, match=match):
        torch.ops.pyco.adam_step(*operator_args([p, m, v, step], [g], layout, **kwargs))
    for t, b in zip((p, g, m, v, step), before):
        assert torch.equal(t, b), case


def test_the_operator_is_the_eager_kernel():
    """Called directly, pyco::adam_step moves a tensor exactly as an eager AdamW step does."""
    p = torch.randn(4, 3, dtype=torch.float64)
    q = torch.nn.Parameter(p.clone())
    q.grad = torch.randn(4, 3, dtype=torch.float64)
    opt = pyco.optim.AdamW([q], lr=0.01, weight_decay=0.0)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)
    stats = torch.ops.pyco.adam_step(*operator_args([p, m, v, step], [q.grad], [0, 0, 0, 0, 2, 1]))
    opt.step()
    assert torch.equal(p, q.detach()) and torch.equal(m, opt.state[q]["exp_avg"]) and float(step) == 1.0
    assert torch.equal(stats, opt.last_stats.values)
