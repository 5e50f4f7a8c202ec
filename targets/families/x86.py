"""x86-64 host CPU target (LLVM, the host's own -mcpu, so AVX2/AVX-512 as the host has)."""

from __future__ import annotations

from ..spec import TargetSpec, register_target

from ._llvm import CPU_TUNING, cpu_phases, x86_64

X86 = register_target(TargetSpec(
    name="x86",
    family="x86",
    description="this machine's x86-64 CPU (LLVM, -mcpu from llvm_get_system_cpu)",
    make_target=x86_64,
    phases=cpu_phases,
    device="cpu",
    host_arch="x86_64",
    tuning=CPU_TUNING,
    options=("mcpu",),
))
