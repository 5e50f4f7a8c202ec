"""x86-64 host CPU target (LLVM, the host's own -mcpu, so AVX2/AVX-512 as the host has)."""

from __future__ import annotations

from . import TargetSpec, register_target


def host_cpu() -> str:
    from .backend import tvm

    return tvm.target.codegen.llvm_get_system_cpu()


def _x86_target(options: dict) -> dict:
    mcpu = options.get("mcpu") or host_cpu()
    t = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}
    if options.get("num_cores"):
        t["num-cores"] = int(options["num_cores"])
    return t


def cpu_phases(target, record: dict | None = None, schedules: bool = True) -> list:
    """Relax pipeline phases for LLVM CPU targets (x86 and arm share them).

    With ``schedules`` (the default), convolutions are legalized to packed-weight kernels and
    every fused function gets edgec's default CPU schedule (:mod:`.cpu_kernels`)."""
    from .backend import relax

    legalize = {}
    scheduled = []
    if schedules:
        from .cpu_kernels import (make_conv2d_legalizer, make_fast_math_legalizers,
                                  schedule_pass, simd_floats)

        legalize = {"relax.nn.conv2d": make_conv2d_legalizer(simd_floats(target)),
                    **make_fast_math_legalizers()}
        scheduled = [schedule_pass(target, record)]
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        # legalize: high-level ops -> TIR; fuse elementwise epilogues into their producers
        relax.transform.LegalizeOps(customize_legalize_map=legalize),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *scheduled,
        # dataflow lowering
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        # memory planning and VM lowering
        relax.transform.StaticPlanBlockMemory(),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


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
