"""The CPUID mask that lets onnxruntime run as on an older x86 CPU (edgec.driver.cpumask)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgec.core.errors import EdgecError
from edgec.driver import cpumask

_FEATURES = ("import json, numpy as np; f = np._core._multiarray_umath.__cpu_features__; "
             "print(json.dumps({k: bool(f[k]) for k in ('SSE42', 'AVX2', 'FMA3', 'AVX512F', "
             "'AVX512_SKX', 'AVX512VNNI')}))")

needs_mask = pytest.mark.skipif(cpumask.supported() is not None,
                                reason=f"no CPUID masking here: {cpumask.supported()}")


def _features(env=None) -> dict:
    res = subprocess.run([sys.executable, "-c", _FEATURES], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-500:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@needs_mask
def test_haswell_child_sees_no_avx512_and_keeps_avx2():
    host = _features()
    masked = _features(cpumask.child_env("haswell"))
    assert masked["AVX512F"] is False and masked["AVX512_SKX"] is False
    assert masked["AVX512VNNI"] is False
    # what a Haswell has stays as the host has it
    for k in ("SSE42", "AVX2", "FMA3"):
        assert masked[k] == host[k]


@needs_mask
def test_masked_onnxruntime_computes_the_same(tmp_path):
    """onnxruntime under the mask (other kernels) gives the host run's outputs."""
    from edgec.models import zoo

    src = tmp_path / "m.onnx"
    zoo.export("fashion_cnn", src, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, onnxruntime as ort; "
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
            "np.save(sys.argv[3], s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[2])})[0])")
    for name, env in (("host", None), ("masked", cpumask.child_env("haswell"))):
        res = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "x.npy"),
                              str(tmp_path / f"{name}.npy")], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-500:]
    np.testing.assert_allclose(np.load(tmp_path / "masked.npy"), np.load(tmp_path / "host.npy"),
                               rtol=1e-4, atol=1e-5)


@needs_mask
def test_a_real_segfault_still_kills_the_masked_child():
    """The handler steps over faulting cpuid instructions only: a genuine bad read dies of
    SIGSEGV as it would unmasked (no loop, no hang)."""
    res = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"],
                         capture_output=True, env=cpumask.child_env("haswell"), timeout=120)
    assert res.returncode == -11


@needs_mask
def test_library_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path))
    lib = cpumask.library("haswell")
    stamp = lib.stat().st_mtime_ns
    assert cpumask.library("haswell") == lib and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]   # no build leftovers


def test_unknown_family_and_unsupported_host_are_clear_errors(monkeypatch):
    with pytest.raises(EdgecError, match="no CPUID mask for -mcpu 'cortex-a72'"):
        cpumask.library("cortex-a72")
    monkeypatch.setattr(cpumask, "supported", lambda: "this CPU has no CPUID faulting")
    with pytest.raises(EdgecError, match="cannot run the peer as a haswell CPU: this CPU"):
        cpumask.child_env("haswell")


@needs_mask
@pytest.mark.slow  # ~25 s: a compile and six timing workers
def test_bench_cli_peer_cpu(tmp_path, capsys):
    """``edgec bench --peer-cpu haswell`` times onnxruntime both ways and says which is which."""
    from edgec.driver.cli import main
    from edgec.models import zoo

    src = tmp_path / "m.onnx"
    zoo.export("fashion_cnn", src, seed=0)
    art = tmp_path / "art"
    assert main(["compile", str(src), "-t", "x86", "--mcpu", "haswell", "--no-tuning-db",
                 "-o", str(art)]) == 0
    out_json = tmp_path / "b.json"
    assert main(["bench", str(src), str(art), "--repeat", "3", "--peer-cpu", "haswell",
                 "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "(as on a haswell CPU)" in text and "this host's kernels" in text
    r = json.loads(out_json.read_text())
    assert r["onnxruntime_cpu"] == "haswell" and r["onnxruntime_host_ms"] > 0
    assert r["ratio"] == pytest.approx(r["onnxruntime_ms"] / r["edgec_ms"])
    assert main(["bench", str(src), str(art), "--repeat", "1", "--peer-cpu", "z80"]) != 0
    assert "no CPUID mask for -mcpu 'z80'" in capsys.readouterr().err
