"""The CPU's vector units, as the kernels see them: float lanes and the integer dot products.

* :func:`simd_floats`: float32 lanes of the widest vector unit (16 AVX-512, 8 AVX2, 4 NEON);
* :class:`DotISA` / :data:`ISAS` / :func:`select_isa`: the integer dot product of an 8-bit
  convolution's packed operands, one instruction adding ``D`` products into each of ``L``
  int32 lanes;
* register budgets of the kernels' tiles (:func:`max_cols`, :func:`px_budget`,
  :func:`px_accumulators`).

Per ISA (chosen from the target's CPU features):

==================  ====  ====  ================  =========================================
ISA                  L     D    A x B             instruction
==================  ====  ====  ================  =========================================
avx512vnni           16    4    u8 x s8           vpdpbusd zmm (no saturation: i32 sums)
avxvnni               8    4    u8 x s8           vpdpbusd ymm (VEX)
avx512bw             16    2    s16 x s16         vpmaddwd zmm (A = X - zx: exact, no
avx2                  8    2    s16 x s16         vpmaddwd ymm  vpmaddubsw saturation)
avx512bw-s7          16    4    u8 x s7           vpmaddubsw + vpmaddwd(1) zmm, 7-bit weights
avx2-s7               8    4    u8 x s7           vpmaddubsw + vpmaddwd(1) ymm, 7-bit weights
aarch64 +dotprod      4    4    s8 x s8           sdot (A = X - 128, zero point shifted)
other                 4    2    s16 x s16         plain vector code
==================  ====  ====  ================  =========================================

``vpmaddubsw`` (u8 x s8 -> saturating s16 pair sums) is exact only while a pair sum fits
int16: ``255 * (|w1| + |w2|) <= 32767``, i.e. weights within [-64, 64] (255 * 127 * 2
overflows). A layer whose int8 weights all lie there (``quantize weight_bits=7``, the default
for x86 targets without VNNI) takes the ``-s7`` form on AVX2 / AVX-512BW: four products per
lane and step from 8-bit operands, half the bytes of the s16 form; other layers keep the exact
s16 form. Which form a kernel was built for travels as the block annotation ``ISA_ATTR``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.target.codegen import target_has_features

ISA_ATTR = "edgec_int8_isa"  # block annotation: the DotISA name the kernel was built for


# ---------------------------------------------------------------------------------- float lanes
def simd_floats(target) -> int:
    """float32 lanes of the target's widest vector unit."""
    keys = str(target).lower()
    if "aarch64" in keys or "arm" in keys:
        return 4
    feats = set()
    try:
        feats = {str(f).lower() for f in target.attrs.get("mattr", [])}
    except Exception:  # noqa: BLE001
        pass
    mcpu = str(target.attrs.get("mcpu", "")) if hasattr(target, "attrs") else ""
    if any("avx512f" in f for f in feats) or _mcpu_has_avx512(mcpu):
        return 16
    return 8


def _mcpu_has_avx512(mcpu: str) -> bool:
    mcpu = mcpu.lower()
    return mcpu.startswith(("skylake-avx512", "cascadelake", "cooperlake", "icelake",
                            "tigerlake", "sapphirerapids", "emeraldrapids", "graniterapids",
                            "znver4", "znver5", "rocketlake", "cannonlake", "x86-64-v4"))



# ---------------------------------------------------------------------------------- integer ISAs
@dataclass(frozen=True)
class DotISA:
    name: str
    lanes: int       # int32 accumulators per vector
    depth: int       # products summed into each lane per instruction
    a_dtype: str     # packed activation element type
    b_dtype: str     # packed weight element type
    a_shift: int | None  # None: int16 forms, A = X - zx; else 8-bit forms, A = X moved into
    #                      A's type (u8: +128 for an int8 input; s8: -128 for a uint8 input)
    llvm: str | None     # the LLVM intrinsic; None: plain vector code, no tensorize
    widen: str | None = None  # vpmaddwd after vpmaddubsw: s16 pair sums -> s32 (times ones)

    @property
    def intrin_name(self) -> str:
        return f"edgec_dot_{self.name}".replace("-", "_")

    @property
    def accumulates(self) -> bool:
        """Whether the instruction adds into the accumulator itself (vpdpbusd, sdot)."""
        return self.depth == 4 and self.widen is None

    @property
    def max_weight(self) -> int:
        """The largest |weight| the form is exact for (see the module docstring)."""
        return 64 if self.widen else 127


