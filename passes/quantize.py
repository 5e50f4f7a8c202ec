"""quantize: int8 post-training quantization to QDQ (per-channel weights, calibrated activations).

Algebra (int8). A tensor x is stored as ``q = clamp(round(x / s) + z, qmin, qmax)`` and read
back as ``x~ = s * (q - z)`` (QuantizeLinear / DequantizeLinear, round half to even). For a
Conv or Gemm/MatMul with weight W and bias b reading activation x:

    y = W x + b  ->  y = DQ(W_q; s_w[k]) DQ(Q(x; s_x, z_x)) + DQ(b_q; s_x * s_w[k])

* weights: stored int8, symmetric, one scale per output channel k (Conv: axis 0; Gemm:
  axis 0 with transB=1, axis 1 without; MatMul: axis 1): ``s_w[k] = c_k / qmax`` with the clip
  ``c_k = max|W_k|`` (``weight_method=minmax``) or the ``c_k`` minimising the channel's
  ``||W_k - W~_k||^2`` (``mse``: clips a channel's outliers where that lowers its error);
  ``qmax = 127`` for 8-bit weights, ``63`` for 7-bit ones (``weight_bits=7``): on x86 CPUs
  without VNNI, 8-bit u8 x s8 products are summed in saturating 16-bit pairs (``vpmaddubsw``,
  what onnxruntime's QLinearConv/MatMulInteger run there), which is exact only while
  ``255 * (|w1| + |w2|) <= 32767``; 7-bit weights keep every pair sum in range, so the same
  model gives the exact answer in onnxruntime on any CPU, and edgec's kernels take their
  8-bit-operand form there. ``weight_bits=auto`` (the default) is 7 for a compile target
  whose CPU sums pairs that way and 8 otherwise (VNNI x86, Arm, GPUs, or no target);
* activations: one ``(s, z)`` per tensor, uint8 (default) or int8, asymmetric, from the
  *observed* calibration distribution (streamed in batches; a min/max pass, then a histogram
  pass): ``minmax``, ``percentile`` (clip at the p-th percentile), ``entropy`` (the range
  whose 8-bit re-binning has the least KL divergence from the observed histogram) or ``mse``
  (the range with the least expected squared error, rounding + clipping);
* biases: int32 with scale ``s_x * s_w[k]``, zero point 0 (a channel whose bias would not fit
  gets a larger weight scale);
* ``bias_correction``: ``b'[k] = b[k] - sum (W~ - W)[k] E[x]`` with E[x] the per-channel mean
  of the calibration input, so the expected output of each layer does not move.

Quantized tensors are the activation inputs and outputs of the quantized ops (Conv, Gemm,
MatMul, MaxPool, Add, Concat). A Relu/Clip that is the only reader of a Conv/Gemm/MatMul/Add
output is fused: the Q/DQ goes after it (its range starts at 0). MaxPool and Flatten/Reshape
share their input's scale (max and reshapes commute with a monotonic quantizer), Concat inputs
and output share one scale. ``exclude`` keeps nodes in float; ``sensitivity`` reports, for
each layer quantized alone, the output error, top-1 agreement and (with labels) accuracy drop
versus the float model on the calibration rows.

``quantize.mode=fp16`` is kept as another name for the ``fp16`` pass: it runs that rewrite
with this pass's ``keep_io_types``, ``block_ops``, ``compute`` and ``exclude`` options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from edgec.core.errors import EdgecError

from . import PassContext, PassReport, Tolerance, copy_model, register_pass
from ._quant_plan import COMPUTE_OPS, DATA_OPS, observe, params as plan_params, plan, select
from ._quant_rewrite import rewrite
from ._toolkit import calib_feeds, calib_rows, relative_error, run_first_output
from .fp16 import FP16Config, to_fp16

PASS = "quantize"


@dataclass(frozen=True)
class QuantizeConfig:
    mode: Literal["int8", "fp16"] = "int8"
    # int8
    method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"  # activations
    percentile: float = 99.99        # for method=percentile
    weight_method: Literal["minmax", "mse"] = "minmax"
    weight_bits: Literal["auto", 8, 7] = "auto"  # 7: u8 x s7 pair sums never saturate
    activation_type: Literal["uint8", "int8"] = "uint8"
    per_channel: bool = True
    ops: tuple[str, ...] = COMPUTE_OPS + DATA_OPS
    exclude: tuple[str, ...] = ()    # node names kept in float (int8 and fp16)
    fuse_activations: bool = True    # Relu/Clip after a quantized op: Q/DQ after them
    quantize_outputs: bool = False   # Q/DQ on graph outputs too (e.g. the logits)
    bias_correction: bool = False
    sensitivity: bool = False        # each layer quantized alone: error / agreement / accuracy
    sensitivity_rows: int = 512
    calib_samples: int = 2048        # calibration rows used (streamed)
    batch: int = 64
    progress: bool = True            # a progress bar when stderr is a terminal
    # mode=fp16: the fp16 pass's options
    keep_io_types: bool = True       # graph inputs/outputs stay float32 (Cast at the edges)
    block_ops: tuple[str, ...] = ()  # op types kept in float32
    compute: Literal["fp16", "fp32"] = "fp16"  # fp32: weights stored fp16, computed fp32 (x86)

    def __post_init__(self):
        if not (50.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile must be within (50, 100], got {self.percentile}")
        bad = [o for o in self.ops if o not in COMPUTE_OPS + DATA_OPS]
        if bad:
            raise ValueError(f"ops: cannot quantize {', '.join(bad)} (supported: "
                             f"{', '.join(COMPUTE_OPS + DATA_OPS)})")
        if self.calib_samples < 1 or self.batch < 1 or self.sensitivity_rows < 1:
            raise ValueError("calib_samples, batch and sensitivity_rows must be >= 1")

    def fp16_config(self) -> FP16Config:
        """The ``fp16`` pass's options this config carries (``mode=fp16``)."""
        return FP16Config(keep_io_types=self.keep_io_types, block_ops=self.block_ops,
                          compute=self.compute, exclude=self.exclude)


