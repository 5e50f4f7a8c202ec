"""Float convolution, dense and max-pool legalizers: the default CPU kernels in place of TOPI's.

A ``relax.nn.conv2d`` with constant NCHW/OIHW float32 weights and a static input becomes, in
this order of preference: Winograd (:mod:`..kernels.winograd`), the pixels-in-lanes 1x1
kernel (:mod:`..kernels.pixel_conv`), the stem kernel for an image's few channels
(:mod:`..kernels.stem_conv`), the packed direct convolution
(:mod:`..kernels.packed_conv`), for depthwise the row kernel (:mod:`..kernels.row_conv`),
for other grouped convolutions whose groups are not whole vectors of output channels the
grouped row kernel (:mod:`..kernels.group_conv`); anything else goes to TOPI's default. A
``relax.matmul`` of a static 2-D float32 input by a constant 2-D weight (Gemm, MatMul)
becomes the packed dense kernel (:mod:`..kernels.dense`).
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax
from tvm.relax.transform.legalize_ops.linear_algebra import _matmul as default_matmul
from tvm.relax.transform.legalize_ops.nn import _nn_conv2d as default_conv2d
from tvm.relax.transform.legalize_ops.nn import _nn_max_pool2d as default_max_pool2d

from ..compute import conv_out, ints
from ..isa import max_cols
from ..kernels.dense import dense_packed_te, pack_dense
from ..kernels.packed_conv import (channel_blocks, conv_packed_te, grouped_applies, pack_weight,
                                   padded_width)
from ..kernels.pixel_conv import conv1x1_px_te, conv_px_tile, pack_weight_px
from ..kernels.group_conv import gconv_applies, gconv_te
from ..kernels.row_conv import dwconv_te
from ..kernels.stem_conv import conv_stem_te, pack_weight_stem, stem_tile
from .common import KERNEL_ATTRS as _KERNEL
from ..kernels.winograd import transform_weight, winograd_te, winograd_tile



def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in shape.values)


def float_conv_weight(call):
    """The constant weight (numpy) of an NCHW/OIHW float32 conv2d on a static input, else
    None (pattern and check)."""
    attrs = call.attrs
    data, weight = call.args
    if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW"
            or attrs.out_layout != "NCHW" or not isinstance(weight, tvm.ir.expr.Constant)):
        return None
    if not _static(data.ty.shape):
        return None
    if str(data.ty.dtype) != "float32" or (attrs.out_dtype not in (None, "", "float32")):
        return None
    return weight.value.numpy()


def _emit_conv(bb, call, w, lanes: int):
    """The default kernel for the float convolution (rewrite), or None for TOPI's."""
    attrs = call.attrs
    data, weight = call.args
    groups = int(attrs.groups)
    n, c, h, wd = ints(data.ty.shape.values)
    oc = w.shape[0]
    strides, dil = ints(attrs.strides), ints(attrs.dilation)
    pads = ints(attrs.padding)
    m = winograd_tile(lanes, (n, c, h, wd), w.shape, strides, pads, dil, groups)
    if m is not None:
        return bb.call_te(functools.partial(winograd_te, m=m), data,
                          relax.const(transform_weight(w, m, lanes)), oc, pads,
                          primfunc_name_hint="conv2d_winograd", primfunc_attrs=_KERNEL)
    tile = conv_px_tile(lanes, (n, c, h, wd), w.shape, strides, pads) if groups == 1 else None
    if tile is not None:
        return bb.call_te(functools.partial(conv1x1_px_te, tile=tile), data,
                          relax.const(pack_weight_px(w, tile[4])), oc,
                          primfunc_name_hint="conv2d_px", primfunc_attrs=_KERNEL)
    tile = stem_tile(lanes, (n, c, h, wd), w.shape, strides, pads, dil, groups)
    if tile is not None:
        return bb.call_te(functools.partial(conv_stem_te, tile=tile), data,
                          relax.const(pack_weight_stem(w, tile[2])), oc, strides, pads, dil,
                          primfunc_name_hint="conv2d_stem", primfunc_attrs=_KERNEL)
    if groups == 1 or (grouped_applies(oc, groups, lanes) and w.shape[1] > 1):
        ow = conv_out(wd, pads[1], pads[3], w.shape[3], strides[1], dil[1])
        ow_pad = padded_width(ow, max_cols(lanes))
        # a grouped convolution's blocks index its groups: no padding there
        blocks = channel_blocks(oc, c, ow_pad, lanes, max_cols(lanes), *w.shape[2:]) \
            if groups == 1 else None
        return bb.call_te(functools.partial(conv_packed_te, groups=groups, ow_pad=ow_pad),
                          data, relax.const(pack_weight(w, lanes, blocks)), oc, strides, pads, dil,
                          primfunc_name_hint="conv2d_packed", primfunc_attrs=_KERNEL)
    if groups == c and oc == c and w.shape[1] == 1:
        return bb.call_te(functools.partial(dwconv_te, lanes=lanes), data, weight,
                          strides, pads, dil, primfunc_name_hint="dwconv2d",
                          primfunc_attrs=_KERNEL)
    if gconv_applies(c, oc, w.shape[1], groups):
        return bb.call_te(functools.partial(gconv_te, groups=groups, lanes=lanes), data,
                          weight, strides, pads, dil, primfunc_name_hint="gconv2d",
                          primfunc_attrs=_KERNEL)
    return None