ISAS = {
    "avx512vnni": DotISA("avx512vnni", 16, 4, "uint8", "int8", 0,
                         "llvm.x86.avx512.vpdpbusd.512"),
    "avxvnni": DotISA("avxvnni", 8, 4, "uint8", "int8", 0, "llvm.x86.avx512.vpdpbusd.256"),
    "avx512bw": DotISA("avx512bw", 16, 2, "int16", "int16", None,
                       "llvm.x86.avx512.pmaddw.d.512"),
    "avx2": DotISA("avx2", 8, 2, "int16", "int16", None, "llvm.x86.avx2.pmadd.wd"),
    "avx512bw-s7": DotISA("avx512bw-s7", 16, 4, "uint8", "int8", 0,
                          "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
    "avx2-s7": DotISA("avx2-s7", 8, 4, "uint8", "int8", 0, "llvm.x86.avx2.pmadd.ub.sw",
                      "llvm.x86.avx2.pmadd.wd"),
    "dotprod": DotISA("dotprod", 4, 4, "int8", "int8", -128,
                      "llvm.aarch64.neon.sdot.v4i32.v16i8"),
    "generic": DotISA("generic", 4, 2, "int16", "int16", None, None),
}



def select_isa(target) -> DotISA:
    """The best integer dot product the target's CPU has."""
    def has(f):
        try:
            return bool(target_has_features(f, target))
        except Exception:  # noqa: BLE001 - a feature LLVM does not know for this arch
            return False

    for feature in ("avx512vnni", "avxvnni", "avx512bw", "avx2", "dotprod"):
        if has(feature):
            return ISAS[feature]
    return ISAS["generic"]



def isa_for_weights(isa: DotISA, wq: np.ndarray) -> DotISA:
    """The form a layer with int8 weights ``wq`` takes on the target's ``isa``: the 8-bit
    ``-s7`` form where the weights fit it (:attr:`DotISA.max_weight`), else ``isa``."""
    narrow = ISAS.get(isa.name + "-s7")
    if narrow is not None and wq.size and int(np.abs(wq.astype(np.int32)).max()) <= \
            narrow.max_weight:
        return narrow
    return isa


def za_of(isa: DotISA, x_dtype: str, zx: int) -> int:
    """The packed activation's value for a zero input (what padding holds)."""
    if isa.a_shift is None:
        return 0
    if isa.a_dtype == "uint8":
        return zx + (128 if x_dtype == "int8" else 0)
    return zx - (128 if x_dtype == "uint8" else 0)


# ---------------------------------------------------------------------------------- registers
def max_cols(lanes: int) -> int:
    """Output columns per float conv register tile: with one accumulator vector per column, as
    many as the vector registers allow (32 zmm on AVX-512, 16 ymm on AVX2, 32 q on NEON).
    AVX2: 13 accumulators + a weight vector + a broadcast = 15 ymm, so a 13-wide row
    (SqueezeNet's 13x13 maps) is one tile; with 12 it was padded to two 7-column tiles, and
    the 1x1 512->1000 at 13x13 took 1.28x the time (interleaved, -mcpu haswell)."""
    return 14 if lanes == 16 else 13 if lanes == 8 else 8


def int_cols(lanes: int) -> int:
    """int32 accumulator vectors per int8 conv register tile: as :func:`max_cols`, but 12 on
    AVX2, whose u8 x s8 products widen through two temporary registers."""
    return 12 if lanes == 8 else max_cols(lanes)


def px_budget(lanes: int) -> int:
    """float accumulators per pixels-in-lanes tile: 15 zmm (AVX-512; 1 KiB), 12 of 16 ymm
    (AVX2), 24 of 32 q (NEON)."""
    return 15 if lanes >= 16 else 12 if lanes == 8 else 24



def px_accumulators(isa: DotISA) -> int:
    """Accumulator vectors per pixel-kernel tile: 16 of 32 vector registers (AVX-512,
    NEON), 8 of 16 (AVX2, SSE)."""
    return 16 if isa.lanes == 16 or isa.name == "dotprod" else 8

