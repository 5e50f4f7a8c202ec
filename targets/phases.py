"""Relax phases every target shares: the front (library dispatch, legalization, fusion) and
the end (VM lowering), and :func:`sequential` to run a phase list under a target."""

from __future__ import annotations

import tvm
from tvm import relax


def front_phases(legalize: dict | None = None, pre: list | None = None,
                 folded: list | None = None) -> list:
    """The phases every target starts with: library dispatch, legalization to TIR (with
    per-target overrides; ``pre``: target rewrites that must see the graph before constants
    are folded; ``folded``: rewrites that need them folded) and fusion of elementwise
    epilogues into their producers."""
    return [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        *(pre or []),
        # evaluate ops on constants first -- e.g. DequantizeLinear of int8 weights -- so the
        # legalizers below see constant weights (packed kernels need them)
        relax.transform.FoldConstant(),
        *(folded or []),
        relax.transform.LegalizeOps(customize_legalize_map=legalize or {}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def vm_lowering_phases(cuda_graphs: bool = False, before_planning: list | None = None) -> list:
    """The phases every target ends with: dataflow lowering, memory planning, VM lowering;
    ``before_planning``: target passes on the explicit allocations, before memory planning
    (the CPU's copy-free concatenations)."""
    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        *(before_planning or []),
        relax.transform.StaticPlanBlockMemory(),
        *([relax.transform.RewriteCUDAGraph()] if cuda_graphs else []),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def sequential(target, phases):
    """Wrap a target family's phase list as one Relax module pass run under ``target``."""

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(phases)(mod)

    return _pipeline



# LoopPartition splits pad stages (bounds tests marked likely) into border and an interior
# that copies without tests and vectorizes. It also splits a vectorized loop whose bounds
# test falls inside it, which then fails to vectorize: schedules from elsewhere (tuning)
# are built under the same configuration before they are used.
BUILD_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}


def build_context() -> tvm.transform.PassContext:
    """The pass context every build runs in: a model's, and a tuning candidate's."""
    return tvm.transform.PassContext(opt_level=3, config=BUILD_CONFIG)
