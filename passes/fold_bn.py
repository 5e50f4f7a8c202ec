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
from ._toolkit import drop_unused_initializers, optional_input, producers, set_nodes


@dataclass(frozen=True)
class FoldBNConfig:
    conv: bool = True
    gemm: bool = True
    conv_transpose: bool = True


def _check(bn, prod, allowed: dict, users, graph_out: set, inits: dict) -> str | None:
    """Why ``bn`` cannot be folded into its producer ``prod`` (None: it can)."""
    if prod is None or prod.op_type not in allowed:
        return (f"input is not produced by Conv/Gemm/ConvTranspose "
                f"({prod.op_type if prod else 'graph input'})")
    if not allowed[prod.op_type]:
        return f"folding into {prod.op_type} disabled by config"
    if attr(bn, "training_mode", 0) or len([o for o in bn.output if o]) > 1:
        return "training mode (running statistics are outputs)"
    if len(users[prod.output[0]]) != 1 or prod.output[0] in graph_out:
        return f"{prod.name} output has other readers"
    if any(inits.get(n) is None for n in bn.input[1:5]):
        return "scale/bias/mean/var are not constants"
    if prod.input[1] not in inits or (prod.op_type == "Gemm" and (
            len(prod.input) < 2 or attr(prod, "transA", 0) not in (0,))):
        return f"{prod.name} weight is not a constant"
    bias_name = optional_input(prod, 2)
    if bias_name is not None and bias_name not in inits:
        return f"{prod.name} bias is not a constant"
    return None


def _folded(bn, prod, inits: dict):
    """``(W', b', drop_alpha_beta)`` of ``prod`` with ``bn`` folded in (float64), or the reason
    it cannot be."""
    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64)
                              for n in bn.input[1:5])
    s = gamma / np.sqrt(var + attr(bn, "epsilon", 1e-5))
    W = numpy_helper.to_array(inits[prod.input[1]]).astype(np.float64)
    gemm_beta, drop = 1.0, False
    if prod.op_type == "Conv":
        if W.shape[0] != s.shape[0]:
            return "channel count mismatch"
        W2 = W * s.reshape((-1,) + (1,) * (W.ndim - 1))
    elif prod.op_type == "ConvTranspose":
        g = attr(prod, "group", 1)
        cin, kpg = W.shape[0], W.shape[1]
        if kpg * g != s.shape[0]:
            return "channel count mismatch"
        Wg = W.reshape((g, cin // g, kpg) + W.shape[2:])
        Wg = Wg * s.reshape((g, 1, kpg) + (1,) * (W.ndim - 2))
        W2 = Wg.reshape(W.shape)
    else:  # Gemm: y = alpha * A @ B' + beta_g * C, features on the last axis
        alpha = attr(prod, "alpha", 1.0)
        gemm_beta = attr(prod, "beta", 1.0)
        trans_b = attr(prod, "transB", 0)
        if (W.shape[0] if trans_b else W.shape[1]) != s.shape[0]:
            return "feature count mismatch"
        W2 = W * (s[:, None] if trans_b else s[None, :])
        if alpha != 1.0 or gemm_beta != 1.0:
            # fold alpha into B and beta into the bias, then drop both attributes
            W2 = W2 * alpha
            drop = True
    bias_name = optional_input(prod, 2)
    if bias_name is not None:
        b = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
        if prod.op_type == "Gemm":
            b = b * gemm_beta
        b = np.broadcast_to(b, s.shape)
    else:
        b = np.zeros_like(s)
    return W2, s * (b - mean) + beta, drop


def _rewire(bn, prod, W2, b2, inits: dict, names: set, new_inits: dict) -> None:
    """``prod`` reads the folded weight and bias and writes ``bn``'s output."""
    wname = prod.input[1]
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


@register_pass("fold-bn", FoldBNConfig, tolerance=Tolerance(rtol=1e-3, atol=1e-4,
                                                              min_cosine=0.99999))
def fold_bn(model: onnx.ModelProto, config: FoldBNConfig, ctx: PassContext):
    m = copy_model(model)
    report = PassReport("fold-bn")
    inits = initializers(m)
    users = consumers(m)
    graph_out = {o.name for o in m.graph.output}
    producer = producers(m)
    names = all_names(m)
    removed: set[str] = set()
    new_inits: dict[str, np.ndarray] = {}
    allowed = {"Conv": config.conv, "Gemm": config.gemm, "ConvTranspose": config.conv_transpose}

    for bn in m.graph.node:
        if bn.op_type != "BatchNormalization":
            continue
        prod = producer.get(bn.input[0])
        why = _check(bn, prod, allowed, users, graph_out, inits)
        got = _folded(bn, prod, inits) if why is None else why
        if isinstance(got, str):
            report.skip(bn, got)
            continue
        W2, b2, drop_alpha_beta = got
        if drop_alpha_beta:
            for a in list(prod.attribute):
                if a.name in ("alpha", "beta"):
                    prod.attribute.remove(a)
        _rewire(bn, prod, W2, b2, inits, names, new_inits)
        removed.add(bn.name)
        report.rewrite(bn, f"folded into {prod.op_type} {prod.name}", into=prod.name)

    if not removed:
        return m, report
    set_nodes(m, [n for n in m.graph.node if n.name not in removed])
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_inits.items())
    return drop_unused_initializers(m), report  # the old weights
