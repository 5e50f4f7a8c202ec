"""The artifact folder: what -o may replace, the input model never replaced, and the staged
swap under crashes (kill -9, a failure between renames) and concurrent compiles."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import conv_bn_model
from edgec.core.errors import EdgecError
from edgec.runtime import artifact
from edgec.runtime.artifact import FORMAT, is_artifact, remove_stale, staging


def edgec(*args):
    return subprocess.run([sys.executable, "-m", "edgec.driver.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def fake_artifact(folder: Path, tag: str) -> None:
    (folder / "manifest.json").write_text(json.dumps({"format": FORMAT, "tag": tag}))
    (folder / "model.onnx").write_text(tag * 1000)


def tag_of(out: Path) -> str:
    return json.loads((out / "manifest.json").read_text())["tag"]


def leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


# ------------------------------------------------------------------ what -o may replace (1, 2)
def test_manifest_alone_does_not_make_an_artifact(tmp_path):
    site = tmp_path / "site"
    (site / "src").mkdir(parents=True)
    (site / "manifest.json").write_text('{"name": "app"}')
    (site / "index.html").write_text("x")
    assert not is_artifact(site)
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    res = edgec("compile", tmp_path / "m.onnx", "-o", site, "--no-build")
    assert res.returncode == 2 and "not an edgec artifact" in res.stderr, res.stderr
    assert (site / "index.html").read_text() == "x" and (site / "src").is_dir()


def test_artifact_with_foreign_files_is_not_replaced(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    fake_artifact(art, "a")
    assert is_artifact(art)
    (art / "notes.txt").write_text("mine")  # a real marker, but not only our files
    assert not is_artifact(art)
    (art / "notes.txt").unlink()
    (art / "plots").mkdir()
    (art / "plots" / "lowrank.png").write_bytes(b"png")
    assert is_artifact(art)
    with pytest.raises(EdgecError, match="not an edgec artifact"):
        with staging(tmp_path / "art2"):
            (tmp_path / "art2").mkdir()
            (tmp_path / "art2" / "x").write_text("appeared meanwhile")


def test_input_model_inside_output_is_refused(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    assert edgec("compile", tmp_path / "m.onnx", "-o", tmp_path / "art",
                 "--no-build").returncode == 0
    src = tmp_path / "art" / "model.onnx"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    res = edgec("compile", src, "-o", tmp_path / "art", "--no-build")
    assert res.returncode == 2 and "inside the output folder" in res.stderr, res.stderr
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    # through a symlink to the artifact as well
    (tmp_path / "link").symlink_to(tmp_path / "art")
    res = edgec("compile", tmp_path / "link" / "model.onnx", "-o", tmp_path / "link",
                "--no-build")
    assert res.returncode == 2 and "inside the output folder" in res.stderr, res.stderr
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest


def test_symlinked_output_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    fake_artifact(real, "old")
    (tmp_path / "link").symlink_to(real)
    with staging(tmp_path / "link") as tmp:
        fake_artifact(tmp, "new")
    assert (tmp_path / "link").is_symlink() and tag_of(tmp_path / "link") == "new"
    assert leftovers(tmp_path, real) == [] and oct(real.stat().st_mode & 0o777) != "0o700"


def test_empty_output_path_refused(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    res = edgec("compile", tmp_path / "m.onnx", "-o", "", "--no-build")
    assert res.returncode == 2 and "empty output path" in res.stderr
    assert not (tmp_path / "m.edgec").exists()


def test_unwritable_output_is_a_user_error_before_the_work(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    res = edgec("compile", tmp_path / "m.onnx", "-o", "/proc/edgec-out", "--no-build")
    assert res.returncode == 2 and "cannot write" in res.stderr, res.stderr
    (tmp_path / "file").write_text("x")
    res = edgec("compile", tmp_path / "m.onnx", "-o", tmp_path / "file" / "sub", "--no-build")
    assert res.returncode == 2, res.stderr


# ------------------------------------------------------------------ the swap (3)
_HOLDER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from edgec.runtime import artifact
    out, tag, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "crash-between":
        artifact._renameat2_exchange = lambda a, b: False
        def hook(stage):
            if stage == "between-renames":
                import os; os._exit(9)
        artifact._HOOK = hook
    if mode == "barrier":
        def hook(stage):
            if stage == "staged":
                Path(str(out) + "." + tag + ".ready").touch()
                while len(list(out.parent.glob(out.name + ".*.ready"))) < 2:
                    time.sleep(0.01)
        artifact._HOOK = hook
    with artifact.staging(out) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"format": artifact.FORMAT, "tag": tag}))
        (tmp / "model.onnx").write_text(tag * 100000)
        if mode == "hold":
            print("ready", flush=True)
            time.sleep(120)
""")


