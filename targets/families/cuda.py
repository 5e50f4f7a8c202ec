"""CUDA GPU targets: device code through nvcc (PTX), host code through LLVM.

* ``cuda``: an NVIDIA GPU on an x86-64 host. ``--cuda-arch`` picks the compute capability;
  when a GPU is present it is detected, otherwise the default is ``sm_75`` (Turing): its PTX
  is JIT-compiled by the driver on every newer GPU, so one artifact runs on T4 .. H100.
* ``jetson-orin``: Jetson AGX/NX Orin, sm_87 device code and an aarch64 (Cortex-A78AE) host,
  cross-linked with aarch64-linux-gnu-g++.

Artifacts build without a GPU present; running them needs one.
"""

from __future__ import annotations

import re

from edgec.core.errors import EdgecError

from ..spec import TargetSpec, register_target

from ._llvm import CROSS, CROSS_PKG, aarch64, x86_64

DEFAULT_CUDA_ARCH = "sm_75"


def _arch(options: dict, default: str) -> str:
    arch = options.get("cuda_arch")
    if not arch:
        from ..device import detected_cuda_arch  # (imports TVM)

        arch = detected_cuda_arch() or default
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise EdgecError(f"bad --cuda-arch '{arch}': expected e.g. sm_75, sm_87, sm_90")
    return arch


def cuda_phases(target, record=None, tuning_db: str | None = None) -> list:
    """The CUDA pipeline (:func:`edgec.targets.cuda_pipeline.cuda_phases`)."""
    from ..cuda_pipeline import cuda_phases as phases  # (TVM: at build time only)

    return phases(target, record, tuning_db=tuning_db)


def _cuda_target(options: dict) -> dict:
    return {"kind": "cuda", "arch": _arch(options, DEFAULT_CUDA_ARCH), "host": x86_64({})}


def _orin_target(options: dict) -> dict:
    arch = options.get("cuda_arch") or "sm_87"
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise EdgecError(f"bad --cuda-arch '{arch}': expected e.g. sm_87")
    return {"kind": "cuda", "arch": arch,
            "host": aarch64("cortex-a78", ["+neon", "+dotprod", "+fullfp16"])}


def _cuda_spec(name: str, description: str, make_target, host_arch: str,
               cross: bool) -> TargetSpec:
    return register_target(TargetSpec(
        name=name,
        family="cuda",
        description=description,
        make_target=make_target,
        phases=cuda_phases,
        device="cuda",
        cross_compiler=CROSS if cross else None,
        cross_package=CROSS_PKG if cross else None,
        host_arch=host_arch,
        tuning={"max_trials_per_task": 128, "num_trials_per_iter": 32},
        options=("cuda_arch",),
    ))


CUDA = _cuda_spec("cuda", "NVIDIA GPU on an x86-64 host (--cuda-arch; detected, else "
                  f"{DEFAULT_CUDA_ARCH})", _cuda_target, "x86_64", cross=False)
JETSON_ORIN = _cuda_spec("jetson-orin", "NVIDIA Jetson Orin (sm_87 GPU, aarch64 Cortex-A78AE "
                         "host)", _orin_target, "aarch64", cross=True)
