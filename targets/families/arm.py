"""64-bit Arm CPU targets (LLVM aarch64), cross-linked with aarch64-linux-gnu-g++.

* ``arm64``: generic aarch64 with NEON;
* ``rpi4``:  Raspberry Pi 4, Cortex-A72 (NEON);
* ``rpi5``:  Raspberry Pi 5, Cortex-A76 (+dotprod, +fp16 arithmetic).
"""

from __future__ import annotations

from ..spec import TargetSpec, register_target

from ._llvm import CPU_TUNING, CROSS, CROSS_PKG, aarch64, cpu_phases


def _arm_spec(name: str, description: str, mcpu: str | None, mattr: list[str]) -> TargetSpec:
    return register_target(TargetSpec(
        name=name,
        family="arm",
        description=description,
        make_target=lambda options: aarch64(options.get("mcpu") or mcpu, mattr),
        phases=cpu_phases,
        device="cpu",
        cross_compiler=CROSS,
        cross_package=CROSS_PKG,
        host_arch="aarch64",
        tuning=CPU_TUNING,
        options=("mcpu",),
    ))


ARM64 = _arm_spec("arm64", "generic 64-bit Arm (aarch64 + NEON)", None, ["+neon"])
RPI4 = _arm_spec("rpi4", "Raspberry Pi 4 (Cortex-A72, NEON)", "cortex-a72", ["+neon"])
RPI5 = _arm_spec("rpi5", "Raspberry Pi 5 (Cortex-A76, NEON, dotprod, fp16)", "cortex-a76",
                 ["+neon", "+dotprod", "+fullfp16"])
