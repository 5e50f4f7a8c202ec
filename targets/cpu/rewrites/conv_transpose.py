"""ConvTranspose as convolutions of the original input: the sub-pixel (phase) decomposition.

TVM legalizes ``relax.nn.conv2d_transpose`` through TOPI's dilated-input loop: the input is
spread out with ``s - 1`` zeros between pixels and convolved, so ``s * s - 1`` of every
``s * s`` multiply-adds read an inserted zero, and the default rule list only has a generic
``reduce`` schedule for it. Here (after constants are folded, before legalization) a
``conv2d_transpose`` with a constant weight becomes ops that have fast kernels:

With stride ``s`` (per axis), the full output ``y[t]`` (before ONNX's pads crop it) at
``t = q * s + r`` only receives the taps ``k = j * s + r`` of the kernel: each phase ``r``
is an ordinary convolution of the *original* input with the taps of that phase, flipped:
``y[q * s + r] = sum_j x[q - j] * W[j * s + r]``. All ``sh * sw`` phases are one
``conv2d`` with ``Cout * sh * sw`` output channels, kernel ``ceil(kh / sh) x ceil(kw / sw)``
(taps past the kernel are zero: 16 for 9 with 3x3 s2, none when the stride divides the
kernel), padded so that it yields the rows the crop keeps (:func:`_axis_plan`), then one
depth-to-space function that also crops for the pads / output_padding
(:func:`depth_to_space_te`). The conv goes through the float conv legalizer
(:mod:`.float_conv`): kernel == stride with no pads (2x2 s2, 4x4 s4: the detectors'
upsamplers) is a 1x1 conv (the pixel kernel), 3x3 phases of stride 1 Winograd where it
applies, the rest the packed kernel; stride 1 is a plain conv with the flipped kernel and
no depth-to-space. A per-channel constant bias added to the ConvTranspose (as the ONNX
frontend imports it) is added to the conv instead, so it lands in the conv's epilogue; a
following activation fuses into the depth-to-space, which has its own schedule
(:func:`d2s_schedule_pass`: one pass, phases interleaved with shuffles). Dilation: the constant
kernel is dilated first.

Groups: depthwise (``groups == Cin == Cout``) becomes ``sh * sw`` depthwise convolutions (the
row kernel), one per phase, concatenated; other grouped ones one grouped convolution, each
group's phases in its group (the packed kernel where a group's ``Cout / groups * sh * sw``
outputs are whole vectors, else the grouped row kernel), except 1x1 phases in at most
:data:`SLICED_GROUPS` groups: one pixel-kernel conv per group, concatenated. Left on
TOPI's path (and so reported as ``reduce`` in ``report.json``): a non-constant weight, a
dynamic shape, another dtype or layout. ``EDGEC_NO_CONVT_REWRITE=1`` turns the rewrite off
(benchmarks compare against the old path).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tvm
from tvm import relax, te

from ..compute import ints
from .common import ADD, KERNEL_ATTRS, const_value, static_shape, use_counts

log = logging.getLogger("edgec.cpu")
CONV_T = tvm.ir.Op.get("relax.nn.conv2d_transpose")
# grouped with 1x1 phases (kernel == stride): one pixel-kernel conv per group up to this many
# groups, concatenated, else one grouped conv (64 -> 64, 2x2 s2 at 56x56 in 2 and 4 groups:
# 0.83x and 0.85x the grouped conv's time; 128 -> 128 at 28x28 in 8 groups 1.2x)
SLICED_GROUPS = 4


def enabled() -> bool:
    return os.environ.get("EDGEC_NO_CONVT_REWRITE", "") in ("", "0")


def phase_weight(w: np.ndarray, strides, dilation=(1, 1)) -> np.ndarray:
    """The conv2d (OIHW) weight of all phases of a ConvTranspose weight ``w`` [Ci, Co, kh, kw]
    (IOHW, one group): ``G[co * sh * sw + rh * sw + rw, ci, mh, mw] =
    W[ci, co, (Th - 1 - mh) * sh + rh, (Tw - 1 - mw) * sw + rw]`` (zero past the kernel),
    ``Th = ceil(kh / sh)``."""
    sh, sw = strides
    dh, dw = dilation
    if dh != 1 or dw != 1:
        ci, co, kh, kw = w.shape
        wd = np.zeros((ci, co, (kh - 1) * dh + 1, (kw - 1) * dw + 1), w.dtype)
        wd[:, :, ::dh, ::dw] = w
        w = wd
    ci, co, kh, kw = w.shape
    th, tw = -(-kh // sh), -(-kw // sw)
    wp = np.zeros((ci, co, th * sh, tw * sw), w.dtype)
    wp[:, :, :kh, :kw] = w
    # tap (j, r) of axis h lives at j * sh + r; conv index m = T - 1 - j (flipped)
    g = wp.reshape(ci, co, th, sh, tw, sw)[:, :, ::-1, :, ::-1, :]
    g = g.transpose(1, 3, 5, 0, 2, 4)  # co, rh, rw, ci, mh, mw
    return np.ascontiguousarray(g.reshape(co * sh * sw, ci, th, tw))


def depth_to_space_te(y, shape, strides, crop, phase_major: bool):
    """The ConvTranspose output from the phase convolution's ``y``: output pixel
    ``(oh, ow)`` is pixel ``((oh + ch) // sh, (ow + cw) // sw)`` of phase
    ``((oh + ch) % sh, (ow + cw) % sw)``, whose channels are ``(co, phase)`` (or ``(phase,
    co)`` with ``phase_major``): depth-to-space and the crop in one pass."""
    sh, sw = strides
    ch, cw = crop
    cout = shape[1]

    def f(b, c, i, j):
        ti, tj = i + ch, j + cw
        r = (ti % sh) * sw + tj % sw
        chan = r * cout + c if phase_major else c * (sh * sw) + r
        return y[b, chan, ti // sh, tj // sw]

    return te.compute(shape, f, name="edgec_depth_to_space", attrs={"edgec_sw": sw})


def _axis_plan(n_in: int, k: int, s: int, pb: int, out: int):
    """One spatial axis: ``(taps T, conv pad begin, conv pad end, conv output length Q,
    crop offset)`` so that the depth-to-space of the conv's Q rows, cropped at the offset,
    gives the ``out`` rows of the ConvTranspose (``k``: the dilated kernel extent)."""
    t = -(-k // s)
    q_lo = pb // s                    # first phase row the crop keeps
    q_hi = (out - 1 + pb) // s        # last
    p0 = t - 1 - q_lo
    if p0 < 0:                        # pads beyond the kernel: start at row T - 1, crop more
        p0, q_lo = 0, t - 1
    q = q_hi - q_lo + 1
    p1 = max(q - 1 + t - n_in - p0, 0)
    q = n_in + p0 + p1 - t + 1        # (>= the rows needed)
    return t, p0, p1, q, pb - q_lo * s


@relax.expr_functor.mutator
class ConvTransposeRewriter(relax.PyExprMutator):
    """conv2d_transpose (constant weight) -> conv2d(s) + depth-to-space + crop; a per-channel
    constant bias added to its only use is folded into the conv(s) (their epilogue)."""

    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0
        self.biased: list = []  # (add call, its conv2d_transpose call, bias [Cout])

    def _const(self, expr):
        v = const_value(expr)
        if v is None and isinstance(expr, relax.Var):
            b = self.lookup_binding(expr)
            v = const_value(b) if b is not None else None
        return v

    def scan(self, func):
        """The ``add(conv2d_transpose(..), bias)`` pairs whose bias folds into the convs."""
        self.biased = []
        counts = use_counts(func)
        bound = {}
        for block in func.body.blocks:
            for b in block.bindings:
                v = b.value
                if isinstance(v, relax.Call) and v.op == CONV_T:
                    bound[b.var] = v
                if not (isinstance(v, relax.Call) and v.op == ADD):
                    continue
                ct, other = v.args
                if not (isinstance(ct, relax.Var) and ct in bound and counts.get(ct) == 1):
                    continue
                bias = const_value(other)  # (constants are folded into the call by now)
                cshape = static_shape(bound[ct])
                if (bias is None or bias.dtype != np.float32 or cshape is None
                        or bias.ndim > 4 or bias.reshape((1,) * (4 - bias.ndim) + bias.shape
                                                         ).shape != (1, cshape[1], 1, 1)):
                    continue
                self.biased.append((v, bound[ct], bias.reshape(-1)))

    def _biased(self, call, i):
        return next((e for e in self.biased if e[i].same_as(call)), None)

    def visit_call_(self, call):
        add = self._biased(call, 0)
        if add is not None and self._biased(add[1], 1) is not None:
            ct = super().visit_call_(add[1])
            out = self._rewrite(ct, add[2])
            if out is not None:
                self.count += 1
                return out
        new = super().visit_call_(call)
        if not (isinstance(new, relax.Call) and new.op == CONV_T):
            return new
        if self._biased(call, 1) is not None and self._accepts(new):
            return new  # rewritten at its bias add (this binding is then dead)
        out = self._rewrite(new)
        if out is None:
            return new
        self.count += 1
        return out

    def _accepts(self, call):
        return self._plan(call) is not None

    def _plan(self, call):
        """(weight, input shape, output shape) of a conv2d_transpose the rewrite takes."""
        a = call.attrs
        x = call.args[0]
        w = self._const(call.args[1])
        xs, ys = static_shape(x), static_shape(call)
        if (w is None or xs is None or ys is None or len(xs) != 4 or w.ndim != 4
                or a.data_layout != "NCHW" or a.kernel_layout != "IOHW"
                or a.out_layout != "NCHW" or str(x.ty.dtype) != "float32"
                or w.dtype != np.float32 or str(call.ty.dtype) != "float32"):
            return None
        groups, cin, cout = int(a.groups), xs[1], ys[1]
        if w.shape[0] != cin or cin % groups or cout % groups:
            return None
        return w, xs, ys

    def _rewrite(self, call, bias=None):
        plan = self._plan(call)
        if plan is None:
            return None
        w, (n, cin, h, wd), (_, cout, oh, ow) = plan
        a = call.attrs
        x = call.args[0]
        groups = int(a.groups)
        strides, dil, pads = ints(a.strides), ints(a.dilation), ints(a.padding)
        kh, kw = ((w.shape[2] - 1) * dil[0] + 1, (w.shape[3] - 1) * dil[1] + 1)
        th, ph0, ph1, qh, ch = _axis_plan(h, kh, strides[0], pads[0], oh)
        tw, pw0, pw1, qw, cw = _axis_plan(wd, kw, strides[1], pads[1], ow)
        conv_pads = [ph0, pw0, ph1, pw1]
        sh, sw = strides
        ss = sh * sw
        bb = self.builder_

        last = ss == 1 and (ch, cw, qh, qw) == (0, 0, oh, ow)  # no depth-to-space, no crop

        def done(expr, final):
            # the result's last op is returned, not emitted: bound to the original variable,
            # no alias binding (which would keep a following activation out of its function)
            return expr if final and last else bb.emit(expr)

        def conv(data, wt, b, g=1, final=True):
            y = relax.op.nn.conv2d(data, relax.const(wt), padding=conv_pads, groups=g)
            if b is not None:
                y = relax.op.add(bb.emit(y), relax.const(
                    np.ascontiguousarray(b, np.float32).reshape(1, -1, 1, 1)))
            return done(y, final)

        def cat(parts):
            return parts[0] if len(parts) == 1 else done(relax.op.concat(parts, axis=1), True)

        rep = None if bias is None else np.repeat(bias, ss)  # (co, phase) order
        if groups == 1:
            y, order = conv(x, phase_weight(w, strides, dil), rep), "c_phase"
        elif groups == cin == cout:  # depthwise: one depthwise conv per phase
            g = phase_weight(w.transpose(1, 0, 2, 3), strides, dil)  # [(c, phase), 1, ..]
            y = cat([conv(x, np.ascontiguousarray(g[r::ss]), bias, g=cin, final=ss == 1)
                     for r in range(ss)])
            order = "phase_c"
        else:  # each group's phases, groups in order (c_phase overall)
            cig, cog = cin // groups, cout // groups
            gw = [phase_weight(w[gi * cig:(gi + 1) * cig], strides, dil) for gi in range(groups)]
            if groups <= SLICED_GROUPS and (th, tw) == (1, 1):  # 1x1: a pixel kernel per group
                y = cat([conv(bb.emit(relax.op.strided_slice(x, [1], [gi * cig],
                                                             [(gi + 1) * cig])), gw[gi],
                              None if rep is None else rep[gi * cog * ss:(gi + 1) * cog * ss],
                              final=False) for gi in range(groups)])
            else:  # one grouped conv
                y = conv(x, np.concatenate(gw), rep, g=groups)
            order = "c_phase"
        if last:
            return y
        # out-elementwise fusable like a kernel: its epilogue (BN, ReLU) fuses, a following
        # Concat does not (a U-Net's: it then has no copy, concat_inplace)
        return bb.call_te(depth_to_space_te, y, (n, cout, oh, ow), (sh, sw), (ch, cw),
                          order == "phase_c", primfunc_name_hint="depth_to_space",
                          primfunc_attrs=KERNEL_ATTRS)


# ----------------------------------------------------------------- depth-to-space schedule
D2S_BLOCK = "edgec_depth_to_space"


def _match_d2s(sch) -> list:
    from ..schedule import blocks_named

    return blocks_named(sch, D2S_BLOCK)


def _apply_d2s(sch, blocks, ctx) -> str:
    """The depth-to-space and its fused elementwise epilogue (ReLU, ...) as one loop nest:
    the depth-to-space and every block but the last inlined (each output written once,
    straight from the phase convolution's output); output rows in parallel; the columns
    in tiles of ``sw`` vectors: per column phase (unrolled) one vector of source pixels,
    stored with stride ``sw`` -- which LLVM turns into shuffles (``vpermt2ps``, NEON
    ``zip``) and whole-vector stores; ~30 % faster than vectors of output columns,
    whose lanes are gathered one by one. A width not a multiple of ``sw``: unrolled scalar
    loops."""
    from ..kernels.generic import schedule_generic
    from ..schedule import all_blocks, extent, pick_tile, pick_vec_tile

    sw = sch.get(blocks[0]).annotations.get("edgec_sw", 1)

    def inline(s_):
        for b in all_blocks(s_)[:-1]:
            s_.compute_inline(b)

    try:
        inline(sch.copy())  # on a copy first: a failure must not leave half a schedule
    except Exception:  # noqa: BLE001 - not a plain elementwise chain: the generic loops
        return "reduce" if schedule_generic(sch, ctx.lanes) else "generic"
    inline(sch)
    (last,) = all_blocks(sch)
    loops = sch.get_loops(last)
    sch.parallel(sch.fuse(*loops[:-1]))
    ow, sw = extent(sch, loops[-1]), int(sw)
    if ow % sw == 0:
        vec = pick_vec_tile(ow // sw, ctx.lanes, ctx.lanes)
        _, vi = sch.split(loops[-1], [None, vec * sw])
        vo, rw = sch.split(vi, [vec, sw])
        sch.reorder(rw, vo)
        sch.vectorize(vo)  # a vector of pixels of one phase (whole source vectors)
        sch.unroll(rw)     # the phases: LLVM interleaves them (vpermt2ps / zip) into rows
    else:
        _, ui = sch.split(loops[-1], [None, pick_tile(ow, 4 * sw)])
        sch.unroll(ui)
    return "depth-to-space"


def d2s_schedule_pass(target, record=None):
    """Module pass, before the default rule list: every fused function holding a
    depth-to-space gets :func:`_apply_d2s`'s schedule (marked scheduled, so the rule list
    leaves it; ``record`` gets its kernel as the rule list's would)."""
    from ..isa import simd_floats
    from ..schedule import RuleContext, blocks_named

    ctx = RuleContext(simd_floats(target))

    @tvm.transform.module_pass(opt_level=0, name="EdgecDepthToSpace")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or (
                    func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)):
                continue
            sch = tvm.s_tir.Schedule(func.with_attr("global_symbol", gv.name_hint))
            blocks = blocks_named(sch, D2S_BLOCK)
            if not blocks:
                continue
            try:
                kind = _apply_d2s(sch, blocks, ctx)
            except Exception as e:  # noqa: BLE001 - left to the rule list (generic)
                log.debug("no depth-to-space schedule for %s: %s", gv.name_hint, e)
                continue
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            if record is not None:
                record.kernels[gv.name_hint] = kind
        return mod

    return _pass


def conv_transpose_pass():
    """Relax pass (constants folded): float ``conv2d_transpose`` with a constant weight ->
    the phase decomposition (see the module docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="EdgecConvTranspose")
    def _pass(mod, _ctx):
        if not enabled():
            return mod
        rw = ConvTransposeRewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
                rw.scan(func)
                rw.builder_.update_func(gv, rw.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rw.builder_.get())

    return _pass