@register_pass(PASS, QuantizeConfig, tolerance=Tolerance(rtol=5e-2, atol=5e-2, min_cosine=0.98))
def quantize(model: onnx.ModelProto, config: QuantizeConfig, ctx: PassContext):
    if config.mode == "fp16":  # another name for the fp16 pass
        return to_fp16(model, config.fp16_config(), PASS)
    if ctx.calib is None:
        raise EdgecError("quantize.mode=int8 needs calibration data: give --calib FILE.npz")
    report = PassReport(PASS)
    config, bits_why = _weight_bits(config, ctx)
    m = copy_model(model)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node):
        for n in m.graph.node:
            if n.op_type in config.ops:
                report.skip(n, "the model is already quantized (QDQ nodes present)")
        return m, report
    targets, data = select(m, config, report)
    if not targets:
        for n in m.graph.node:
            if n.name in data:
                report.skip(n, "no Conv/Gemm/MatMul is quantized, so it stays float")
        return m, report
    qnodes = set(targets) | data
    qplan = plan(m, qnodes, config)
    calib, labels = calib_feeds(ctx.calib)
    obs = observe(m, list(qplan.tensors), calib, config, hist=config.method != "minmax")
    qparams, acts = plan_params(qplan, obs, config)
    means = {t: o.channel_mean() for t, o in obs.items()} if config.bias_correction else None
    out, table, qplan = rewrite(m, targets, qnodes, qparams, config, means)
    _report_rows(report, table, targets, config)
    report.details = {"mode": "int8", "method": config.method,
                      "weight_method": config.weight_method,
                      "weight_bits": config.weight_bits, "weight_bits_reason": bits_why,
                      "activation_type": config.activation_type,
                      "per_channel": config.per_channel,
                      "calib_rows": min(calib_rows(calib), config.calib_samples),
                      "layers": table, "activations": acts,
                      "fused": [{"activation": a, "into": b} for a, b in qplan.fused.items()]}
    if config.sensitivity:
        report.details["sensitivity"] = _sensitivity(m, targets, data, qparams, config, calib,
                                                     labels, means)
    return out, report


def _report_rows(report: PassReport, table: list[dict], targets: dict, config) -> None:
    for row in table:
        if row["node"] in targets:
            report.rewrite(row["node"], f"int8 {row['op']}: {config.weight_bits}-bit weights "
                           f"per channel "
                           f"(axis {row['weight_axis']}), input s={row['input_scale']:.4g} "
                           f"z={row['input_zero_point']}",
                           weight_rel_error=round(row["weight_rel_error"], 6))
        else:
            report.rewrite(row["node"], f"{row['op']} kept in int8 (Q/DQ on its tensors)")


def _weight_bits(config: QuantizeConfig, ctx: PassContext) -> tuple[QuantizeConfig, str]:
    """``weight_bits=auto`` resolved for the compile target, and why."""
    if config.weight_bits != "auto":
        return config, "set by the user"
    t = ctx.target
    if t is not None and t.int8_pairs_saturate:
        bits, why = 7, (f"target {t.name} ({t.int8_isa}): x86 without VNNI sums u8 x s8 "
                        "products in saturating 16-bit pairs; 7-bit weights keep them exact")
    elif t is not None:
        bits, why = 8, f"target {t.name} ({t.int8_isa or t.device}): 8-bit products are exact"
    else:
        bits, why = 8, "no compile target given"
    return dataclasses.replace(config, weight_bits=bits), why


def _sensitivity(m, targets, data, params, config, calib, labels, means) -> list[dict]:
    """Each Conv/Gemm/MatMul quantized alone (weights, input, output): relative output error,
    top-1 agreement and, with labels, the accuracy drop vs the float model."""
    n = min(calib_rows(calib), config.sensitivity_rows)
    feeds = {k: v[:n] for k, v in calib.items()}
    ref = run_first_output(m, feeds, config.batch)
    lab = None if labels is None else np.asarray(labels)[:n].reshape(-1)
    acc0 = float(np.mean(ref.argmax(-1) == lab)) if lab is not None and ref.ndim == 2 else None
    rows = []
    for name in [x.name for x in m.graph.node if x.name in targets]:
        one, _, _ = rewrite(m, targets, {name}, params, config, means)
        got = run_first_output(one, feeds, config.batch)
        row = {"node": name, "op": targets[name].node.op_type,
               "output_error": relative_error(got, ref)}
        if ref.ndim == 2 and ref.shape[1] > 1:
            row["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
            if acc0 is not None:
                acc = float(np.mean(got.argmax(1) == lab))
                row["accuracy"] = acc
                row["accuracy_drop_points"] = round(100 * (acc0 - acc), 3)
        rows.append(row)
    rows.sort(key=lambda x: -x["output_error"])
    return rows
