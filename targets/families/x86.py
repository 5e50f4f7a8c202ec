"""x86-64 host CPU target (LLVM, the host's own -mcpu, so AVX2/AVX-512 as the host has)."""

from __future__ import annotations

import os

from . import TargetSpec, register_target


def host_cpu() -> str:
    from .backend import tvm

    return tvm.target.codegen.llvm_get_system_cpu()


def _x86_target(options: dict) -> dict:
    mcpu = options.get("mcpu") or host_cpu()
    # num-cores: the worker count MetaSchedule tunes for (it refuses a target without it)
    cores = int(options.get("num_cores") or _physical_cores())
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def cpu_front_phases(target, record: dict | None = None) -> list:
    """Legalization and fusion for LLVM CPU targets: QDQ convolutions become integer kernels
    (:mod:`.cpu_int8`), float ones packed-weight kernels; the fused TIR functions are what
    both the default schedules and tuning (:mod:`.tuning`) work on."""
    from .backend import front_phases
    from .cpu_int8 import make_quantize_legalizer, requant_pass, rewrite_pass
    from .cpu_kernels import (make_conv2d_legalizer, make_fast_math_legalizers,
                              make_maxpool_legalizer, simd_floats)

    kernels: dict = {}  # integer kernels emitted, for folding their requantizing epilogues
    lanes = simd_floats(target)
    return front_phases({"relax.nn.conv2d": make_conv2d_legalizer(lanes),
                         "relax.nn.max_pool2d": make_maxpool_legalizer(lanes),
                         "relax.quantize": make_quantize_legalizer(),
                         **make_fast_math_legalizers()},
                        pre=[rewrite_pass(target, record, kernels)],
                        folded=[requant_pass(kernels, record)])


def cpu_phases(target, record: dict | None = None, tuning_db: str | None = None) -> list:
    """Relax pipeline phases for LLVM CPU targets (x86 and arm share them).

    Every fused function gets edgec's default CPU schedule (:mod:`.cpu_kernels`), except
    those for which the tuning database ``tuning_db`` holds a schedule measured faster."""
    from .backend import vm_lowering_phases
    from .cpu_kernels import schedule_pass

    scheduled = []
    if tuning_db:
        from .tuning import apply_tuned_pass

        scheduled.append(apply_tuned_pass(target, tuning_db, record))
    scheduled.append(schedule_pass(target, record))
    return [*cpu_front_phases(target, record), *scheduled, *vm_lowering_phases()]


X86 = register_target(TargetSpec(
    name="x86",
    family="x86",
    description="this machine's x86-64 CPU (LLVM, -mcpu from llvm_get_system_cpu)",
    make_target=_x86_target,
    phases=cpu_phases,
    device="cpu",
    host_arch="x86_64",
    tuning={"max_trials_per_task": 64, "num_trials_per_iter": 16},
    options=("mcpu",),
))
