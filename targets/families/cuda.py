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

from . import TargetSpec, register_target
from .arm import CROSS, CROSS_PKG, aarch64

DEFAULT_CUDA_ARCH = "sm_75"


def _arch(options: dict, default: str) -> str:
    arch = options.get("cuda_arch")
    if not arch:
        from .backend import detected_cuda_arch

        arch = detected_cuda_arch() or default
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise EdgecError(f"bad --cuda-arch '{arch}': expected e.g. sm_75, sm_87, sm_90")
    return arch


def cuda_phases(target, record: dict | None = None, tuning_db: str | None = None) -> list:
    """Relax pipeline phases for CUDA: dlight's default GPU schedules after legalization."""
    from tvm.s_tir import dlight as dl

    from .backend import front_phases, vm_lowering_phases

    return [
        *front_phases(),
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
        *vm_lowering_phases(cuda_graphs=True),
    ]


def _cuda_target(options: dict) -> dict:
    from .x86 import _x86_target

    return {"kind": "cuda", "arch": _arch(options, DEFAULT_CUDA_ARCH),
            "host": _x86_target({})}


def _orin_target(options: dict) -> dict:
    arch = options.get("cuda_arch") or "sm_87"
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise EdgecError(f"bad --cuda-arch '{arch}': expected e.g. sm_87")
    return {"kind": "cuda", "arch": arch,
            "host": aarch64("cortex-a78", ["+neon", "+dotprod", "+fullfp16"])}


CUDA = register_target(TargetSpec(
    name="cuda",
    family="cuda",
    description=f"NVIDIA GPU on an x86-64 host (--cuda-arch; detected, else {DEFAULT_CUDA_ARCH})",
    make_target=_cuda_target,
    phases=cuda_phases,
    device="cuda",
    host_arch="x86_64",
    tuning={"max_trials_per_task": 128, "num_trials_per_iter": 32},
    options=("cuda_arch",),
))

JETSON_ORIN = register_target(TargetSpec(
    name="jetson-orin",
    family="cuda",
    description="NVIDIA Jetson Orin (sm_87 GPU, aarch64 Cortex-A78AE host)",
    make_target=_orin_target,
    phases=cuda_phases,
    device="cuda",
    cross_compiler=CROSS,
    cross_package=CROSS_PKG,
    host_arch="aarch64",
    tuning={"max_trials_per_task": 128, "num_trials_per_iter": 32},
    options=("cuda_arch",),
))
