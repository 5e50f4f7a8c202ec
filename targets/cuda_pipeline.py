"""Relax pipeline phases for CUDA targets: dlight's default GPU schedules after legalization."""

from __future__ import annotations

from tvm.s_tir import dlight as dl

from .phases import front_phases, vm_lowering_phases


def cuda_phases(target, record=None, tuning_db: str | None = None) -> list:
    """Relax pipeline phases for CUDA: dlight's default GPU schedules after legalization."""
    return [
        *front_phases(),
        dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
        *vm_lowering_phases(cuda_graphs=True),
    ]
