"""``edgec tune --rpc HOST:PORT --key KEY``: candidates cross-built here, measured on the boards
registered with an RPC tracker (here emulated aarch64 boards on loopback, see conftest), the
database written where ``edgec compile --target rpi4`` finds it.

The emulated-board tests skip where the emulator is not installed. One board and a tiny model
(4 trials) run in the default suite; two boards and the Fashion-MNIST CNN (16 trials) are
marked slow: ``python -m pytest -q -m slow tests/test_tune_rpc.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import Boards, board_missing, compile_to, conv_bn_model
from edgec.core.errors import EdgecError
from edgec.targets import get_target

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def norm():
    from edgec.core.importer import normalize

    return normalize(conv_bn_model())[0]


@pytest.fixture
def tracker():
    """A tracker with no board registered."""
    b = Boards()
    try:
        deadline = time.monotonic() + 30
        while not b._tracker_up():
            if time.monotonic() > deadline:
                pytest.fail("the RPC tracker did not start")
            time.sleep(0.2)
        yield b
    finally:
        b.close()


# -- errors, no board needed ----------------------------------------------------------------------

def test_non_host_target_without_rpc_says_how(cache, norm):
    from edgec.targets.tuning import tune

    with pytest.raises(EdgecError, match=r"rpi4.*cannot run on this machine.*--rpc HOST:PORT "
                                         r"--key KEY"):
        tune(norm, get_target("rpi4"), trials=4)


def test_rpc_without_key(cache, norm, tiny_model_path, capsys):
    from edgec.driver.cli import main
    from edgec.targets.tuning import tune

    with pytest.raises(EdgecError, match="--rpc needs --key"):
        tune(norm, get_target("rpi4"), trials=4, rpc="127.0.0.1:9190")
    assert main(["tune", str(tiny_model_path), "--target", "rpi4", "--rpc",
                 "127.0.0.1:9190"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--rpc needs --key" in err
    with pytest.raises(EdgecError, match="HOST:PORT"):
        tune(norm, get_target("rpi4"), trials=4, rpc="nowhere", key="rpi4")


def test_rpc_key_without_boards(cache, norm, tracker):
    from edgec.targets.tuning import tune

    with pytest.raises(EdgecError, match="no board is registered under key 'rpi4'"):
        tune(norm, get_target("rpi4"), trials=4, rpc=tracker.address, key="rpi4")


def test_rpc_refuses_gpu_targets(cache, norm):
    from edgec.targets.tuning import tune

    with pytest.raises(EdgecError, match="'cuda' is a cuda target.*RPC"):
        tune(norm, get_target("cuda"), trials=4, rpc="127.0.0.1:9190", key="jetson")


# -- one emulated board ---------------------------------------------------------------------------

# ~80 s on a quiet 2-core host, 200+ s on a busy one (4 trials; MetaSchedule's search and the
# builds here dominate, the board's measurements take seconds): with the slow tests, which CI
# runs too (`-m slow`); the tracker and board plumbing stay in the default run (the tests above)
@pytest.mark.slow
def test_tune_on_board_then_compile_reuses(cache, tmp_path, rpc_board):
    """Tuned on the model as the compile sees it (after the default passes: BN folded),
    as ``edgec tune`` does, so that the compile finds the tuned functions."""
    import onnx

    from edgec.driver.compiler import CompileOptions, prepare
    from edgec.targets.tuning import CHOICES, db_dir, tune

    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    model = prepare(tmp_path / "m.onnx", CompileOptions(target="rpi4")).result.model
    spec = get_target("rpi4")
    summary = tune(model, spec, trials=4, progress=False, rpc=rpc_board.address, key="rpi4")
    assert summary["tasks"] == 2 and summary["boards"] >= 1
    assert "emulated" in summary["where"]
    path = db_dir(spec)
    assert summary["db"] == str(path)
    records = (path / "database_tuning_record.json").read_text().splitlines()
    assert records  # candidates measured on the board
    choices = json.loads((path / CHOICES).read_text())
    assert len(choices) == 2
    for c in choices.values():
        assert c["default_s"] and c["default_s"] > 0  # the default kernel timed on the board too
        assert c["use"] in {"tuned", "default"}
        if c["use"] == "tuned":
            assert c["tuned_s"] < c["default_s"]

    report = compile_to(tmp_path / "m.onnx", tmp_path / "a", target="rpi4")
    assert report["kernels"]["tuning_db"] == str(path)
    for c in choices.values():  # every task is a function of the compile, tuned where chosen
        assert (report["kernels"]["functions"][c["task"]] == "tuned") == (c["use"] == "tuned")


# -- two emulated boards, the Fashion-MNIST CNN (slow) --------------------------------------------

def _add_logged_board(b: Boards, key: str, log: Path, timeout: float = 240.0) -> None:
    """``Boards.add`` with the board's server log (sessions it served) kept in ``log``."""
    from edgec.driver import board
    from edgec.runtime.remote import boards

    want = boards(b.address, key) + 1
    saved = os.dup(2)
    with open(log, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            b.procs.append(board.serve(b.address, key, quiet=False))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    deadline = time.monotonic() + timeout
    while boards(b.address, key) < want:
        assert b.procs[-1].poll() is None, "the emulated board exited"
        assert time.monotonic() < deadline, "the emulated board did not register"
        time.sleep(1.0)


@pytest.mark.slow
def test_two_boards_fashion_mnist_then_compile_reuses(cache, tmp_path):
    import subprocess
    import sys

    reason = board_missing()
    if reason:
        pytest.skip(f"no emulated aarch64 board: {reason}")
    model = ROOT / "models" / "fashion_mnist_cnn.onnx"
    shape = ["--input-shape", "input=1x1x28x28"]
    b = Boards()
    logs = [tmp_path / "board0.log", tmp_path / "board1.log"]
    try:
        for log in logs:
            _add_logged_board(b, "rpi4", log)
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "edgec.driver.cli", "tune", str(model),
                              "--target", "rpi4", "--rpc", b.address, "--key", "rpi4",
                              "--trials", "16", "--no-progress", *shape],
                             capture_output=True, text=True, timeout=3600)
        took = time.monotonic() - t0
    finally:
        b.close()
    assert res.returncode == 0, res.stderr
    print(f"\ntuned in {took:.0f} s\n{res.stdout}")
    assert "measured on 2 'rpi4' boards" in res.stdout
    sessions = [log.read_text().count("load_module") for log in logs]
    print(f"modules loaded per board: {sessions}")
    assert sum(sessions) > 0

    from edgec.targets.tuning import CHOICES, db_dir

    path = db_dir(get_target("rpi4"))
    choices = json.loads((path / CHOICES).read_text())
    assert choices and all(c["default_s"] for c in choices.values())
    res = subprocess.run([sys.executable, "-m", "edgec.driver.cli", "compile", str(model),
                          "-o", str(tmp_path / "out"), "--target", "rpi4", *shape],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kernels"]["tuning_db"] == str(path)
    for c in choices.values():
        want = "tuned" if c["use"] == "tuned" else None
        got = report["kernels"]["functions"].get(c["task"])
        assert (got == "tuned") == (want == "tuned"), (c, got)
