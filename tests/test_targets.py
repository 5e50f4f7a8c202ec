"""Every target builds on this (GPU-less, x86-64) machine; ARM libraries are aarch64 ELF."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import compile_to, conv_bn_model
from edgec.core.errors import EdgecError
from edgec.targets import get_target, list_targets


def elf_machine(path) -> str:
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True).stdout


@pytest.mark.parametrize("target,arch", [("arm64", "aarch64"), ("rpi4", "aarch64"),
                                         ("rpi5", "aarch64")])
def test_arm_artifacts_are_aarch64_elf(tmp_path, target, arch):
    out = tmp_path / target
    compile_to(conv_bn_model(), out, target=target)
    head = (out / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    assert int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["host_arch"] == "aarch64"
    tvm_target = json.dumps(manifest["tvm_target"])
    assert "aarch64" in tvm_target
    if target == "rpi4":
        assert "cortex-a72" in tvm_target
    if target == "rpi5":
        assert "cortex-a76" in tvm_target and "+dotprod" in tvm_target


def test_cuda_builds_without_gpu(tmp_path):
    out = tmp_path / "cuda"
    compile_to(conv_bn_model(), out, target="cuda")
    lib = (out / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 62  # x86-64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"] == "cuda"
    assert manifest["tvm_target"]["kind"] == "cuda"
    assert manifest["tvm_target"]["arch"].startswith("sm_")
    # the device code is embedded in the library
    assert b".version" in lib or b"sm_" in lib


def test_jetson_orin_host_is_aarch64_and_sm87(tmp_path):
    out = tmp_path / "orin"
    compile_to(conv_bn_model(), out, target="jetson-orin")
    head = (out / "model.so").read_bytes()[:20]
    assert int.from_bytes(head[18:20], "little") == 183
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tvm_target"]["arch"] == "sm_87"


def test_cuda_arch_option(tmp_path):
    out = tmp_path / "c86"
    compile_to(conv_bn_model(), out, target="cuda", target_options={"cuda_arch": "sm_86"})
    assert json.loads((out / "manifest.json").read_text())["tvm_target"]["arch"] == "sm_86"
    with pytest.raises(EdgecError, match="cuda-arch"):
        compile_to(conv_bn_model(), tmp_path / "bad", target="cuda",
                   target_options={"cuda_arch": "turing"})
    assert not (tmp_path / "bad").exists()


def test_missing_cross_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EdgecError, match="aarch64-linux-gnu-g\\+\\+.*apt-get install"):
        compile_to(conv_bn_model(), tmp_path / "o", target="rpi4")
    assert not (tmp_path / "o").exists()


def test_running_a_foreign_artifact_is_refused(tmp_path):
    from edgec.runtime import Session

    compile_to(conv_bn_model(), tmp_path / "pi", target="rpi4")
    with pytest.raises(EdgecError, match="aarch64"):
        Session(tmp_path / "pi")


def test_target_specs_are_complete():
    names = {t.name for t in list_targets()}
    assert {"x86", "arm64", "rpi4", "rpi5", "jetson-orin", "cuda"} <= names
    for t in list_targets():
        assert t.tuning and callable(t.phases) and t.family in {"x86", "arm", "cuda"}
    with pytest.raises(EdgecError, match="unknown target"):
        get_target("z80")
