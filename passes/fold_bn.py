"""fold-bn: fold an inference BatchNormalization into the Conv or Gemm that feeds it.

Algebra: with ``s = gamma / sqrt(var + eps)`` (one value per output channel k),

    BN(Conv(x; W, b)) = Conv(x; W', b'),   W'[k] = s[k] * W[k],   b' = s * (b - mean) + beta

and the same for ``Gemm`` (``transB`` decides which axis of B holds the output features) and
``ConvTranspose`` (output channel k lives on axis 1 of W, per group). Exact up to float
round-off. A BatchNormalization is folded only when its producer feeds nothing else, its
statistics are constants and it runs in inference mode; otherwise it is skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.graph import attr, consumers, initializers, set_provenance, unique_name, all_names

from . import PassContext, PassReport, Tolerance, copy_model, register_pass


@dataclass(frozen=True)
class FoldBNConfig:
    conv: bool = True
    gemm: bool = True
    conv_transpose: bool = True


@register_pass("fold-bn", FoldBNConfig, tolerance=Tolerance(rtol=1e-3, atol=1e-4,
                                                              min_cosine=0.99999))
def fold_bn(model: onnx.ModelProto, config: FoldBNConfig, ctx: PassContext):
    m = copy_model(model)
    report = PassReport("fold-bn")
    inits = initializers(m)
    users = consumers(m)
    graph_out = {o.name for o in m.graph.output}
    producer = {o: n for n in m.graph.node for o in n.output}
    names = all_names(m)
    removed: set[str] = set()
    new_inits: dict[str, np.ndarray] = {}
    allowed = {"Conv": config.conv, "Gemm": config.gemm, "ConvTranspose": config.conv_transpose}

    for bn in m.graph.node:
        if bn.op_type != "BatchNormalization":
            continue
        prod = producer.get(bn.input[0])
        if prod is None or prod.op_type not in allowed:
            report.skip(bn, f"input is not produced by Conv/Gemm/ConvTranspose "
                            f"({prod.op_type if prod else 'graph input'})")
            continue
        if not allowed[prod.op_type]:
            report.skip(bn, f"folding into {prod.op_type} disabled by config")
            continue
        if attr(bn, "training_mode", 0) or len([o for o in bn.output if o]) > 1:
            report.skip(bn, "training mode (running statistics are outputs)")
            continue
        if len(users[prod.output[0]]) != 1 or prod.output[0] in graph_out:
            report.skip(bn, f"{prod.name} output has other readers")
            continue
        stats = [inits.get(n) for n in bn.input[1:5]]
        if any(s is None for s in stats):
            report.skip(bn, "scale/bias/mean/var are not constants")
            continue
        wname = prod.input[1]
        if wname not in inits or (prod.op_type == "Gemm" and (
                len(prod.input) < 2 or attr(prod, "transA", 0) not in (0,))):
            report.skip(bn, f"{prod.name} weight is not a constant")
            continue
        bias_name = prod.input[2] if len(prod.input) > 2 and prod.input[2] else None
        if bias_name is not None and bias_name not in inits:
            report.skip(bn, f"{prod.name} bias is not a constant")
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(s).astype(np.float64) for s in stats)
        eps = attr(bn, "epsilon", 1e-5)
        s = gamma / np.sqrt(var + eps)
        W = numpy_helper.to_array(inits[wname]).astype(np.float64)
        if prod.op_type == "Conv":
            if W.shape[0] != s.shape[0]:
                report.skip(bn, "channel count mismatch")
                continue
            W2 = W * s.reshape((-1,) + (1,) * (W.ndim - 1))
        elif prod.op_type == "ConvTranspose":
            g = attr(prod, "group", 1)
            cin, kpg = W.shape[0], W.shape[1]
            if kpg * g != s.shape[0]:
                report.skip(bn, "channel count mismatch")
                continue
            Wg = W.reshape((g, cin // g, kpg) + W.shape[2:])
            Wg = Wg * s.reshape((g, 1, kpg) + (1,) * (W.ndim - 2))
            W2 = Wg.reshape(W.shape)
        else:  # Gemm: y = alpha * A @ B' + beta_g * C, features on the last axis
            alpha = attr(prod, "alpha", 1.0)
            gemm_beta = attr(prod, "beta", 1.0)
            trans_b = attr(prod, "transB", 0)
            if (W.shape[0] if trans_b else W.shape[1]) != s.shape[0]:
                report.skip(bn, "feature count mismatch")
                continue
            W2 = W * (s[:, None] if trans_b else s[None, :])
            if alpha != 1.0 or gemm_beta != 1.0:
                # fold alpha into B and beta into the bias, then drop both attributes
                W2 = W2 * alpha
                for a in list(prod.attribute):
                    if a.name in ("alpha", "beta"):
                        prod.attribute.remove(a)
        if bias_name is not None:
            b = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
            if prod.op_type == "Gemm":
                b = b * gemm_beta
            b = np.broadcast_to(b, s.shape)
        else:
            b = np.zeros_like(s)
        b2 = s * (b - mean) + beta
        dtype = numpy_helper.to_array(inits[wname]).dtype
        wnew = unique_name(names, f"{wname}_bnfold")
        bnew = unique_name(names, f"{prod.name}_bias_bnfold")
        new_inits[wnew] = W2.astype(dtype)
        new_inits[bnew] = b2.astype(dtype)
        prod.input[1] = wnew
        while len(prod.input) <= 2:  # Conv/ConvTranspose/Gemm: the bias is input 2
            prod.input.append("")
        prod.input[2] = bnew
        prod.output[0] = bn.output[0]
        set_provenance(prod, "fold-bn", f"{prod.name}+{bn.name}")
        removed.add(bn.name)
        report.rewrite(bn, f"folded into {prod.op_type} {prod.name}", into=prod.name)

    if not removed:
        return m, report
    keep = [n for n in m.graph.node if n.name not in removed]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_inits.items())
    # Drop initializers no node reads any more (the old weights).
    used = {i for n in m.graph.node for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    return m, report