def _holder(out: Path, tag: str, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), tag, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_compile_leftover_removed_by_the_next(tmp_path):
    out = tmp_path / "out"
    p = _holder(out, "dead", "hold")
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert len(leftovers(tmp_path, out)) == 1 and not out.exists()
    with staging(out) as tmp:
        fake_artifact(tmp, "new")
    assert tag_of(out) == "new" and leftovers(tmp_path, out) == []


def test_live_compile_staging_is_left_alone(tmp_path):
    out = tmp_path / "out"
    p = _holder(out, "live", "hold")
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        theirs = leftovers(tmp_path, out)
        with staging(out) as tmp:
            fake_artifact(tmp, "mine")
        assert tag_of(out) == "mine" and leftovers(tmp_path, out) == theirs
    finally:
        p.kill()
        p.wait()


def test_failure_between_renames_keeps_the_old_artifact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    fake_artifact(out, "old")
    monkeypatch.setattr(artifact, "_renameat2_exchange", lambda a, b: False)

    def hook(stage):
        if stage == "between-renames":
            raise OSError(5, "I/O error")

    monkeypatch.setattr(artifact, "_HOOK", hook)
    with pytest.raises(EdgecError):
        with staging(out) as tmp:
            fake_artifact(tmp, "new")
    assert tag_of(out) == "old" and leftovers(tmp_path, out) == []


