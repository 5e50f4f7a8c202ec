"""The Relax pipeline of LLVM CPU targets (x86 and arm share it), as phase lists.

1. :func:`rewrite_phases`: QDQ convolutions become integer kernels, before constants fold;
2. :func:`folded_phases`: once constants are folded, ConvTranspose as convolutions (phase
   decomposition), the requantize / residual folds, then layers with mostly-zero weights
   or few distinct weight values onto the sparse / lookup kernels;
3. :func:`legalize_map`: float convolutions, pools, quantize and fast math to the default
   kernels' compute (the rest through TOPI), then fusion of epilogues into them;
4. :func:`schedule_phases`: tuned schedules from the database, ConvTranspose's
   depth-to-space, then the default rule list;
5. VM lowering.

The fused TIR functions of 1-3 (:func:`cpu_front_phases`) are what both the default
schedules and tuning (:mod:`edgec.targets.tuning`) work on.
"""

from __future__ import annotations

from ..phases import front_phases, vm_lowering_phases
from ..records import BuildRecord
from ..tuning_db import apply_tuned_pass
from .isa import simd_floats
from .rewrites.concat_inplace import concat_inplace_pass, mark_plain_concats
from .rewrites.conv_transpose import conv_transpose_pass, d2s_schedule_pass
from .rewrites.expand_dw import expand_dw_pass
from .rewrites.fast_math import make_fast_math_legalizers
from .rewrites.nan_clamp import make_nan_clamp_legalizers, nan_clamp_pass
from .rewrites.float_conv import (make_conv2d_legalizer, make_matmul_legalizer,
                                  make_maxpool_legalizer)
from .rewrites.qdq_conv import rewrite_pass
from .rewrites.quantize_legalizer import make_quantize_legalizer
from .rewrites.residual_fold import requant_pass
from .rewrites.resize import resize_pass
from .rewrites.structured import structured_pass
from .rules import schedule_pass


def legalize_map(target) -> dict:
    """LegalizeOps overrides: the default kernels' compute for the target's vector width."""
    lanes = simd_floats(target)
    return {"relax.nn.conv2d": make_conv2d_legalizer(lanes),
            "relax.nn.max_pool2d": make_maxpool_legalizer(lanes),
            "relax.matmul": make_matmul_legalizer(lanes),
            "relax.quantize": make_quantize_legalizer(),
            **make_fast_math_legalizers(), **make_nan_clamp_legalizers()}


def rewrite_phases(target, record: BuildRecord | None, kernels: dict) -> list:
    """Before constants are folded: QDQ layers -> integer kernels (emitted into ``kernels``),
    resizes onto the resize kernel (TOPI's would be traced by the fold)."""
    return [rewrite_pass(target, record, kernels), resize_pass()]


def folded_phases(target, record: BuildRecord | None, kernels: dict) -> list:
    """After constants are folded: ConvTranspose with constant weights as convolutions of the
    input (the legalizer below gives them the conv kernels), the requantizing epilogues
    folded into ``kernels``, float layers with mostly-zero weights or few distinct values
    onto the sparse / lookup kernels (with their bias and clamps), expansion + depthwise
    pairs over large maps fused, then the float clamps left re-emitted to keep NaN."""
    return [conv_transpose_pass(), requant_pass(kernels, record), structured_pass(target, record),
            expand_dw_pass(target), nan_clamp_pass()]


def schedule_phases(target, record: BuildRecord | None, tuning_db: str | None) -> list:
    """Every fused function gets the default rule list's schedule, except those for which
    the tuning database ``tuning_db`` holds a schedule measured faster and ConvTranspose's
    depth-to-space functions (their own schedule)."""
    tuned = [apply_tuned_pass(target, tuning_db, record)] if tuning_db else []
    # concatenations are tagged after the tuned schedules are looked up (their keys hash the
    # functions as tuning saw them) and before the default ones (which the tag's check
    # cannot read)
    return [*tuned, mark_plain_concats(), d2s_schedule_pass(target, record),
            schedule_pass(target, record)]


def cpu_front_phases(target, record: BuildRecord | None = None) -> list:
    """Legalization and fusion for LLVM CPU targets (steps 1-3)."""
    kernels: dict = {}  # integer kernels emitted, for folding their requantizing epilogues
    return front_phases(legalize_map(target), pre=rewrite_phases(target, record, kernels),
                        folded=folded_phases(target, record, kernels))


def cpu_phases(target, record: BuildRecord | None = None, tuning_db: str | None = None) -> list:
    """Relax pipeline phases for LLVM CPU targets."""
    return [*cpu_front_phases(target, record), *schedule_phases(target, record, tuning_db),
            *vm_lowering_phases(before_planning=[concat_inplace_pass(record)])]
