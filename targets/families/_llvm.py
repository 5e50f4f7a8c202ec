"""What the LLVM CPU families share: target dicts for x86-64 and aarch64, the cross linker,
tuning defaults, and the CPU pipeline (imported, with TVM, only when a build asks for it)."""

from __future__ import annotations

import os

CROSS = "aarch64-linux-gnu-g++"
CROSS_PKG = "g++-aarch64-linux-gnu"
CPU_TUNING = {"max_trials_per_task": 64, "num_trials_per_iter": 16}


def host_cpu() -> str:
    import tvm  # (only when a target is made: listing targets imports no TVM)

    return tvm.target.codegen.llvm_get_system_cpu()


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def x86_64(options: dict) -> dict:
    """This machine's x86-64 CPU (or ``options["mcpu"]``) as an LLVM target dict."""
    mcpu = options.get("mcpu") or host_cpu()
    # num-cores: the worker count MetaSchedule tunes for (it refuses a target without it)
    cores = int(options.get("num_cores") or physical_cores())
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}


def aarch64(mcpu: str | None, mattr: list[str]) -> dict:
    t = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": list(mattr)}
    if mcpu:
        t["mcpu"] = mcpu
    return t


def cpu_phases(target, record=None, tuning_db: str | None = None) -> list:
    """The LLVM CPU pipeline (:func:`edgec.targets.cpu.pipeline.cpu_phases`)."""
    from ..cpu.pipeline import cpu_phases as phases  # (TVM: at build time only)

    return phases(target, record, tuning_db=tuning_db)
