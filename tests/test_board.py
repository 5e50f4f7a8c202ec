"""Boards: an emulated aarch64 board behind TVM's RPC tracker on loopback (``check``, ``bench``
and ``run`` over RPC, int8 and fp32 numerics of aarch64 code), the runtime alone (no onnx, no
onnxruntime, no compiler; on x86 and on the emulated board), and libraries that are tampered
with or foreign.

The RPC tests skip, with the reason, where the emulator cannot run (``edgec board --install``;
``.ci/run`` installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import compile_to, conv_bn_model
from edgec.core.errors import EdgecError
from edgec.driver.cli import main
from edgec.runtime import OrtSession, Session, run_batched
from edgec.runtime.artifact import sha256_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny conv-BN-Gemm model, its data, and artifacts for x86 and rpi4."""
    d = tmp_path_factory.mktemp("board")
    onnx.save(conv_bn_model(batch=2), d / "m.onnx")
    x = np.random.default_rng(0).standard_normal((5, 3, 12, 12)).astype(np.float32)
    np.savez(d / "data.npz", x=x)
    compile_to(d / "m.onnx", d / "x86")
    compile_to(d / "m.onnx", d / "rpi4", target="rpi4")
    return d


def _ref(tiny: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime on the original (batch 2), over any number of rows."""
    return run_batched(OrtSession(tiny / "m.onnx"), {"x": x}, 2)[0]


def _rel_err(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


# ------------------------------------------------------------------ over RPC (emulated board)
def test_check_bench_run_over_rpc(rpc_board, tiny, tmp_path, capsys):
    rpc = ["--rpc", rpc_board.address, "--key", "rpi4"]
    m, art, data = str(tiny / "m.onnx"), str(tiny / "rpi4"), str(tiny / "data.npz")
    assert main(["check", m, art, "--data", data, "--json", str(tmp_path / "c.json"),
                 "--atol", "1e-4", "--rtol", "1e-4", *rpc]) == 0
    out = capsys.readouterr().out
    assert "'rpi4' board" in out and "emulated aarch64" in out, out
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["outputs"]["logits"]["cosine"] > 0.99999

    assert main(["run", art, "--data", data, "-o", str(tmp_path / "y.npz"), *rpc]) == 0
    y = np.load(tmp_path / "y.npz")["logits"]
    ref = _ref(tiny, np.load(data)["x"])
    assert y.shape == (5, 10) and _rel_err(y, ref) < 1e-4

    assert main(["bench", m, art, "--repeat", "2", "--json", str(tmp_path / "b.json"),
                 *rpc]) == 0
    out = capsys.readouterr().out
    assert "for reference" in out and "no ratio" in out and "emulation" in out, out
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["edgec_ms"] > 0 and b["ratio"] is None and b["emulated"]


@pytest.mark.parametrize("target,c,zx", [("rpi4", 16, 128), ("rpi5", 16, 128), ("rpi5", 3, 73)])
def test_int8_on_the_board_within_one_step(rpc_board, tmp_path, target, c, zx):
    """aarch64 integer kernels (NEON; sdot on rpi5) against onnxruntime's exact QDQ; with 3
    input channels and a zero point below 128 the sdot kernel pads its 4-byte words with the
    negative ``zx - 128`` (this failed to compile)."""
    from onnx import numpy_helper

    from edgec.runtime.remote import RemoteSession
    from test_int8_kernels import qdq_conv

    m, step = qdq_conv(np.random.default_rng(5), 1, c, 24, 3, 1, 1, (1, 1, 1, 1), 10, 13)
    for i, t in enumerate(m.graph.initializer):
        if t.name == "zx":
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array(zx, np.uint8),
                                                                    "zx"))
    report = compile_to(m, tmp_path / "art", target=target)
    assert any("int8" in k for k in report["kernels"]["counts"]), report["kernels"]
    sess = RemoteSession(tmp_path / "art", rpc_board.address, "rpi4")
    x = (np.random.default_rng(7).standard_normal((1, c, 10, 13)) * 1.5).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    got = sess.run(None, {"x": x})[0]
    diff = np.abs(got - ref)
    assert diff.max() <= step * 1.001 + 1e-6 and np.mean(diff > 1e-6) < 0.01


def test_rpc_errors(rpc_board, tiny, tmp_path, capsys):
    m, art, data = str(tiny / "m.onnx"), str(tiny / "rpi4"), str(tiny / "data.npz")
    assert main(["check", m, art, "--data", data, "--rpc", rpc_board.address,
                 "--key", "jetson"]) == 2
    err = capsys.readouterr().err
    assert "no board is registered under key 'jetson'" in err and "rpi4" in err
    assert main(["check", m, art, "--data", data, "--rpc", rpc_board.address]) == 2
    assert "--rpc needs --key" in capsys.readouterr().err
    assert main(["run", art, "--data", data, "-o", str(tmp_path / "y.npz"), "--rpc",
                 "nohost", "--key", "rpi4"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    # a library modified after the compile is refused before it reaches the board
    bad = tmp_path / "rpi4-bad"
    shutil.copytree(tiny / "rpi4", bad)
    with open(bad / "model.so", "ab") as f:
        f.write(b"\0")
    assert main(["run", str(bad), "--data", data, "-o", str(tmp_path / "y.npz"), "--rpc",
                 rpc_board.address,
                 "--key", "rpi4"]) == 2
    assert "does not match the sha256" in capsys.readouterr().err
    assert main(["board", "--list", "--tracker", rpc_board.address]) == 0
    assert "rpi4" in capsys.readouterr().out


def test_runtime_alone_on_the_emulated_board(rpc_board, tiny, tmp_path):
    """``edgec.runtime.Session`` on the aarch64 Python, whose site has numpy and TVM only."""
    from edgec.driver.board import emulator

    pkg = tmp_path / "deploy" / "edgec"
    _copy_runtime(pkg)
    emu = emulator()
    script = ("import sys, numpy as np\n"
              "from edgec.runtime import Session\n"
              "for m in ('onnx', 'onnxruntime'):\n"
              "    assert m not in sys.modules\n"
              "    try:\n"
              "        __import__(m)\n"
              "        raise SystemExit(m + ' is importable on the board')\n"
              "    except ImportError:\n"
              "        pass\n"
              f"s = Session({str(tiny / 'rpi4')!r})\n"
              f"x = np.load({str(tiny / 'data.npz')!r})['x'][:2]\n"
              f"np.save({str(tmp_path / 'y.npy')!r}, s.run(None, {{'x': x}})[0])\n")
    env = emu.env()
    env["PYTHONPATH"] = f"{pkg.parent}:{env['PYTHONPATH']}"
    res = subprocess.run(emu.command("-c", script), env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)  # (not the checkout's edgec/)
    assert res.returncode == 0, res.stderr[-2000:]
    x = np.load(tiny / "data.npz")["x"][:2]
    assert _rel_err(np.load(tmp_path / "y.npy"), _ref(tiny, x)) < 1e-4


def _copy_runtime(pkg: Path) -> None:
    """What a board needs of edgec: the package root, ``core.errors`` and ``runtime``."""
    (pkg / "core").mkdir(parents=True)
    shutil.copy(ROOT / "edgec" / "__init__.py", pkg / "__init__.py")
    shutil.copy(ROOT / "edgec" / "core" / "__init__.py", pkg / "core" / "__init__.py")
    shutil.copy(ROOT / "edgec" / "core" / "errors.py", pkg / "core" / "errors.py")
    shutil.copytree(ROOT / "runtime", pkg / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))


# ------------------------------------------------------------------ the runtime alone, here
BLOCKER = """
import sys
BLOCKED = ("onnx", "onnxruntime", "onnx_graphsurgeon", "torch", "edgec.passes",
           "edgec.targets", "edgec.driver", "edgec.core.importer", "edgec.core.graph")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_alone_here(tiny, tmp_path):
    """numpy + TVM: the artifact runs with onnx, onnxruntime and the compiler unimportable."""
    script = BLOCKER + (
        "import numpy as np\n"
        "from edgec.runtime import Session, run_batched\n"
        f"s = Session({str(tiny / 'x86')!r})\n"
        f"x = np.load({str(tiny / 'data.npz')!r})['x']\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, run_batched(s, {{'x': x}}, s.batch)[0])\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')]\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    x = np.load(tiny / "data.npz")["x"]
    assert _rel_err(np.load(tmp_path / "y.npy"), _ref(tiny, x)) < 1e-4


# ------------------------------------------------------------------ tampered libraries
def _foreign_library() -> Path | None:
    for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1"):
        if Path(p).is_file():
            return Path(p)
    return None


def _retarget(art: Path, tiny: Path, edit) -> Path:
    """Apply ``edit`` and record the new sha256 in the manifest, as a forger would."""
    edit(art, tiny)
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["model.so"] = sha256_file(art / "model.so")
    (art / "manifest.json").write_text(json.dumps(m))
    return art


def _truncate(art: Path, tiny: Path) -> None:
    data = (art / "model.so").read_bytes()
    (art / "model.so").write_bytes(data[:len(data) // 2])


def _foreign(art: Path, tiny: Path) -> None:
    lib = _foreign_library()
    if lib is None:
        pytest.skip("no system libz to stand in for a foreign library")
    shutil.copy(lib, art / "model.so")


def _garbage(art: Path, tiny: Path) -> None:
    (art / "model.so").write_bytes(b"\x7fELF" + b"\0" * 60 + b"not a library" * 100)


def _arm(art: Path, tiny: Path) -> None:
    shutil.copy(tiny / "rpi4" / "model.so", art / "model.so")


def _batch(art: Path, tiny: Path) -> None:
    m = json.loads((art / "manifest.json").read_text())
    m["inputs"][0]["shape"][0] = 3
    (art / "manifest.json").write_text(json.dumps(m))


def _classes(art: Path, tiny: Path) -> None:
    m = json.loads((art / "manifest.json").read_text())
    m["outputs"][0]["shape"][1] = 11
    (art / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,match", [
    (_truncate, "truncated"),
    (_foreign, "cannot load|not an edgec"),
    (_garbage, "not a 64-bit little-endian ELF"),
    (_arm, "a library for aarch64, the manifest says x86_64"),
    (_batch, "refused the inputs"),
    (_classes, "do not match"),
])
def test_tampered_library_is_a_clear_error(tiny, tmp_path, edit, match):
    """Run in a child process: a crash would kill it, not the test run."""
    art = tmp_path / "art"
    shutil.copytree(tiny / "x86", art)
    _retarget(art, tiny, edit)
    m = json.loads((art / "manifest.json").read_text())
    shape = m["inputs"][0]["shape"]
    np.savez(tmp_path / "in.npz", x=np.zeros(shape, np.float32))
    res = subprocess.run([sys.executable, "-m", "edgec.driver.cli", "run", str(art), "--data",
                          str(tmp_path / "in.npz"), "-o", str(tmp_path / "y.npz")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-1500:])
    import re

    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(match, lines[0]), res.stderr
    with pytest.raises(EdgecError, match=match):
        Session(art).run(None, {"x": np.zeros(shape, np.float32)})
