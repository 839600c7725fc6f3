"""pyco.probe.Monitor: training bitwise as without it, one exact JSON line per recorded step, the figures of
any log, TensorBoard only when it is there, clear errors."""

import json

import pytest
import torch
from torch import nn

import pyco
from pyco import cli
from pyco.probe import Monitor, read_log


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    data = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(4)]
    return model, data


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def run(steps, monitor_kwargs=None, opt_cls=pyco.optim.Adam, tmp=None):
    model, data = make()
    opt = opt_cls(model.parameters(), lr=0.05)
    blocks = pyco.blocks.by_module(model)
    monitor = Monitor(opt, blocks, **monitor_kwargs) if monitor_kwargs is not None else None
    losses = []
    for i in range(steps):
        c = closure_for(model, opt, *data[i % len(data)])
        losses.append((monitor.step(c) if monitor else opt.step(c)).item())
    return model, opt, losses, monitor


@pytest.mark.parametrize("opt_cls", [pyco.optim.Adam, torch.optim.SGD])
def test_training_is_bitwise_the_same_and_every_nth_step_is_logged(tmp_path, opt_cls):
    plain_model, plain_opt, plain_losses, _ = run(7, None, opt_cls)
    model, opt, losses, monitor = run(7, dict(every=3, out=tmp_path, tensorboard=False), opt_cls)
    assert losses == plain_losses
    for p, q in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)
    for s, t in zip(opt.state.values(), plain_opt.state.values()):
        for k in s:
            assert torch.equal(torch.as_tensor(s[k]), torch.as_tensor(t[k]))
    entries = read_log(tmp_path)
    assert [e["step"] for e in entries] == [1, 4, 7]  # the 1st, (1 + every)-th, ...
    first = entries[0]
    assert first["blocks"] == ["0", "2"] and len(first["C"]) == 2 and first["loss"] == pytest.approx(losses[0])
    # the parts add up exactly: ΔL = Σf + ½ΣC + R, and ½ΣC = within + cross
    for e in entries:
        assert e["actual"] == pytest.approx(sum(e["first_order"]) + e["second_order"] + e["remainder"], abs=1e-14)
        assert e["second_order"] == pytest.approx(e["within"] + e["cross"], abs=1e-14)
        assert e["stats"]["0"]["update_sq"] > 0 and e["probe_seconds"] > 0
    # Σ g·u per block is the first-order term the probe measured (same gradients, same update)
    for name, f in zip(first["blocks"], first["first_order"]):
        assert first["stats"][name]["grad_dot_update"] == pytest.approx(f, rel=1e-10)
    assert monitor.cost()["recorded"] == 3 and monitor.cost()["plain"] == 4 and monitor.cost()["ratio"] > 0


def test_the_log_matches_record_on_the_same_step(tmp_path):
    model, data = make()
    opt = pyco.optim.SGD(model.parameters(), lr=0.1)
    blocks = pyco.blocks.by_module(model)
    twin, twin_opt = make()[0], None
    twin_opt = pyco.optim.SGD(twin.parameters(), lr=0.1)
    Monitor(opt, blocks, every=1, out=tmp_path).step(closure_for(model, opt, *data[0]))
    report = pyco.probe.record(twin_opt, closure_for(twin, twin_opt, *data[0]), pyco.blocks.by_module(twin),
                               dtype=torch.float64, alone=False)
    (entry,) = read_log(tmp_path / "probe.jsonl")
    assert entry["C"] == report.C.tolist() and entry["cross"] == report.cross and entry["actual"] == report.actual


def test_plot_draws_any_log_and_a_cut_last_line_is_tolerated(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run(5, dict(every=2, out=tmp_path))
    with open(tmp_path / "probe.jsonl", "a") as f:
        f.write('{"step": 9, "blo')  # a run killed while writing
    assert len(read_log(tmp_path)) == 3
    assert cli.main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "probe.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["plot", str(tmp_path / "nowhere")])
    assert "no Monitor log" in capsys.readouterr().err


def test_resume_records_the_same_steps(tmp_path):
    _, _, _, monitor = run(4, dict(every=3))
    again = Monitor(torch.optim.SGD(make()[0].parameters(), lr=0.1), every=3)
    again.load_state_dict(monitor.state_dict())
    assert again.steps == 4 and not again.due() and json.dumps(monitor.state_dict())
    with pytest.raises(ValueError, match="expected"):
        again.load_state_dict({"steps": -1})


def test_tensorboard_scalars_only_when_available(tmp_path):
    import importlib

    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        model, _ = make()
        with pytest.raises(ImportError, match="pip install tensorboard"):
            Monitor(torch.optim.SGD(model.parameters(), lr=0.1), every=1, out=tmp_path, tensorboard=True)
        run(2, dict(every=1, out=tmp_path))  # the default: skipped without it
        assert len(read_log(tmp_path)) == 2
        return
    run(2, dict(every=1, out=tmp_path, tensorboard=True))
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(every=0), ValueError, "every must be an int >= 1"),
    (dict(mode="diagonal"), ValueError, "mode"),
    (dict(tensorboard="yes"), TypeError, "tensorboard must be"),
])
def test_bad_arguments_are_refused_before_anything(kwargs, exc, message, tmp_path):
    model, _ = make()
    with pytest.raises(exc, match=message):
        Monitor(torch.optim.SGD(model.parameters(), lr=0.1), out=tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        Monitor(torch.optim.SGD(model.parameters(), lr=0.1), out=tmp_path / "file")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"pyco {pyco.__version__}"
