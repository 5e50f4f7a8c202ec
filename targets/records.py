"""What a build did, as typed records (no TVM here).

The pipeline's passes fill one :class:`BuildRecord` (the kernel each fused function got, the
functions left with plain loops and why, the QDQ rewrite's :class:`Int8Stats`, the tuning
database applied); :func:`edgec.targets.backend.build` returns it in a :class:`BuildResult`
with the timings and the resolved TVM target. ``to_json`` methods give the report's
``kernels`` section and the manifest's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Int8Stats:
    """The QDQ -> integer-kernel rewrite: the integer ISA, how many layers got integer kernels,
    why the others stayed float, and what the requantize / residual folds merged."""

    isa: str
    conv2d: int = 0
    dwconv2d: int = 0
    matmul: int = 0
    float: dict[str, int] = field(default_factory=dict)   # reason -> layers left float
    maxpool: int = 0          # max pools moved onto the 8-bit tensor
    weights_7bit: int = 0     # layers that took the 7-bit-weight (-s7) form
    winograd: int = 0         # 3x3 layers on the integer Winograd kernel
    requant_fused: int | None = None   # None: the fold did not run (no integer kernel)
    residual_fused: int | None = None

    def skip(self, reason: str) -> None:
        self.float[reason] = self.float.get(reason, 0) + 1

    def any(self) -> bool:
        """Whether the rewrite found anything to report."""
        return bool(self.conv2d or self.dwconv2d or self.matmul or self.float or self.maxpool)

    def to_json(self) -> dict:
        out = {"isa": self.isa, "conv2d": self.conv2d, "dwconv2d": self.dwconv2d,
               "matmul": self.matmul, "float": dict(self.float)}
        for key in ("maxpool", "weights_7bit", "winograd"):  # present once counted
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.requant_fused is not None:
            out["requant_fused"] = self.requant_fused
            out["residual_fused"] = self.residual_fused
        return out


@dataclass
class StructuredLayer:
    """One float Conv / MatMul whose constant weight has zeros or few distinct values: the
    kernel chosen (``sparse``, ``lookup`` or ``dense``) and why."""

    op: str                  # "conv2d" | "matmul"
    weight_shape: tuple
    shape_class: str         # "conv1x1" | "convkxk" | "gemm"
    density: float
    block: int               # output channels sharing a nonzero pattern (1: unstructured)
    kernel: str              # "sparse" | "lookup" | "dense"
    reason: str
    weight_bytes: int = 0    # bytes the kernel's weights take in the library
    dense_bytes: int = 0     # bytes of the dense float32 weight
    distinct: int = 0        # distinct weight values (counted up to 17)
    multiplies_dense: int = 0     # per call, the dense layer's multiplies
    multiplies_executed: int = 0  # per call, what the chosen kernel multiplies

    def to_json(self) -> dict:
        return {"op": self.op, "weight_shape": list(self.weight_shape),
                "shape_class": self.shape_class, "density": round(self.density, 5),
                "block": self.block, "distinct_values": self.distinct,
                "kernel": self.kernel, "reason": self.reason,
                "weight_bytes": self.weight_bytes, "dense_bytes": self.dense_bytes,
                "multiplies_dense": self.multiplies_dense,
                "multiplies_executed": self.multiplies_executed}


# Schedules that are not a kernel: what a function with multiply-accumulates should not get.
FALLBACK_KERNELS = frozenset({"generic", "reduce", "unscheduled"})


@dataclass
class BuildRecord:
    """Filled by the pipeline's passes while a model is built."""

    kernels: dict[str, str] = field(default_factory=dict)      # function -> kernel (or "tuned")
    unscheduled: dict[str, str] = field(default_factory=dict)  # function -> why plain loops
    int8: Int8Stats | None = None
    tuning_db: str | None = None
    # Build each tuned function alone before using it (the build's retry after a failure)
    # and keep the default kernel for those that fail: function -> the build error.
    verify_tuned: bool = False
    tuned_rejected: dict[str, str] = field(default_factory=dict)
    # function -> multiply-accumulates its loops execute (channels padded to the vector
    # width and a transposed convolution's inserted zeros included)
    macs: dict[str, int] = field(default_factory=dict)
    # layers whose constant weights have zeros or few distinct values
    structured: list[StructuredLayer] = field(default_factory=list)
    # concatenations whose inputs' producers write into the output (no copy)
    concat_views: int = 0

    def fallbacks(self) -> dict[str, dict]:
        """Functions with multiply-accumulates (a convolution, a matmul) that got only a
        fallback schedule or plain loops: ``{function: {"kernel", "macs"}}``."""
        out = {}
        for name, macs in self.macs.items():
            kind = "unscheduled" if name in self.unscheduled else self.kernels.get(name)
            if macs and kind in FALLBACK_KERNELS:
                out[name] = {"kernel": kind, "macs": macs}
        return out

    def kernel_summary(self) -> dict:
        """The report's ``kernels`` section: per fused function, which kernel it got or why
        it kept plain loops; the tuning database applied; the int8 rewrite's statistics;
        the functions with multiply-accumulates left on a fallback, with their share of the
        multiply-accumulates executed."""
        counts: dict[str, int] = {}
        for kind in self.kernels.values():
            counts[kind] = counts.get(kind, 0) + 1
        fallbacks = self.fallbacks()
        total = sum(self.macs.values())
        return {"counts": counts, "functions": dict(self.kernels),
                "unscheduled": dict(self.unscheduled), "tuning_db": self.tuning_db,
                "int8": self.int8.to_json() if self.int8 is not None else None,
                **({"tuned_rejected": dict(self.tuned_rejected)} if self.tuned_rejected else {}),
                "concat_views": self.concat_views,
                "macs": dict(self.macs), "macs_executed": total, "fallbacks": fallbacks,
                "fallback_mac_share": (sum(f["macs"] for f in fallbacks.values()) / total
                                       if total else 0.0),
                **({"structured": [s.to_json() for s in self.structured]}
                   if self.structured else {})}


@dataclass
class BuildTimings:
    import_s: float = 0.0   # ONNX -> Relax
    build_s: float = 0.0    # the Relax pipeline and code generation
    export_s: float = 0.0   # linking the shared library

    def to_json(self) -> dict:
        return {"import_s": self.import_s, "build_s": self.build_s, "export_s": self.export_s}


@dataclass
class BuildResult:
    timings: BuildTimings
    tvm_target: dict           # the resolved TVM target, as JSON (for the manifest)
    record: BuildRecord
