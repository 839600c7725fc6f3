"""The options every study shares: --seeds, --quick and --full on the command line and in Python."""

import pytest

from pyco import cli
from pyco.studies import _common


@pytest.mark.parametrize("argv, message", [
    (["study", "step-size", "--quick", "--full"], "not allowed with argument"),
    (["study", "step-size", "--seeds", "0"], "--seeds must be >= 1"),
    (["study", "step-size", "--seeds", "two"], "invalid int value"),
])
def test_bad_experiment_options_are_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_seed_lists_and_sizes():
    assert _common.seed_list(7, None, False) == [7, 8, 9]
    assert _common.seed_list(0, None, True) == [0, 1, 2, 3, 4]
    assert _common.seed_list(2, 1, True) == [2]
    with pytest.raises(ValueError, match="seeds must be an int >= 1"):
        _common.seed_list(0, 0, False)
    assert _common.size(False, False) == "quick" and _common.size(False, True) == "full"
    with pytest.raises(ValueError, match="exclusive"):
        _common.size(True, True)


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "--device expects cpu or cuda"),
    (["--device", "tpu:0"], "--device expects cpu or cuda"),
])
def test_bad_device_is_one_line_and_no_run_directory(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", "step-size", *argv, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["study", "step-size", "--out", str(tmp_path / "f")])
    assert "is a file" in capsys.readouterr().err and (tmp_path / "f").read_text() == "x"


def fake_study(monkeypatch, behaviour):
    import json  # noqa: F401
    import types

    from pyco import studies

    def run(factory, out=None, **options):
        for i in range(2):
            out.keep("configurations", {"i": i, "loss": 1.0 / (i + 1)})  # finished before the fault
        behaviour()

    fake = types.SimpleNamespace(NAME="step-size", QUESTION="?", run=run)
    monkeypatch.setattr(studies, "load", lambda name: fake)


@pytest.mark.parametrize("fault, code", [(KeyboardInterrupt, 130), (RuntimeError, None)])
def test_a_fault_keeps_every_finished_configuration_and_never_replaces_a_complete_run(fault, code, monkeypatch,
                                                                                      tmp_path, capsys):
    import json

    out = tmp_path / "run"
    out.mkdir()
    complete = {"study": "step-size", "partial": False, "summary": {}}
    (out / "results.json").write_text(json.dumps(complete))
    with pytest.raises(SystemExit):  # a complete run is kept: a new --out, or --force
        cli.main(["study", "step-size", "--out", str(out), "--no-progress"])
    assert "holds a complete run" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == complete

    def behaviour():
        raise fault("fault")

    fake_study(monkeypatch, behaviour)
    argv = ["study", "step-size", "--out", str(out), "--no-progress", "--force"]
    if code is None:
        with pytest.raises(fault):
            cli.main(argv)
    else:
        assert cli.main(argv) == code
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] is True
    assert results["finished"]["configurations"] == [{"i": 0, "loss": 1.0}, {"i": 1, "loss": 0.5}]
    # the partial run may be resumed into without --force: only a complete run is protected
    fake_study(monkeypatch, lambda: None)
    monkeypatch.setattr("pyco.studies.load", lambda name: __import__("types").SimpleNamespace(
        NAME="step-size", QUESTION="?", run=lambda factory, out=None, **o: {"study": "step-size"}))
    assert cli.main(["study", "step-size", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["partial"] is False


def test_a_study_refusing_the_workload_is_one_line_and_leaves_no_directory(capsys, tmp_path):
    pytest.importorskip("scipy")
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", "edge-of-stability", "--workload", "stdlib-gpt", "--size", "tiny",
                  "--out", str(tmp_path / "run"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "study edge-of-stability:" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_a_real_study_keeps_the_seeds_it_finished(monkeypatch, tmp_path):
    import json

    from pyco.studies import step_size

    real, calls = step_size.workload_cases, []

    def cases(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(step_size, "workload_cases", cases)
    out = tmp_path / "run"
    assert cli.main(["study", "step-size", "--out", str(out), "--no-progress", "--steps", "5"]) == 130
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] is True and results["interrupted"] is True
    kept = results["finished"]["cases"]
    assert {c["seed"] for c in kept} == {0} and len(kept) == 2  # seed 0's batch and worst-fit cases


def test_off_a_terminal_progress_is_plain_log_lines(monkeypatch, caplog):
    import io
    import logging

    items = list(range(1, 31))
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe or a log file: no bar
    assert _common.progress(items, desc="x", enabled=False) is items
    clock = iter([0.0, *[float(i) for i in range(1, 31)]])  # one second per item
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="pyco.studies"):
        assert list(_common.progress(items, desc="orders: training")) == items
    lines = [r.getMessage() for r in caplog.records if r.name == "pyco.studies"]
    # the first item, every 10 s, and the last
    assert lines == ["orders: training: 1/30, 1 s", "orders: training: 11/30, 11 s", "orders: training: 21/30, 21 s",
                     "orders: training: 30/30, 30 s"]


def test_a_study_run_off_a_terminal_writes_progress_lines_to_stderr(capsys, tmp_path):
    assert cli.main(["study", "step-size", "--out", str(tmp_path / "run"), "--steps", "5", "--seeds", "2"]) == 0
    err = capsys.readouterr().err
    assert "step-size: seeds: 1/2" in err and "step-size: seeds: 2/2" in err and "\r" not in err
    assert cli.main(["study", "step-size", "--out", str(tmp_path / "quiet"), "--steps", "5", "--seeds", "2",
                     "--no-progress"]) == 0
    assert "step-size: seeds" not in capsys.readouterr().err


@pytest.mark.parametrize("study", ["step-size", "dosage", "starvation", "feature-drift"])
def test_a_study_that_uses_one_lr_refuses_several(study, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", study, "--lr", "0.1", "0.2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert exc.value.code == 2 and "give one --lr, got 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_each_study_has_its_own_help(capsys):
    from pyco import studies

    texts = {}
    for name in studies.names():
        with pytest.raises(SystemExit) as exc:
            cli.main(["study", name, "--help"])
        assert exc.value.code == 0
        texts[name] = capsys.readouterr().out
        module = studies.load(name)
        assert module.QUESTION in texts[name]
        for key in getattr(module, "OPTIONS", {}):
            assert f"  {key} = " in texts[name]
    assert len(set(texts.values())) == len(texts)  # no two studies share a help text


def test_a_missing_studies_extra_is_one_line_and_no_run_directory(monkeypatch, capsys, tmp_path):
    def missing():
        raise ImportError("the studies draw figures with matplotlib: pip install 'pyco[studies]'")

    monkeypatch.setattr(_common, "pyplot", missing)
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", "step-size", "--out", str(tmp_path / "run"), "--no-progress"])
    assert exc.value.code == 2 and "pip install 'pyco[studies]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