def test_crash_between_renames_is_repaired(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fake_artifact(out, "old")
    p = _holder(out, "new", "crash-between")
    assert p.wait(timeout=120) == 9, p.stderr.read()
    assert not out.exists()  # the old one is hidden in .out.old-*, the new one in .out.tmp-*
    remove_stale(out)
    assert tag_of(out) == "old" and leftovers(tmp_path, out) == []


def test_exchange_keeps_the_old_artifact_until_the_swap(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    fake_artifact(out, "old")
    seen = []
    monkeypatch.setattr(artifact, "_HOOK", lambda stage: seen.append((stage, tag_of(out))))
    with staging(out) as tmp:
        fake_artifact(tmp, "new")
    assert seen == [("staged", "old"), ("locked", "old"), ("swapped", "new")]
    assert leftovers(tmp_path, out) == []


@pytest.mark.parametrize("existing", [False, True])
def test_concurrent_compiles_both_succeed(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        fake_artifact(out, "old")
    procs = [_holder(out, tag, "barrier") for tag in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert tag_of(out) in ("a", "b")
    assert (out / "model.onnx").read_text() == tag_of(out) * 100000
    assert is_artifact(out)
    assert [n for n in leftovers(tmp_path, out) if not n.endswith(".ready")] == []


# ------------------------------------------------------------------ loading an artifact (12, 14)
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import compile_to

    out = tmp_path_factory.mktemp("built") / "art"
    compile_to(conv_bn_model(), out)
    return out


def _copy(built: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(built, dst)
    return dst


def test_manifest_records_file_hashes_and_modes(built):
    import stat

    m = json.loads((built / "manifest.json").read_text())
    assert set(m["files"]) == {"model.so", "model.onnx", "report.json"}
    assert m["files"]["model.so"] == hashlib.sha256((built / "model.so").read_bytes()).hexdigest()
    mode = stat.S_IMODE(built.stat().st_mode)
    assert mode & 0o055 == 0o055 & ~_umask(), oct(mode)  # not mkdtemp's 0700


def _umask() -> int:
    u = os.umask(0)
    os.umask(u)
    return u


def test_modified_library_is_not_loaded(built, tmp_path):
    from edgec.runtime import Session

    art = _copy(built, tmp_path)
    with open(art / "model.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EdgecError, match="does not match the sha256"):
        Session(art)
    m = json.loads((art / "manifest.json").read_text())
    del m["files"]
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgecError, match="no sha256"):
        Session(art)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(outputs="logits"),
    lambda m: m.update(inputs=[{"name": "x"}]),
    lambda m: m["inputs"][0].update(dtype="float99"),
    lambda m: m["inputs"][0].update(shape=[1, -3]),
    lambda m: m.pop("device"),
    lambda m: m.update(files=["model.so"]),
])
def test_tampered_manifest_is_a_user_error(built, tmp_path, edit):
    from edgec.runtime import Session

    art = _copy(built, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgecError, match="corrupt"):
        Session(art)


def test_session_refuses_unknown_outputs_and_wrong_dtypes(built):
    import numpy as np

    from edgec.runtime import Session, check_threads, max_threads, run_batched

    sess = Session(built, num_threads=64)
    x = np.zeros((1, 3, 12, 12), np.float32)
    with pytest.raises(EdgecError, match="unknown output"):
        sess.run(["nope"], {"x": x})
    with pytest.raises(EdgecError, match="output_names"):
        sess.run("logits", {"x": x})
    for bad in (np.int64, np.bool_):
        with pytest.raises(EdgecError, match="dtype"):
            sess.run(None, {"x": x.astype(bad)})
    assert sess.run(["logits"], {"x": x.astype(np.float64)})[0].shape == (1, 10)
    with pytest.raises(EdgecError, match="0 rows"):
        run_batched(sess, {"x": x[:0]}, sess.batch)
    assert check_threads(64) == max_threads() <= os.cpu_count()
    with pytest.raises(EdgecError):
        check_threads(0)


# ------------------------------------------------------------------ a library that loads (4)
def test_zero_size_constant_compiles_into_a_loadable_artifact(tmp_path):
    import numpy as np
    from onnx import helper

    from conftest import compile_to, make_model
    from edgec.runtime import Session

    m = make_model([helper.make_node("Concat", ["x", "z0"], ["y"], axis=1)], [("x", [1, 4])],
                   [("y", [1, 4])], {"z0": np.zeros((1, 0), np.float32)})
    compile_to(m, tmp_path / "z")
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_array_equal(Session(tmp_path / "z").run(None, {"x": x})[0], x)


def test_compile_fails_when_the_library_does_not_load(tmp_path, monkeypatch):
    from conftest import compile_to
    from edgec.targets import backend
    from edgec.targets.records import BuildRecord, BuildResult, BuildTimings

    def bad_build(model, spec, lib_path, *a, **kw):
        Path(lib_path).write_bytes(b"\x7fELF not really")
        return BuildResult(BuildTimings(), {}, BuildRecord())

    monkeypatch.setattr(backend, "build", bad_build)
    with pytest.raises(EdgecError, match="does not load.*nothing written"):
        compile_to(conv_bn_model(), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path, tmp_path / "bad") == []


def test_two_cli_compiles_to_one_folder(tmp_path):
    """The reproduction: two compiles finishing together (the loser exited 3 and leaked its
    staging folder). Both succeed now and leave one complete artifact."""
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "edgec.driver.cli", "compile", str(tmp_path / "m.onnx"),
           "-o", str(out)]
    for _ in range(2):
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
        assert is_artifact(out) and leftovers(tmp_path, out) == []
    from edgec.runtime import Session

    assert Session(out).run(None, {"x": np.zeros((1, 3, 12, 12), np.float32)})[0].shape == (1, 10)
