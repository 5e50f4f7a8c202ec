"""Float convolution and max-pool legalizers: the default CPU kernels in place of TOPI's.

A ``relax.nn.conv2d`` with constant NCHW/OIHW float32 weights and a static input becomes, in
this order of preference: Winograd (:mod:`..kernels.winograd`), the pixels-in-lanes 1x1
kernel (:mod:`..kernels.pixel_conv`), the packed direct convolution
(:mod:`..kernels.packed_conv`), or for depthwise the row kernel (:mod:`..kernels.row_conv`);
anything else goes to TOPI's default.
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax
from tvm.relax.transform.legalize_ops.nn import _nn_conv2d as default_conv2d
from tvm.relax.transform.legalize_ops.nn import _nn_max_pool2d as default_max_pool2d

from ..compute import conv_out, ints
from ..isa import max_cols
from ..kernels.packed_conv import conv_packed_te, grouped_applies, pack_weight, padded_width
from ..kernels.pixel_conv import conv1x1_px_te, conv_px_tile, pack_weight_px
from ..kernels.row_conv import dwconv_te
from ..kernels.winograd import transform_weight, winograd_te, winograd_tile

_KERNEL = {"op_pattern": 4}


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, tvm.tirx.IntImm) for d in shape.values)


def _float_conv(call):
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
    if groups == 1 or (grouped_applies(oc, groups, lanes) and w.shape[1] > 1):
        ow = conv_out(wd, pads[1], pads[3], w.shape[3], strides[1], dil[1])
        return bb.call_te(functools.partial(conv_packed_te, groups=groups,
                                            ow_pad=padded_width(ow, max_cols(lanes))),
                          data, relax.const(pack_weight(w, lanes)), oc, strides, pads, dil,
                          primfunc_name_hint="conv2d_packed", primfunc_attrs=_KERNEL)
    if groups == c and oc == c and w.shape[1] == 1:
        return bb.call_te(functools.partial(dwconv_te, lanes=lanes), data, weight,
                          strides, pads, dil, primfunc_name_hint="dwconv2d",
                          primfunc_attrs=_KERNEL)
    return None


def make_conv2d_legalizer(lanes: int):
    """A LegalizeOps override for relax.nn.conv2d: packed direct conv (groups = 1, constant
    weights, NCHW/OIHW) and depthwise conv; anything else goes to TOPI's default."""

    def legalize(bb, call):
        w = _float_conv(call)
        out = _emit_conv(bb, call, w, lanes) if w is not None else None
        return out if out is not None else default_conv2d(bb, call)

    return legalize


def make_maxpool_legalizer(lanes: int):
    """relax.nn.max_pool2d (NCHW, floor mode, static shape) through :func:`dwconv_te`'s row
    kernel: column phases for the stride, whole-vector rows, the taps unrolled. TOPI's
    pool is left with a reduction innermost that the generic schedule cannot vectorize."""
    def legalize(bb, call):
        a = call.attrs
        x = call.args[0]
        shape = x.ty.shape
        if (a.layout != "NCHW" or a.out_layout != "NCHW" or bool(a.ceil_mode) or shape is None
                or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values)
                or len(shape.values) != 4):
            return default_max_pool2d(bb, call)
        return bb.call_te(functools.partial(dwconv_te, lanes=lanes, pool=ints(a.pool_size)),
                          x, None, ints(a.strides), ints(a.padding), ints(a.dilation),
                          primfunc_name_hint="max_pool2d", primfunc_attrs=_KERNEL)

    return legalize