def make_conv2d_legalizer(lanes: int):
    """A LegalizeOps override for relax.nn.conv2d: packed direct conv (groups = 1, constant
    weights, NCHW/OIHW) and depthwise conv; anything else goes to TOPI's default."""

    def legalize(bb, call):
        w = float_conv_weight(call)
        out = _emit_conv(bb, call, w, lanes) if w is not None else None
        return out if out is not None else default_conv2d(bb, call)

    return legalize


def make_maxpool_legalizer(lanes: int):
    """relax.nn.max_pool2d (NCHW, static shape) through :func:`dwconv_te`'s row kernel:
    column phases for the stride, whole-vector rows, the taps unrolled. TOPI's pool is left
    with a reduction innermost that the generic schedule cannot vectorize. ``ceil_mode``
    (SqueezeNet, GoogLeNet): the output shape is Relax's (which onnxruntime's agrees with);
    the windows past the bottom/right edge read extra padding, which never wins a max."""
    def legalize(bb, call):
        a = call.attrs
        x = call.args[0]
        shape, oshape = x.ty.shape, call.ty.shape
        if (a.layout != "NCHW" or a.out_layout != "NCHW" or shape is None
                or len(shape.values) != 4 or not _static(shape)
                or oshape is None or not _static(oshape)):
            return default_max_pool2d(bb, call)
        pads = ints(a.padding)
        if bool(a.ceil_mode):
            (kh, kw), (sh, sw), (dh, dw) = ints(a.pool_size), ints(a.strides), ints(a.dilation)
            h, w = ints(shape.values)[2:]
            oh, ow = ints(oshape.values)[2:]
            pt, pl, pb, pr = pads
            pads = [pt, pl, max(pb, (oh - 1) * sh + (kh - 1) * dh + 1 - h - pt),
                    max(pr, (ow - 1) * sw + (kw - 1) * dw + 1 - w - pl)]
            if (conv_out(h, pads[0], pads[2], kh, sh, dh),
                    conv_out(w, pads[1], pads[3], kw, sw, dw)) != (oh, ow):
                return default_max_pool2d(bb, call)
        return bb.call_te(functools.partial(dwconv_te, lanes=lanes, pool=ints(a.pool_size)),
                          x, None, ints(a.strides), pads, ints(a.dilation),
                          primfunc_name_hint="max_pool2d", primfunc_attrs=_KERNEL)

    return legalize


def make_matmul_legalizer(lanes: int):
    """relax.matmul ``X[..., M, K] @ W[K, N]`` with a constant 2-D float32 ``W`` and a
    static float32 ``X`` (its leading axes flattened into rows) through the packed dense
    kernel; anything else (a batched weight, dynamic, another type) goes to TOPI's
    default."""
    def legalize(bb, call):
        x, w = call.args
        xs = x.ty.shape
        wv = (w.value.numpy() if isinstance(w, tvm.ir.expr.Constant)
              and str(w.ty.dtype) == "float32" else None)
        if (wv is not None and wv.ndim == 2 and wv.size > 0 and str(x.ty.dtype) == "float32"
                and str(call.ty.dtype) == "float32" and xs is not None
                and len(xs.values) >= 2 and _static(xs)
                and all(int(d) > 0 for d in xs.values[:-1])
                and int(xs.values[-1]) == wv.shape[0]):
            return bb.call_te(dense_packed_te, x, relax.const(pack_dense(wv, lanes)),
                              wv.shape[1], lanes, primfunc_name_hint="dense_packed",
                              primfunc_attrs=_KERNEL)
        return default_matmul(bb, call)

    return legalize

