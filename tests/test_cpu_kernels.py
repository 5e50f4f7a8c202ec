"""edgec's default CPU kernels (targets/cpu/kernels/) against onnxruntime.

Every case also checks the compile report: the intended kernel was applied and no function
was left with unscheduled loops -- a schedule that silently failed would pass the numbers
but lose the speed. Tolerance: rtol 1e-4, atol 1e-4 * max|ref| (float32 sums in another
order).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from onnx import helper

from conftest import compile_and_compare, compile_to, host_has, make_model
from edgec.runtime import OrtSession, Session, run_batched
from edgec.targets.cpu.isa import simd_floats
from edgec.targets.cpu.kernels.pixel_conv import conv_px_tile
from edgec.targets.cpu.kernels.stem_conv import stem_tile
from edgec.targets.cpu.kernels.winograd import matrices, transform_weight, winograd_tile

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _compile_and_compare(model, tmp, target="x86", **kw):
    """Compile ``model`` (``kw``: compile options) and, for x86, check it against
    onnxruntime on random inputs; returns the compile report."""
    return compile_and_compare(model, tmp / "art", target=target, **kw)


EPILOGUES = ["none", "relu", "relu6", "silu", "hardswish", "residual"]


def _epilogue(kind, y, nodes, inits, x_name, x_shape, y_shape):
    if kind == "none":
        return y
    if kind == "relu":
        nodes.append(helper.make_node("Relu", [y], ["e"]))
    elif kind == "relu6":
        inits.update({"lo": np.array(0, np.float32), "hi": np.array(6, np.float32)})
        nodes.append(helper.make_node("Clip", [y, "lo", "hi"], ["e"]))
    elif kind == "silu":
        nodes += [helper.make_node("Sigmoid", [y], ["sg"]),
                  helper.make_node("Mul", [y, "sg"], ["e"])]
    elif kind == "hardswish":
        nodes.append(helper.make_node("HardSwish", [y], ["e"]))
    elif kind == "residual":
        if list(x_shape) != list(y_shape):
            return _epilogue("relu", y, nodes, inits, x_name, x_shape, y_shape)
        nodes += [helper.make_node("Add", [y, x_name], ["a"]),
                  helper.make_node("Relu", ["a"], ["e"])]
    return "e"


def _out(n, k, s, d, p0, p1):
    return (n + p0 + p1 - (k - 1) * d - 1) // s + 1


@SETTINGS
@given(c=st.integers(1, 20), k=st.integers(1, 40), ksz=st.sampled_from([1, 3, 5, 7]),
       stride=st.integers(1, 2), dil=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 3)] * 4),
       h=st.integers(5, 20), w=st.integers(5, 33), batch=st.sampled_from([1, 2]),
       bias=st.booleans(), epi=st.sampled_from(EPILOGUES))
def test_packed_conv(tmp_path_factory, c, k, ksz, stride, dil, pads, h, w, batch, bias, epi):
    ext = (ksz - 1) * dil + 1
    if h + pads[0] + pads[2] < ext or w + pads[1] + pads[3] < ext:
        return
    rng = np.random.default_rng(c * 7 + k)
    inits = {"W": (rng.standard_normal((k, c, ksz, ksz)) * 0.3).astype(np.float32)}
    ins = ["x", "W"]
    if bias:
        inits["B"] = rng.standard_normal(k).astype(np.float32)
        ins.append("B")
    nodes = [helper.make_node("Conv", ins, ["y"], strides=[stride] * 2, dilations=[dil] * 2,
                              pads=list(pads))]
    oh = _out(h, ksz, stride, dil, pads[0], pads[2])
    ow = _out(w, ksz, stride, dil, pads[1], pads[3])
    last = _epilogue(epi, "y", nodes, inits, "x", [batch, c, h, w], [batch, k, oh, ow])
    m = make_model(nodes, [("x", [batch, c, h, w])], [(last, [batch, k, oh, ow])], inits,
                   opset=14)
    report = _compile_and_compare(m, tmp_path_factory.mktemp("pc"))
    lanes = host_lanes()
    px = conv_px_tile(lanes, (batch, c, h, w), (k, c, ksz, ksz), (stride,) * 2, pads)
    wino = winograd_tile(lanes, (batch, c, h, w), (k, c, ksz, ksz), (stride,) * 2, pads,
                         (dil,) * 2, 1)
    stem = stem_tile(lanes, (batch, c, h, w), (k, c, ksz, ksz), (stride,) * 2, pads,
                     (dil,) * 2)
    kind = "conv2d-packed" if px is None else "conv2d-px"
    kind = kind if stem is None else "conv2d-stem"
    kind = kind if wino is None else f"conv2d-winograd-f{wino}"
    assert report["kernels"]["counts"].get(kind) == 1, report["kernels"]
    assert report["kernels"]["unscheduled"] == {}


@SETTINGS
@given(mcpu=st.sampled_from([None, "haswell"]), c=st.integers(1, 4), k=st.integers(1, 40),
       ksz=st.sampled_from([2, 3]), stride=st.integers(1, 3), dil=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 2)] * 4), h=st.integers(3, 20), w=st.integers(3, 70),
       batch=st.sampled_from([1, 2]), epi=st.sampled_from(EPILOGUES))
def test_stem_conv(tmp_path_factory, mcpu, c, k, ksz, stride, dil, pads, h, w, batch, epi):
    """An image's few channels (<= 4, up to 36 reduction steps) on the pixels-in-lanes stem
    kernel: strides through column phases, rows padded to whole vectors, both ISAs."""
    opts = {"mcpu": mcpu} if mcpu else {}
    ext = (ksz - 1) * dil + 1
    if h + pads[0] + pads[2] < ext or w + pads[1] + pads[3] < ext:
        return
    oh = _out(h, ksz, stride, dil, pads[0], pads[2])
    ow = _out(w, ksz, stride, dil, pads[1], pads[3])
    lanes = host_lanes(opts)
    tile = stem_tile(lanes, (batch, c, h, w), (k, c, ksz, ksz), (stride,) * 2, pads,
                     (dil,) * 2)
    wino = winograd_tile(lanes, (batch, c, h, w), (k, c, ksz, ksz), (stride,) * 2, pads,
                         (dil,) * 2, 1)
    if tile is None or wino is not None:
        return
    rng = np.random.default_rng(c * 7 + k + w)
    inits = {"W": (rng.standard_normal((k, c, ksz, ksz)) * 0.3).astype(np.float32),
             "B": rng.standard_normal(k).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], strides=[stride] * 2,
                              dilations=[dil] * 2, pads=list(pads))]
    last = _epilogue(epi, "y", nodes, inits, "x", [batch, c, h, w], [batch, k, oh, ow])
    m = make_model(nodes, [("x", [batch, c, h, w])], [(last, [batch, k, oh, ow])], inits,
                   opset=14)
    out = tmp_path_factory.mktemp("stem") / "art"
    report = compile_to(m, out, target_options=opts)
    assert report["kernels"]["counts"] == {"conv2d-stem": 1}, report["kernels"]
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(out).run(None, {"x": x})[0], ref, rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_stem_tile_choice():
    """The stem kernel takes 3x3 windows on an image's channels, not 1x1 (the 1x1 kernel),
    7x7 on RGB (147 steps: the packed kernel), more channels, or rows padded by over a
    quarter; its tile fits the accumulator budget."""
    from edgec.targets.cpu.isa import px_budget

    assert stem_tile(16, (1, 3, 224, 224), (64, 3, 3, 3), (2, 2), (0,) * 4, (1, 1)) == \
        (112, 7, 2)
    assert stem_tile(8, (1, 1, 28, 28), (32, 1, 3, 3), (1, 1), (1,) * 4, (1, 1))[0] == 32
    assert stem_tile(16, (1, 3, 224, 224), (64, 3, 7, 7), (2, 2), (3,) * 4, (1, 1)) is None
    assert stem_tile(16, (1, 8, 56, 56), (64, 8, 3, 3), (1, 1), (1,) * 4, (1, 1)) is None
    assert stem_tile(16, (1, 3, 56, 56), (64, 3, 1, 1), (1, 1), (0,) * 4, (1, 1)) is None
    assert stem_tile(16, (1, 3, 9, 9), (64, 3, 3, 3), (1, 1), (0,) * 4, (1, 1)) is None
    for lanes in (4, 8, 16):
        owp, vecs, rows = stem_tile(lanes, (1, 3, 224, 224), (24, 3, 3, 3), (2, 2),
                                    (1,) * 4, (1, 1))
        assert owp % (vecs * lanes) == 0 and vecs * rows <= px_budget(lanes)


def _loop_extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _scheduled_updates(model, names, options=None, loop=_loop_extent) -> dict[str, list]:
    """The blocks ``names`` (reduction updates) in the x86 build's scheduled functions:
    name -> ``(value stored, loop(...) of the loops around it, outermost first)`` per
    function (``loop``: a loop's extent, or what the caller asks of it)."""
    import tvm

    from edgec.core.importer import normalize
    from edgec.targets import get_target
    from edgec.targets.backend import make_target, to_relax
    from edgec.targets.cpu.pipeline import cpu_front_phases, schedule_phases
    from edgec.targets.phases import sequential

    target = make_target(get_target("x86"), options or {})
    mod = sequential(target, [*cpu_front_phases(target), *schedule_phases(target, None, None)])(
        to_relax(normalize(model)[0]))
    found: dict[str, list] = {}

    def nested(sch, block):  # every block under ``block``, at any depth
        for child in sch.get_child_blocks(block):
            yield child
            yield from nested(sch, child)

    for _, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            sch = tvm.s_tir.Schedule(f)
            for block in nested(sch, sch.get_sblock("root")):
                name = sch.get(block).name_hint
                if name in names:
                    extents = [loop(sch, lp) for lp in sch.get_loops(block)]
                    found.setdefault(name, []).append((sch.get(block).body.value, extents))
    return found


@pytest.mark.parametrize("mcpu", [None, "haswell"])
def test_every_tap_is_one_multiply_add(mcpu):
    """The stem and the strided depthwise kernels multiply-add each tap straight into its
    accumulator (``acc + x * w``, one product per update): a kernel row's taps written out
    as one sum added to the accumulator once cannot be reassociated (float), cost a multiply
    and an add more per row and made the stem spill its tile (SqueezeNet's stem 3x slower)."""
    import tvm

    from edgec.targets.cpu.schedule import _macs_per_update

    rng = np.random.default_rng(0)
    inits = {"W": (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32),
             "D": (rng.standard_normal((32, 1, 3, 3)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["s"], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Conv", ["s", "D"], ["y"], strides=[2, 2], pads=[1] * 4,
                              group=32)]
    m = make_model(nodes, [("x", [1, 3, 64, 64])], [("y", [1, 32, 16, 16])], inits)
    names = ("edgec_conv2d_stem_update", "edgec_dwconv2d_update")
    updates = _scheduled_updates(m, names, {"mcpu": mcpu} if mcpu else None)
    for name in names:
        assert name in updates, sorted(updates)
        for value, _ in updates[name]:
            assert isinstance(value, tvm.tirx.Add) and _macs_per_update(value) == 1, \
                (name, value)


def host_lanes(options=None) -> int:
    from edgec.targets import get_target
    from edgec.targets.backend import make_target

    return simd_floats(make_target(get_target("x86"), options or {}))


# 1x1 stride 1: pixels in the lanes -- a flat map (H*W whole vectors), rows padded to whole
# vectors, a channel count that is no multiple of the tile, batch 2, a residual epilogue;
# deep inputs whose AVX-512 tile is wide (:func:`test_wide_pixel_tile_choice`)
PX_CASES = [(16, 24, 8, 8, 1, "relu6"), (13, 40, 5, 32, 2, "relu"), (96, 20, 16, 14, 1, "none"),
            (24, 7, 4, 12, 2, "residual"), (32, 32, 6, 8, 1, "residual"),
            (160, 24, 16, 16, 1, "residual"), (200, 40, 8, 8, 2, "relu")]


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
@pytest.mark.parametrize("c,k,h,w,batch,epi", PX_CASES)
def test_pixel_conv(tmp_path, mcpu, c, k, h, w, batch, epi):
    rng = np.random.default_rng(c + k)
    inits = {"W": (rng.standard_normal((k, c, 1, 1)) * 0.3).astype(np.float32),
             "B": rng.standard_normal(k).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"])]
    last = _epilogue(epi, "y", nodes, inits, "x", [batch, c, h, w], [batch, k, h, w])
    m = make_model(nodes, [("x", [batch, c, h, w])], [(last, [batch, k, h, w])], inits,
                   opset=14)
    opts = {"mcpu": mcpu} if mcpu else {}
    out = tmp_path / "art"
    report = compile_to(m, out, target_options=opts)
    lanes = host_lanes(opts)
    assert conv_px_tile(lanes, (batch, c, h, w), (k, c, 1, 1), (1, 1), (0,) * 4) is not None
    assert report["kernels"]["counts"].get("conv2d-px") == 1, report["kernels"]
    assert report["kernels"]["unscheduled"] == {}
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(out).run(None, {"x": x})[0], ref, rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(ref).max()))


# 3x3 stride 1, Winograd: F(4, 3) on an exact and a cropped (30 = 7 * 4 + 2) map, F(2, 3)
# with asymmetric pads and batch 2, odd maps, output channels that are no whole vector, and a
# map large enough to run in chunks of tile rows (batch 2: chunks within each image)
WINO_CASES = [(64, 80, 24, 24, (1, 1, 1, 1), 1, "relu", 4),
              (64, 64, 30, 30, (1, 1, 1, 1), 1, "residual", 4),
              (64, 72, 13, 29, (0, 2, 1, 1), 2, "relu6", 2),
              (64, 81, 17, 19, (1, 1, 1, 1), 2, "silu", 2),
              (128, 128, 112, 112, (1, 1, 1, 1), 2, "residual", 4)]  # in chunks of tile rows


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
@pytest.mark.parametrize("c,k,h,w,pads,batch,epi,m", WINO_CASES)
def test_winograd_conv(tmp_path, mcpu, c, k, h, w, pads, batch, epi, m):
    rng = np.random.default_rng(c + k)
    inits = {"W": (rng.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32),
             "B": rng.standard_normal(k).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=list(pads))]
    oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    last = _epilogue(epi, "y", nodes, inits, "x", [batch, c, h, w], [batch, k, oh, ow])
    model = make_model(nodes, [("x", [batch, c, h, w])], [(last, [batch, k, oh, ow])], inits,
                       opset=14)
    opts = {"mcpu": mcpu} if mcpu else {}
    assert winograd_tile(host_lanes(opts), (batch, c, h, w), (k, c, 3, 3), (1, 1), pads,
                         (1, 1), 1) == m
    out = tmp_path / "art"
    report = compile_to(model, out, target_options=opts)
    assert report["kernels"]["counts"].get(f"conv2d-winograd-f{m}") == 1, report["kernels"]
    assert report["kernels"]["unscheduled"] == {}
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    ref = OrtSession(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(out).run(None, {"x": x})[0], ref, rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_transforms(m):
    """A^T [(G g) * (B^T d)] is the 3-tap correlation of d with g, in 1-D and (through
    transform_weight's G g G^T) in 2-D."""
    bt, g_, at = matrices(m)
    rng = np.random.default_rng(m)
    d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
    np.testing.assert_allclose(at @ ((g_ @ g) * (bt @ d)), np.correlate(d, g, "valid"),
                               atol=1e-12)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    u = transform_weight(w, m, 4)  # [e, kb, c, l]
    a = m + 2
    assert u.shape == (a * a, 2, 3, 4) and not u[:, 1, :, 1:].any()  # 5 channels -> 2 x 4
    d2 = rng.standard_normal((3, a, a))
    v = np.einsum("ei,cij,fj->efc", bt, d2, bt).reshape(a * a, 3)
    mk = np.einsum("ec,eocl->eol", v, u).reshape(a, a, 8)[..., :5]
    y = np.einsum("ie,efk,jf->kij", at, mk, at)
    ref = np.array([[[np.sum(d2[:, i:i + 3, j:j + 3] * w[k]) for j in range(m)]
                     for i in range(m)] for k in range(5)])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_winograd_choice():
    """Tiles decide: F(4, 3) on 56x56 and 28x28 maps, F(2, 3) on 14x14, the direct kernel
    on 7x7, strided, dilated, grouped, 1x1, narrow (fewer than 24 output channels) or small
    convolutions."""
    def tile(c, h, k=None, stride=1, dil=1, groups=1, ksz=3, pads=(1, 1, 1, 1)):
        return winograd_tile(16, (1, c, h, h), (k or c, c, ksz, ksz), (stride,) * 2, pads,
                             (dil,) * 2, groups)

    assert tile(64, 56) == 4 and tile(128, 28) == 4 and tile(256, 14) == 2
    assert tile(512, 7) is None
    assert tile(64, 14) is None and tile(32, 28) is None  # too little work per image
    assert None is tile(64, 56, stride=2) is tile(64, 56, dil=2) is tile(64, 56, groups=2)
    assert None is tile(64, 56, ksz=1, pads=(0,) * 4) is tile(8, 56) is tile(64, 56, k=8)
    # 16 output channels: the direct kernel, also where a vector holds them (U-Net levels)
    assert None is tile(16, 256) is tile(32, 256, k=16)
    assert tile(16, 128, k=32) == 4 and tile(96, 160, k=24) == 4


def test_pixel_tile_choice():
    """Flat maps are cut into tiles of whole vectors; rows pad to whole vectors; a tile's
    accumulators stay under 1 KiB and its input pixels within half of L1, else no tile."""
    from edgec.targets.cpu.kernels.pixel_conv import PX_L1_BYTES, px_tile

    hv, wv, wpad, vecs, rows = px_tile(16, 15, 56, 56, 4 * 24, 144)
    assert (hv, wv, wpad) == (1, 3136, 3136) and 3136 % (16 * vecs) == 0
    assert rows * vecs * 16 * 4 < 1024 and 144 % rows == 0
    assert px_tile(16, 15, 14, 14, 4 * 96, 576)[:3] == (14, 14, 16)
    assert px_tile(16, 15, 7, 7, 4 * 96, 96) is None  # 7 of 16 lanes used
    assert px_tile(16, 15, 14, 14, PX_L1_BYTES // 16 + 4, 96) is None  # K too large
    for vecs_rows in (px_tile(8, 12, 28, 28, 4 * 32, 192)[3:], px_tile(4, 24, 8, 8, 64, 24)[3:]):
        assert vecs_rows[0] * vecs_rows[1] <= 24
    # float 1x1 convolutions take it on flat maps only (rows padded to vectors: packed)
    assert conv_px_tile(16, (1, 96, 14, 14), (576, 96, 1, 1), (1, 1), (0,) * 4) is None
    assert conv_px_tile(8, (1, 96, 14, 14), (576, 96, 1, 1), (1, 1), (0,) * 4) is None
    assert conv_px_tile(16, (1, 96, 28, 28), (576, 96, 1, 1), (1, 1), (0,) * 4) is not None


def test_wide_pixel_tile_choice():
    """Deep inputs on a flat map, AVX-512, float: where L1 leaves one vector per tile, a
    wider tile whose pixels fit L2 and that has 3+ channels; not where it would have fewer
    (128 -> 512 at 28 x 28: 49 vectors allow only 7 x 2), not on AVX2, not for the integer
    kernels (``wide`` off), and the kernel choice itself (px or packed) is unchanged."""
    from edgec.targets.cpu.kernels.pixel_conv import PX_WIDE_BYTES, PX_WIDE_ROWS, px_tile

    def tile(lanes, c, k, hw, **kw):
        return px_tile(lanes, 15 if lanes == 16 else 12, hw, hw, 4 * c, k, **kw)[3:]

    for c, k in ((256, 64), (256, 128), (144, 24)):
        assert tile(16, c, k, 56)[0] == 1
        vecs, rows = tile(16, c, k, 56, wide=True)
        assert vecs > 1 and rows >= PX_WIDE_ROWS and 4 * c * vecs * 16 <= PX_WIDE_BYTES
        assert vecs * rows <= 15 and 3136 % (16 * vecs) == 0
        assert tile(8, c, k, 56, wide=True) == tile(8, c, k, 56)
    assert tile(16, 256, 64, 56, wide=True) == (4, 3)
    for c, k, hw in ((160, 24, 16), (200, 40, 8)):  # PX_CASES' wide ones
        assert tile(16, c, k, hw)[0] == 1 and tile(16, c, k, hw, wide=True)[0] > 1
    assert tile(16, 128, 512, 28, wide=True) == tile(16, 128, 512, 28) == (1, 14)
    assert tile(16, 64, 256, 56, wide=True) == tile(16, 64, 256, 56)  # already wide
    assert conv_px_tile(16, (1, 512, 28, 28), (128, 512, 1, 1), (1, 1), (0,) * 4) is None
    assert conv_px_tile(16, (1, 256, 56, 56), (64, 256, 1, 1), (1, 1), (0,) * 4)[3:] == (4, 3)


@SETTINGS
@given(c=st.integers(1, 24), ksz=st.sampled_from([3, 5]), stride=st.integers(1, 3),
       dil=st.integers(1, 2), pads=st.tuples(*[st.integers(0, 2)] * 4), h=st.integers(6, 30),
       w=st.integers(6, 40), epi=st.sampled_from(EPILOGUES))
def test_depthwise_conv(tmp_path_factory, c, ksz, stride, dil, pads, h, w, epi):
    ext = (ksz - 1) * dil + 1
    if h + pads[0] + pads[2] < ext or w + pads[1] + pads[3] < ext:
        return
    rng = np.random.default_rng(c)
    inits = {"W": rng.standard_normal((c, 1, ksz, ksz)).astype(np.float32),
             "B": rng.standard_normal(c).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], group=c, strides=[stride] * 2,
                              dilations=[dil] * 2, pads=list(pads))]
    oh = _out(h, ksz, stride, dil, pads[0], pads[2])
    ow = _out(w, ksz, stride, dil, pads[1], pads[3])
    last = _epilogue(epi, "y", nodes, inits, "x", [1, c, h, w], [1, c, oh, ow])
    m = make_model(nodes, [("x", [1, c, h, w])], [(last, [1, c, oh, ow])], inits, opset=14)
    report = _compile_and_compare(m, tmp_path_factory.mktemp("dw"))
    if c > 1:
        assert report["kernels"]["counts"].get("dwconv2d") == 1, report["kernels"]
    assert report["kernels"]["unscheduled"] == {}


@pytest.mark.parametrize("m_,k_,n_", [(1, 64, 10), (1, 1280, 1000), (3, 33, 17), (8, 512, 128),
                                      (6, 20, 70), (1, 7, 1)])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
def test_gemm(tmp_path, m_, k_, n_, trans_b, mcpu):
    """Gemm by a constant weight on the packed dense kernel (tiles of up to 4 vectors of
    outputs, a last partial tile, rows in register tiles of up to 4), bias and ReLU fused."""
    rng = np.random.default_rng(0)
    B = rng.standard_normal((n_, k_) if trans_b else (k_, n_)).astype(np.float32)
    inits = {"B": B, "C": rng.standard_normal(n_).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "B", "C"], ["y"], transB=trans_b),
             helper.make_node("Relu", ["y"], ["z"])]
    m = make_model(nodes, [("x", [m_, k_])], [("z", [m_, n_])], inits)
    out = tmp_path / "art"
    report = compile_to(m, out, target_options={"mcpu": mcpu} if mcpu else {})
    assert report["kernels"]["counts"] == {"dense-packed": 1}, report["kernels"]
    x = rng.standard_normal((m_, k_)).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(out).run(None, {"x": x})[0], ref, rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("shape,n", [((1, 7, 7, 96), 40), ((2, 3, 10, 24), 72), ((1, 50, 48), 20),
                                     ((1, 14, 14, 64), 256)])
@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
def test_matmul_of_rows_with_gelu(tmp_path, shape, n, mcpu):
    """ConvNeXt's Linear on a channels-last map: ``X[1, H, W, C] @ W + b`` then GELU (Erf),
    the leading axes as rows of the packed dense kernel (a row count the register tile does
    not divide is padded), the output tile outer, GELU's erf vectorized (fast_erf)."""
    rng = np.random.default_rng(n)
    k = shape[-1]
    inits = {"W": (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32),
             "b": rng.standard_normal(n).astype(np.float32),
             "r2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
             "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Div", ["a", "r2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["a", "e1"], ["g"]),
             helper.make_node("Mul", ["g", "half"], ["y"])]
    m = make_model(nodes, [("x", list(shape))], [("y", [*shape[:-1], n])], inits)
    report = _compile_and_compare(m, tmp_path, target_options={"mcpu": mcpu} if mcpu else {})
    assert report["kernels"]["counts"] == {"dense-packed": 1}, report["kernels"]


def test_fast_erf_accuracy(tmp_path):
    """Erf without libm (TVM's fast_erf, vectorizable): within 5e-7 of erf over [-10, 10];
    NaN stays NaN, +-inf give +-1."""
    import math

    x = np.linspace(-10, 10, 8001, dtype=np.float32).reshape(1, 8001)
    x[0, :3] = [np.nan, np.inf, -np.inf]
    m = make_model([helper.make_node("Erf", ["x"], ["y"])], [("x", [1, 8001])],
                   [("y", [1, 8001])])
    compile_to(m, tmp_path / "erf")
    got = Session(tmp_path / "erf").run(None, {"x": x})[0][0]
    assert np.isnan(got[0]) and got[1] == 1.0 and got[2] == -1.0
    ref = np.array([math.erf(v) for v in x[0, 3:].astype(np.float64)])
    assert np.max(np.abs(got[3:] - ref)) < 5e-7


def test_matmul_without_constant_weight(tmp_path):
    """Two activations (or a batched constant) keep TOPI's matmul with the generic tile."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"]),
             helper.make_node("MatMul", ["y", "W"], ["z"])]
    m = make_model(nodes, [("a", [2, 5, 12]), ("b", [2, 12, 9])], [("z", [2, 5, 4])],
                   {"W": rng.standard_normal((2, 9, 4)).astype(np.float32)})
    report = _compile_and_compare(m, tmp_path)
    assert report["kernels"]["counts"] == {"matmul": 2}, report["kernels"]


@SETTINGS
@given(groups=st.integers(2, 12), ci=st.integers(1, 5), co=st.integers(1, 30),
       ksz=st.sampled_from([1, 3, 5]), stride=st.integers(1, 3), dil=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 2)] * 4), h=st.integers(5, 20), w=st.integers(5, 36),
       epi=st.sampled_from(EPILOGUES), mcpu=st.sampled_from([None, "haswell"]))
@example(groups=32, ci=4, co=4, ksz=3, stride=1, dil=1, pads=(1, 1, 1, 1), h=14, w=14,
         epi="relu", mcpu="haswell")  # ResNeXt's 32 x 4d
@example(groups=2, ci=1, co=24, ksz=3, stride=1, dil=1, pads=(1, 1, 1, 1), h=5, w=5,
         epi="none", mcpu="haswell")  # one input channel per group, whole vectors out
def test_grouped_conv_narrow_groups(tmp_path_factory, groups, ci, co, ksz, stride, dil, pads,
                                    h, w, epi, mcpu):
    """Grouped convolutions whose groups are not whole vectors of output channels
    (ResNeXt's 32 groups of 4, a channel multiplier, 26 channels per group: more than one
    register tile): the grouped row kernel, against onnxruntime, each ISA by -mcpu."""
    ext = (ksz - 1) * dil + 1
    if h + pads[0] + pads[2] < ext or w + pads[1] + pads[3] < ext or (ci == 1 and co == 1):
        return
    lanes = 8 if mcpu == "haswell" or not host_has("avx512f") else 16
    if co % lanes == 0 and ci > 1:
        return  # the packed kernel's (test_grouped_conv_on_the_packed_kernel)
    c, k = groups * ci, groups * co
    rng = np.random.default_rng(c + k)
    inits = {"W": rng.standard_normal((k, ci, ksz, ksz)).astype(np.float32),
             "B": rng.standard_normal(k).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], group=groups,
                              strides=[stride] * 2, dilations=[dil] * 2, pads=list(pads))]
    oh = _out(h, ksz, stride, dil, pads[0], pads[2])
    ow = _out(w, ksz, stride, dil, pads[1], pads[3])
    last = _epilogue(epi, "y", nodes, inits, "x", [1, c, h, w], [1, k, oh, ow])
    m = make_model(nodes, [("x", [1, c, h, w])], [(last, [1, k, oh, ow])], inits, opset=14)
    report = _compile_and_compare(m, tmp_path_factory.mktemp("gconv"),
                                  target_options={"mcpu": mcpu} if mcpu else {})
    assert report["kernels"]["counts"].get("gconv2d") == 1, report["kernels"]
    assert report["kernels"]["unscheduled"] == {} and report["kernels"]["fallbacks"] == {}


def test_grouped_conv_narrow_groups_builds_for_aarch64(tmp_path):
    """The grouped row kernel for a NEON target (4 lanes): 4 groups of 2 and of 6 channels."""
    rng = np.random.default_rng(1)
    for co in (2, 6):
        inits = {"W": rng.standard_normal((4 * co, 3, 3, 3)).astype(np.float32)}
        nodes = [helper.make_node("Conv", ["x", "W"], ["y"], group=4, pads=[1, 1, 1, 1])]
        m = make_model(nodes, [("x", [1, 12, 9, 9])], [("y", [1, 4 * co, 9, 9])], inits)
        report = compile_to(m, tmp_path / f"arm{co}", target="rpi4")
        assert report["kernels"]["counts"] == {"gconv2d": 1}, report["kernels"]


@pytest.mark.parametrize("mcpu", ["haswell", "skylake-avx512"])
def test_squeeze_excitation_scale_stays_scheduled(tmp_path, mcpu):
    """MobileNetV3's squeeze-excitation: the second 1x1 conv on the pooled [1, C, 1, 1]
    fused with hard-sigmoid and the multiply by the [1, C, H, W] feature map. The multiply
    writes more than the conv's tile, so it cannot move under the conv's loops: it stays
    after them, parallel and vectorized, instead of the whole function staying unscheduled
    (under -mcpu haswell it had, 14 % of MobileNetV3's time). Built for either ISA; run
    where the host can."""
    rng = np.random.default_rng(4)
    c, r = 480, 120
    inits = {"W1": (rng.standard_normal((r, c, 1, 1)) / 20).astype(np.float32),
             "B1": rng.standard_normal(r).astype(np.float32),
             "W2": (rng.standard_normal((c, r, 1, 1)) / 10).astype(np.float32),
             "B2": rng.standard_normal(c).astype(np.float32)}
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Conv", ["p", "W1", "B1"], ["a"]),
             helper.make_node("Relu", ["a"], ["a2"]),
             helper.make_node("Conv", ["a2", "W2", "B2"], ["s"]),
             helper.make_node("HardSigmoid", ["s"], ["s2"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["s2", "x"], ["y"])]
    m = make_model(nodes, [("x", [1, c, 14, 14])], [("y", [1, c, 14, 14])], inits)
    opts = {"target_options": {"mcpu": mcpu}}
    if mcpu == "haswell" or host_has("avx512f"):
        report = _compile_and_compare(m, tmp_path, **opts)
    else:
        report = compile_to(m, tmp_path / "art", **opts)
    k = report["kernels"]
    assert k["unscheduled"] == {} and k["counts"].get("conv2d-packed") == 2, k


@pytest.mark.parametrize("mcpu", ["haswell", "host"])
@pytest.mark.parametrize("c,k,groups,ksz,stride,hw,epi", [
    (64, 64, 4, 3, 1, 14, "residual"), (48, 96, 3, 3, 2, 15, "relu"),
    (128, 128, 8, 3, 1, 7, "none"), (32, 64, 2, 1, 1, 10, "relu6")])
def test_grouped_conv_on_the_packed_kernel(tmp_path, mcpu, c, k, groups, ksz, stride, hw, epi):
    """Grouped convolutions whose groups hold whole vectors of output channels (RegNet's
    group width 16): the packed kernel, each channel block reading its group's inputs."""
    opts = {} if mcpu == "host" else {"mcpu": mcpu}
    rng = np.random.default_rng(groups)
    inits = {"W": (rng.standard_normal((k, c // groups, ksz, ksz)) * 0.2).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], group=groups, strides=[stride] * 2,
                              pads=[ksz // 2] * 4)]
    o = _out(hw, ksz, stride, 1, ksz // 2, ksz // 2)
    last = _epilogue(epi, "y", nodes, inits, "x", [1, c, hw, hw], [1, k, o, o])
    m = make_model(nodes, [("x", [1, c, hw, hw])], [(last, [1, k, o, o])], inits)
    report = compile_to(m, tmp_path / "art", target_options=opts)
    assert report["kernels"]["counts"] == {"conv2d-packed": 1}, report["kernels"]
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(tmp_path / "art").run(None, {"x": x})[0], ref,
                               rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_fast_sigmoid_accuracy(tmp_path):
    x = np.linspace(-30, 30, 4001, dtype=np.float32).reshape(1, 4001)
    m = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], [("x", [1, 4001])],
                   [("y", [1, 4001])])
    compile_to(m, tmp_path / "sig")
    got = Session(tmp_path / "sig").run(None, {"x": x})[0]
    ref = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.max(np.abs(got - ref)) < 1e-6
    assert np.max(np.abs(got - ref) / ref) < 1e-5


# rpi4 (Cortex-A72, no dotprod) in the default run; the other two CPUs with the slow tests
@pytest.mark.parametrize("target", ["rpi4", pytest.param("rpi5", marks=pytest.mark.slow),
                                    pytest.param("arm64", marks=pytest.mark.slow)])
def test_kernels_build_for_aarch64(tmp_path, target):
    from conftest import conv_bn_model

    rng = np.random.default_rng(2)
    inits = {"W": rng.standard_normal((16, 1, 3, 3)).astype(np.float32)}
    for c, kind in ((3, "conv2d-stem"), (8, "conv2d-packed")):
        report = compile_to(conv_bn_model(c=c), tmp_path / f"cb{c}", target=target)
        assert report["kernels"]["counts"].get(kind) == 1, report["kernels"]
        assert report["kernels"]["unscheduled"] == {}
    dw = make_model([helper.make_node("Conv", ["x", "W"], ["y"], group=16, strides=[2, 2])],
                    [("x", [1, 16, 12, 12])], [("y", [1, 16, 5, 5])], inits)
    report = compile_to(dw, tmp_path / "dw", target=target)
    assert report["kernels"]["counts"].get("dwconv2d") == 1
    px = make_model([helper.make_node("Conv", ["x", "P"], ["y"]),
                     helper.make_node("Relu", ["y"], ["z"])],
                    [("x", [1, 16, 6, 10])], [("z", [1, 24, 6, 10])],
                    {"P": rng.standard_normal((24, 16, 1, 1)).astype(np.float32)})
    report = compile_to(px, tmp_path / "px", target=target)
    assert report["kernels"]["counts"].get("conv2d-px") == 1
    assert report["kernels"]["unscheduled"] == {}
    mp = make_model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3],
                                      strides=[2, 2], pads=[1, 1, 1, 1])],
                    [("x", [1, 16, 12, 12])], [("y", [1, 16, 6, 6])])
    report = compile_to(mp, tmp_path / "mp", target=target)
    assert report["kernels"]["counts"].get("maxpool2d") == 1
    wi = make_model([helper.make_node("Conv", ["x", "Q"], ["y"], pads=[1, 1, 1, 1]),
                     helper.make_node("Relu", ["y"], ["z"])],
                    [("x", [1, 64, 24, 24])], [("z", [1, 96, 24, 24])],
                    {"Q": rng.standard_normal((96, 64, 3, 3)).astype(np.float32)})
    report = compile_to(wi, tmp_path / "wi", target=target)
    assert report["kernels"]["counts"].get("conv2d-winograd-f4") == 1, report["kernels"]
    assert report["kernels"]["unscheduled"] == {}
    fc = make_model([helper.make_node("Gemm", ["x", "B", "C"], ["y"], transB=1)],
                    [("x", [1, 40])], [("y", [1, 21])],
                    {"B": rng.standard_normal((21, 40)).astype(np.float32),
                     "C": rng.standard_normal(21).astype(np.float32)})
    report = compile_to(fc, tmp_path / "fc", target=target)
    assert report["kernels"]["counts"] == {"dense-packed": 1}, report["kernels"]
    rs = make_model([helper.make_node("Resize", ["x", "", "", "s"], ["y"], mode="linear")],
                    [("x", [1, 8, 7, 7])], [("y", [1, 8, 14, 14])],
                    {"s": np.array([1, 8, 14, 14], np.int64)}, opset=13)
    report = compile_to(rs, tmp_path / "rs", target=target)
    assert report["kernels"]["counts"] == {"resize": 1}, report["kernels"]
    cat = make_model([helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
                      helper.make_node("Relu", ["c"], ["y"])],
                     [("a", [1, 8, 13, 13]), ("b", [1, 24, 13, 13])], [("y", [1, 32, 13, 13])])
    report = compile_to(cat, tmp_path / "cat", target=target)
    assert report["kernels"]["counts"] == {"concat": 1}, report["kernels"]


def test_batch_split_matches(tmp_path):
    from conftest import conv_bn_model

    m = conv_bn_model(batch=4)
    compile_to(m, tmp_path / "b4")
    sess = Session(tmp_path / "b4")
    x = np.random.default_rng(0).standard_normal((10, 3, 12, 12)).astype(np.float32)
    got = run_batched(sess, {"x": x}, 4)[0]
    ref = run_batched(OrtSession(m), {"x": x}, 4)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_avx2_kernels(tmp_path):
    """The 8-lane (AVX2) kernels, as on machines without AVX-512 (this host runs them too)."""
    from conftest import conv_bn_model

    from edgec.targets.cpu.isa import simd_floats
    from edgec.targets.backend import make_target
    from edgec.targets import get_target

    assert simd_floats(make_target(get_target("x86"), {"mcpu": "haswell"})) == 8
    rng = np.random.default_rng(5)
    inits = {"W": rng.standard_normal((12, 1, 3, 3)).astype(np.float32)}
    for name, m in [("cb", conv_bn_model(k=20)),
                    ("dw", make_model([helper.make_node("Conv", ["x", "W"], ["y"], group=12,
                                                        strides=[2, 2], pads=[1, 1, 1, 1])],
                                      [("x", [1, 12, 15, 15])], [("y", [1, 12, 8, 8])], inits))]:
        out = tmp_path / name
        report = compile_to(m, out, target_options={"mcpu": "haswell"})
        assert report["kernels"]["unscheduled"] == {}
        x = rng.standard_normal(Session(out).input_specs[0]["shape"]).astype(np.float32)
        np.testing.assert_allclose(Session(out).run(None, {"x": x})[0],
                                   OrtSession(m).run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mcpu", ["haswell", "host"])
@pytest.mark.parametrize("c,k,ksz,stride,pad,w,epi", [
    (16, 24, 3, 1, 1, 13, "residual"), (8, 20, 1, 1, 0, 17, "relu"), (6, 16, 3, 2, 1, 45, "none"),
    (12, 12, 5, 1, 2, 23, "residual"), (512, 40, 1, 1, 0, 13, "relu")])
def test_packed_conv_odd_widths(tmp_path, mcpu, c, k, ksz, stride, pad, w, epi):
    """Rows whose width has no divisor near the register tile (primes above AVX2's 13
    columns) are computed padded to one (17 -> 18, two 9-column tiles) and stored unpadded;
    a 13-wide row is one 13-column tile on AVX2."""
    from edgec.targets.cpu.kernels.packed_conv import padded_width
    from edgec.targets.cpu.isa import max_cols

    opts = {} if mcpu == "host" else {"mcpu": mcpu}
    h = 9
    rng = np.random.default_rng(w)
    inits = {"W": (rng.standard_normal((k, c, ksz, ksz)) * 0.1).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], strides=[stride] * 2,
                              pads=[pad] * 4)]
    oh, ow = _out(h, ksz, stride, 1, pad, pad), _out(w, ksz, stride, 1, pad, pad)
    last = _epilogue(epi, "y", nodes, inits, "x", [1, c, h, w], [1, k, oh, ow])
    m = make_model(nodes, [("x", [1, c, h, w])], [(last, [1, k, oh, ow])], inits)
    out = tmp_path / "art"
    report = compile_to(m, out, target_options=opts)
    assert report["kernels"]["counts"] == {"conv2d-packed": 1}, report["kernels"]
    if mcpu == "haswell":
        assert padded_width(ow, max_cols(8)) > ow or ow <= 13 or ow % 6 == 0
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(out).run(None, {"x": x})[0], ref, rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_avx2_float_tile_takes_a_13_wide_row():
    """AVX2 float tiles take up to 13 columns (15 of 16 ymm), so a 13-wide row is one tile
    rather than padded to two 7-column ones; 17 still pads (two 9s); int8 tiles keep 12."""
    from edgec.targets.cpu.isa import int_cols, max_cols
    from edgec.targets.cpu.kernels.packed_conv import padded_width
    from edgec.targets.cpu.schedule import default_tile

    assert padded_width(13, max_cols(8)) == 13 and default_tile(125, 13, max_cols(8)) == (1, 13)
    assert padded_width(17, max_cols(8)) == 18 and default_tile(5, 18, max_cols(8)) == (1, 9)
    assert int_cols(8) == 12 and int_cols(16) == max_cols(16) == 14


def test_deep_1x1_tile_choice():
    """Deep 1x1 convolutions on AVX-512 rows of 28+ columns take 4 channel blocks x up to 7
    columns, on AVX2 rows of at most 14 columns 4 x 2; other widths, shallow or spatial
    windows and channel counts that are no multiple of 4 blocks keep the default tile."""
    from edgec.targets.cpu.kernels.packed_conv import deep_tile

    assert deep_tile(16, 512, 1, 1, 28, 8) == (4, 7)
    assert deep_tile(16, 256, 1, 1, 30, 32) == (4, 6)
    assert deep_tile(8, 512, 1, 1, 28, 16) is None
    assert deep_tile(4, 512, 1, 1, 28, 32) is None
    assert deep_tile(16, 128, 1, 1, 28, 8) is None
    assert deep_tile(16, 512, 3, 3, 28, 8) is None
    assert deep_tile(16, 512, 1, 1, 28, 6) is None
    assert deep_tile(16, 512, 1, 1, 29, 8) is None  # a prime width: 1-column tiles
    # AVX2: narrow rows (<= 14 columns) of a 1x1 over >= 96 channels: 4 blocks x 2 columns
    assert deep_tile(8, 1024, 1, 1, 14, 32) == (4, 2)
    assert deep_tile(8, 2048, 1, 1, 7, 64) == (4, 2)
    assert deep_tile(8, 96, 1, 1, 14, 72) == (4, 2)
    assert deep_tile(8, 64, 1, 1, 14, 48) is None
    assert deep_tile(8, 512, 1, 1, 15, 16) is None
    assert deep_tile(8, 512, 3, 3, 14, 16) == (4, 2)  # a window: the spatial rule below
    assert deep_tile(8, 512, 1, 1, 14, 125) is None  # 1000 channels: no multiple of 4 blocks
    # AVX2 spatial windows where the default is 1 block x 7-13 columns: 4 x 2 as well
    assert deep_tile(8, 32, 3, 3, 28, 4) == (4, 2)
    assert deep_tile(8, 64, 5, 5, 14, 12) == (4, 2)
    assert deep_tile(8, 64, 3, 3, 6, 8) is None     # 2 x 6 by default
    assert deep_tile(8, 64, 3, 3, 28, 6) is None    # no multiple of 4 blocks
    assert deep_tile(8, 3, 3, 3, 112, 4) is None    # an image stem
    # AVX-512 rows of 8..27 columns (the default: 1 block x the row), >= 256 channels in,
    # >= 8 blocks out: 2 blocks (3 when odd) x at most 7 columns
    assert deep_tile(16, 1024, 1, 1, 14, 16) == (2, 7)
    assert deep_tile(16, 512, 1, 1, 13, 63) == (3, 7)     # SqueezeNet's classifier: 7 + 6
    assert deep_tile(16, 512, 1, 1, 10, 8) == (2, 5)
    assert deep_tile(16, 512, 1, 1, 20, 8) == (2, 7)
    assert deep_tile(16, 512, 1, 1, 7, 32) is None        # the default is 2 x 7 already
    assert deep_tile(16, 384, 1, 1, 14, 4) is None        # few blocks (MobileNetV2)
    assert deep_tile(16, 192, 1, 1, 14, 32) is None       # shallow
    assert deep_tile(16, 512, 1, 1, 14, 35) is None       # neither 2 nor 3 blocks divide
    assert deep_tile(16, 512, 3, 3, 14, 16) is None


def _conv_with_epilogue(ic, oc, hw, epi, k=1, stride=1):
    """``Conv(k x k, stride, same padding) + bias`` then the epilogue ``epi`` on a square map
    (weights seeded by the shape)."""
    rng = np.random.default_rng(ic + hw)
    inits = {"W": (rng.standard_normal((oc, ic, k, k)) * 0.05).astype(np.float32),
             "B": rng.standard_normal(oc).astype(np.float32)}
    ohw = (hw + 2 * (k // 2) - k) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[k // 2] * 4,
                              strides=[stride] * 2)]
    last = _epilogue(epi, "y", nodes, inits, "x", [1, ic, hw, hw], [1, oc, ohw, ohw])
    return make_model(nodes, [("x", [1, ic, hw, hw])], [(last, [1, oc, ohw, ohw])], inits)


@pytest.mark.parametrize("ic,oc,hw,epi", [(1024, 64, 14, "residual"), (256, 96, 7, "relu"),
                                          (128, 32, 13, "none")])
def test_avx2_narrow_1x1_tile_matches(tmp_path, ic, oc, hw, epi):
    """The AVX2 4 x 2 tile of narrow 1x1 convolutions (a last tile of one column on odd
    rows) against onnxruntime, built with -mcpu haswell on any host."""
    m = _conv_with_epilogue(ic, oc, hw, epi)
    report = _compile_and_compare(m, tmp_path, target_options={"mcpu": "haswell"})
    assert report["kernels"]["counts"] == {"conv2d-packed": 1}, report["kernels"]


@pytest.mark.parametrize("ic,oc,hw,k,stride,epi", [
    (32, 32, 28, 3, 1, "relu"), (64, 128, 15, 3, 2, "none"), (16, 32, 13, 5, 1, "relu6")])
def test_avx2_spatial_4x2_tile_matches(tmp_path, ic, oc, hw, k, stride, epi):
    """The AVX2 4 x 2 tile of convolutions with a spatial window (28 columns; a stride-2
    map of 8; 13 columns: a last tile of one) against onnxruntime, built with -mcpu haswell
    on any host, and the tile in the scheduled update."""
    m = _conv_with_epilogue(ic, oc, hw, epi, k, stride)
    report = _compile_and_compare(m, tmp_path, target_options={"mcpu": "haswell"})
    assert report["kernels"]["counts"] == {"conv2d-packed": 1}, report["kernels"]
    name = "edgec_conv2d_packed_update"
    (_, extents), = _scheduled_updates(m, [name], {"mcpu": "haswell"})[name]
    assert extents[-1] == 8 and extents[-3:-1] == [4, 2], extents


@pytest.mark.parametrize("ic,oc,hw,epi", [(512, 1000, 13, "relu"), (1024, 256, 14, "residual"),
                                          (256, 128, 10, "none")])
def test_narrow_avx512_1x1_tile_matches(tmp_path, ic, oc, hw, epi):
    """Built for the host: on AVX-512 the 3 x 7 tile (63 blocks, 13 columns: a last tile of
    6) and 2 x 7 / 2 x 5 tiles of narrow deep 1x1 convolutions against onnxruntime (on AVX2
    hosts the same models through the AVX2 tiles); the tile built for AVX-512 on any host is
    checked by ``test_narrow_avx512_tile_is_applied``."""
    m = _conv_with_epilogue(ic, oc, hw, epi)
    report = _compile_and_compare(m, tmp_path)
    assert report["kernels"]["counts"] == {"conv2d-packed": 1}, report["kernels"]


def test_narrow_avx512_tile_is_applied():
    """Built for AVX-512 (whatever the host), SqueezeNet's classifier 512 -> 1000 on 13x13
    runs 3 channel blocks x 7 columns around the 16 lanes of the update."""
    rng = np.random.default_rng(0)
    inits = {"W": (rng.standard_normal((1000, 512, 1, 1)) * 0.1).astype(np.float32)}
    m = make_model([helper.make_node("Conv", ["x", "W"], ["y"])],
                   [("x", [1, 512, 13, 13])], [("y", [1, 1000, 13, 13])], inits)
    name = "edgec_conv2d_packed_update"
    (_, extents), = _scheduled_updates(m, [name], {"mcpu": "skylake-avx512"})[name]
    assert extents[-1] == 16 and extents[-3:-1] == [3, 7], extents


@pytest.mark.parametrize("mcpu,tile", [("skylake-avx512", [4, 7]), ("haswell", None)])
def test_deep_1x1_tile_is_applied(mcpu, tile):
    """Built for AVX-512 (whatever the host), a 512 -> 128 1x1 convolution (stride 2, as
    ResNet-50's downsampling: the packed kernel on either ISA) onto 28x28 runs the 4
    channel-block x 7 column register tile: the loops right around the 16 lanes of the
    update are 4 and 7; for AVX2 the default tile (not 4 blocks)."""
    rng = np.random.default_rng(0)
    inits = {"W": (rng.standard_normal((128, 512, 1, 1)) * 0.1).astype(np.float32)}
    m = make_model([helper.make_node("Conv", ["x", "W"], ["y"], strides=[2, 2])],
                   [("x", [1, 512, 56, 56])], [("y", [1, 128, 28, 28])], inits)
    name = "edgec_conv2d_packed_update"
    (_, extents), = _scheduled_updates(m, [name], {"mcpu": mcpu})[name]
    if tile:
        assert extents[-1] == 16 and extents[-3:-1] == tile, extents
    else:
        assert extents[-1] == 8 and extents[-3] != 4, extents


def test_channel_blocks_padded_for_a_two_block_tile():
    """One block of zeros where an odd count of channel blocks would leave rows of at most
    7 columns on a 1-block tile; none where the count splits, the rows are wide, the blocks
    are few or the input is an image."""
    from edgec.targets.cpu.kernels.packed_conv import channel_blocks

    assert channel_blocks(400, 400, 7, 16, 14) == 26       # RegNet: 25 -> 26
    assert channel_blocks(232, 232, 7, 16, 14) == 16       # ShuffleNetV2: 15 (3 x 7 > 14)
    assert channel_blocks(168, 672, 1, 16, 14) == 12       # an SE block: 11 -> 12 (3 x 1)
    assert channel_blocks(400, 400, 14, 16, 14) == 25      # 14 columns: one block anyway
    assert channel_blocks(384, 400, 7, 16, 14) == 24       # even
    assert channel_blocks(400, 400, 7, 8, 12) == 52        # AVX2: 4 x 2 (test below)
    assert channel_blocks(392, 400, 6, 8, 12) == 52        # AVX2, 6 columns: 49 -> 52 (4 x 2)
    assert channel_blocks(80, 400, 7, 16, 14) == 5         # 5 blocks: the zeros would cost 20 %
    assert channel_blocks(400, 3, 7, 16, 14) == 25         # an image stem


def test_channel_blocks_padded_to_four_on_avx2():
    """AVX2: zeros up to a multiple of 4 blocks where that gives the 4 x 2 tile and costs at
    most 1/16 more FMAs; not for wide rows, shallow inputs or a larger share of zeros."""
    from edgec.targets.cpu.kernels.packed_conv import channel_blocks, deep_tile

    assert deep_tile(8, 400, 1, 1, 7, 50) is None                 # 1 x 7 by default
    assert channel_blocks(400, 400, 7, 8, 12) == 52              # RegNet: 50 -> 52
    assert deep_tile(8, 400, 1, 1, 7, 52) == (4, 2)
    assert channel_blocks(1000, 512, 13, 8, 12) == 128           # SqueezeNet's classifier
    assert channel_blocks(232, 232, 7, 8, 12) == 29              # 3 of 29 blocks: no
    assert channel_blocks(400, 400, 28, 8, 12) == 50             # wide rows: no 4 x 2
    assert channel_blocks(400, 64, 7, 8, 12) == 50               # shallow: no 4 x 2
    assert channel_blocks(1000, 512, 13, 16, 14) == 63           # AVX-512: unchanged


@pytest.mark.parametrize("mcpu,tile", [("skylake-avx512", [2, 7, 16]), ("haswell", [4, 2, 8])])
def test_odd_channel_blocks_take_two_block_tile(tmp_path, mcpu, tile):
    """RegNet's 1x1 400 -> 400 at 7x7: built for AVX-512 the 25 channel blocks are padded
    to 26 and tiled two at a time (the loop around the 7 columns is 2); for AVX2 the 50
    blocks to 52, tiled 4 x 2 columns; the padded channels are computed and dropped: the
    output matches onnxruntime on either ISA (run where the host has it)."""
    rng = np.random.default_rng(1)
    inits = {"W": (rng.standard_normal((400, 400, 1, 1)) * 0.05).astype(np.float32),
             "B": rng.standard_normal(400).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"]),
             helper.make_node("Relu", ["c"], ["y"])]
    m = make_model(nodes, [("x", [1, 400, 7, 7])], [("y", [1, 400, 7, 7])], inits)
    name = "edgec_conv2d_packed_update"
    (_, extents), = _scheduled_updates(m, [name], {"mcpu": mcpu})[name]
    assert extents[-3:] == tile, extents
    if mcpu == "haswell" or host_has("avx512f"):
        report = _compile_and_compare(m, tmp_path, target_options={"mcpu": mcpu})
        assert report["kernels"]["counts"] == {"conv2d-packed": 1}, report["kernels"]


@pytest.mark.parametrize("mcpu", ["skylake-avx512", "haswell"])
@pytest.mark.parametrize("c,k,h,stride,rows_outer", [
    (512, 1024, 28, 2, False),    # ResNet-50's projection, 2 MiB of weights: the narrow
                                  # tiles (14 columns) chunk it instead, AVX2's 4 x 2 (0.89x
                                  # the time of rows outer) and AVX-512's 2 x 7 (0.63x)
    (256, 512, 56, 2, None),      # rows outer on AVX2; AVX-512 chunks it (deep tile)
    (1024, 2048, 14, 2, False),   # 8 MiB of weights: re-read per row would cost more
    (512, 1024, 14, 1, False),    # stride 1: every input column is used
    (116, 116, 14, 1, True),      # ShuffleNetV2's branch: 56-59 KiB of weights, any stride
    (64, 16, 55, 1, True)])       # SqueezeNet's squeeze layer
def test_strided_1x1_runs_rows_outer(tmp_path, mcpu, c, k, h, stride, rows_outer):
    """A strided 1x1 convolution with at most 2 MiB of weights, and any 1x1 convolution
    with at most 64 KiB, runs its tasks row by row: the parallel loop fuses batch, output
    rows and channel blocks in that order (TVM names a fused loop after its parts), so a
    row's input is read once for every channel block; the output matches onnxruntime (on
    either ISA where the host runs it)."""
    rng = np.random.default_rng(0)
    inits = {"W": (rng.standard_normal((k, c, 1, 1)) * 0.05).astype(np.float32)}
    m = make_model([helper.make_node("Conv", ["x", "W"], ["y"], strides=[stride] * 2)],
                   [("x", [1, c, h, h])], [("y", [1, k, h // stride, h // stride])], inits)
    name = "edgec_conv2d_packed_update"
    (_, loops), = _scheduled_updates(m, [name], {"mcpu": mcpu},
                                     loop=lambda sch, lp: sch.get(lp).loop_var.name)[name]
    if rows_outer is None:
        rows_outer = mcpu == "haswell"
    assert loops[0].startswith("n_y_o" if rows_outer else "n_o"), loops
    if rows_outer and (mcpu == "haswell" or host_has("avx512f")):
        _compile_and_compare(m, tmp_path, target_options={"mcpu": mcpu})


@pytest.mark.parametrize("mcpu", ["haswell", "host"])
@pytest.mark.parametrize("c,k,stride,w,epi", [
    (512, 64, 1, 28, "relu"), (320, 128, 2, 59, "relu6"), (256, 72, 1, 30, "none")])
def test_deep_1x1_conv(tmp_path, mcpu, c, k, stride, w, epi):
    """The deep 1x1 tile (on an AVX-512 host; the default tile under haswell) against
    onnxruntime: a 28-wide map (7-column tiles), a stride-2 map of 30 columns (6-column
    tiles), 72 channels (4.5 vectors: a zero-padded block)."""
    opts = {} if mcpu == "host" else {"mcpu": mcpu}
    h = 5
    rng = np.random.default_rng(c + k)
    inits = {"W": (rng.standard_normal((k, c, 1, 1)) * 0.05).astype(np.float32),
             "B": rng.standard_normal(k).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], strides=[stride] * 2)]
    oh, ow = _out(h, 1, stride, 1, 0, 0), _out(w, 1, stride, 1, 0, 0)
    last = _epilogue(epi, "y", nodes, inits, "x", [1, c, h, w], [1, k, oh, ow])
    m = make_model(nodes, [("x", [1, c, h, w])], [(last, [1, k, oh, ow])], inits)
    out = tmp_path / "art"
    report = compile_to(m, out, target_options=opts)
    assert report["kernels"]["counts"] == {"conv2d-packed": 1}, report["kernels"]
    assert report["kernels"]["unscheduled"] == {}
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(out).run(None, {"x": x})[0], ref, rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("c,h,w,k,s,p,d,ceil,dtype", [
    (8, 13, 17, 3, 2, 1, 1, 0, "float32"), (5, 9, 11, 2, 2, 0, 1, 0, "float32"),
    (6, 10, 12, 3, 1, 1, 1, 0, "float32"), (4, 15, 14, 3, 2, 1, 2, 0, "float32"),
    (16, 20, 20, 3, 2, 1, 1, 0, "uint8"), (4, 11, 11, 3, 2, 1, 1, 1, "float32"),
    (6, 55, 55, 3, 2, 0, 1, 1, "float32"), (3, 12, 10, 2, 2, 0, 1, 1, "float32"),
    (5, 14, 13, 3, 3, 1, 1, 1, "uint8"), (4, 16, 17, 3, 2, 1, 2, 1, "float32")])
def test_max_pool(tmp_path, c, h, w, k, s, p, d, ceil, dtype):
    """MaxPool through the depthwise row kernel (max over the taps, padding never wins),
    float and uint8, floor and ceil mode (the last windows read extra padding)."""
    ext = (k - 1) * d + 1
    out = [(-(-(n + 2 * p - ext) // s) if ceil else (n + 2 * p - ext) // s) + 1 for n in (h, w)]
    m = make_model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k],
                                     strides=[s, s], pads=[p] * 4, dilations=[d, d],
                                     ceil_mode=ceil)],
                   [("x", [2, c, h, w])], [("y", [2, c, *out])], opset=13)
    if dtype == "uint8":
        for v in (m.graph.input[0], m.graph.output[0]):
            v.type.tensor_type.elem_type = 2  # UINT8
    report = compile_to(m, tmp_path / "mp")
    assert report["kernels"]["unscheduled"] == {}
    assert report["kernels"]["counts"] == {"maxpool2d": 1}, report["kernels"]
    rng = np.random.default_rng(c)
    x = (rng.integers(0, 256, (2, c, h, w)) if dtype == "uint8"
         else rng.standard_normal((2, c, h, w))).astype(dtype)
    np.testing.assert_array_equal(Session(tmp_path / "mp").run(None, {"x": x})[0],
                                  OrtSession(m).run(None, {"x": x})[0])


@pytest.mark.parametrize("op,c,h,w,expect", [
    ("GlobalAveragePool", 24, 16, 16, "reduce"), ("ReduceMean23", 12, 8, 12, "reduce"),
    ("ReduceMax3", 6, 5, 64, "reduce"), ("ReduceSum1", 8, 10, 12, "generic"),
    ("GlobalAveragePool", 5, 7, 7, "reduce"), ("GlobalAveragePool", 40, 14, 14, "reduce"),
    ("GlobalAveragePool", 9, 3, 3, "generic")])
def test_reductions(tmp_path, op, c, h, w, expect):
    """Reductions over trailing axes (SE blocks' global pools) are split into vector lanes
    (a last partial vector predicated: 14 x 14 = 196 = 12 x 16 + 4) and run in parallel;
    others, and those shorter than two vectors (3 x 3), keep the generic
    schedule. Both match onnxruntime."""
    inits = {}
    if op == "GlobalAveragePool":
        node, out = helper.make_node(op, ["x"], ["y"]), [2, c, 1, 1]
    elif op == "ReduceMean23":
        node, out = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3]), [2, c, 1, 1]
    elif op == "ReduceMax3":
        node, out = helper.make_node("ReduceMax", ["x"], ["y"], axes=[3], keepdims=0), [2, c, h]
    else:
        inits["ax"] = np.array([1], np.int64)
        node, out = helper.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=0), [2, h, w]
    m = make_model([node], [("x", [2, c, h, w])], [("y", out)], inits, opset=13)
    report = _compile_and_compare(m, tmp_path)
    assert report["kernels"]["unscheduled"] == {}
    assert set(report["kernels"]["counts"]) == {expect}, report["kernels"]


@pytest.mark.parametrize("c,h,batch,rows", [(64, 56, 1, None), (64, 112, 1, None),
                                            (64, 224, 1, 14), (128, 112, 1, 14),
                                            (128, 112, 2, 14)])
def test_winograd_chunks(c, h, batch, rows):
    """Maps whose transformed tiles exceed WINO_CHUNK_BYTES (16 MiB) run in chunks of tile
    rows: F(4, 3) with c = k = 64 takes 1008 KiB of V and M per tile row at 224x224 (56
    rows: chunks of 14), c = k = 128 at 112x112 the same (28 rows); 64 at 112x112 (14 MiB in
    all) and 56x56 (3.6 MiB) run whole. A batch runs image by image, chunks within each."""
    import tvm
    from tvm import te

    from edgec.targets.cpu.kernels.winograd import (WINO_GEMM_BLOCK, WINO_OUT1_BLOCK,
                                                    _chunk_rows, winograd_te)

    x = te.placeholder((batch, c, h, h), name="x")
    u = te.placeholder((36, c // 16, c, 16), name="u")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, u, winograd_te(x, u, c, (1,) * 4, 4)]))
    assert _chunk_rows(sch, sch.get_sblock(WINO_GEMM_BLOCK), sch.get_sblock(WINO_OUT1_BLOCK)) \
        == rows


RESIZE_CASES = [  # input, output (h, w), mode, coordinate transform, nearest mode
    ((1, 21, 28, 28), (224, 224), "linear", "half_pixel", "floor"),
    ((2, 3, 7, 9), (20, 13), "linear", "align_corners", "floor"),
    ((1, 4, 10, 10), (5, 4), "linear", "pytorch_half_pixel", "floor"),
    ((1, 16, 9, 8), (18, 16), "linear", "asymmetric", "floor"),
    ((1, 9, 1, 6), (3, 1), "linear", "pytorch_half_pixel", "floor"),
    ((1, 4, 6, 5), (12, 10), "nearest", "asymmetric", "floor"),
    ((1, 4, 6, 5), (13, 11), "nearest", "half_pixel", "round_prefer_floor"),
    ((1, 12, 6, 5), (13, 11), "nearest", "align_corners", "round_prefer_ceil"),
    ((1, 4, 9, 8), (4, 3), "nearest", "asymmetric", "ceil")]


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
@pytest.mark.parametrize("shape,out,mode,coord,nearest", RESIZE_CASES)
def test_resize(tmp_path, mcpu, shape, out, mode, coord, nearest):
    """Resize by sizes (up, down, both, to one pixel) on the table-driven kernel, with a
    fused epilogue, against onnxruntime."""
    sizes = np.array([*shape[:2], *out], np.int64)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode,
                            coordinate_transformation_mode=coord, nearest_mode=nearest)
    m = make_model([node, helper.make_node("Relu", ["y"], ["z"])], [("x", list(shape))],
                   [("z", [*shape[:2], *out])], {"sizes": sizes}, opset=13)
    report = compile_to(m, tmp_path / "a", target_options={"mcpu": mcpu} if mcpu else {})
    assert report["kernels"]["counts"] == {"resize": 1}, report["kernels"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = OrtSession(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(Session(tmp_path / "a").run(None, {"x": x})[0], ref,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [11, 13])
def test_resize_by_scales(tmp_path, opset):
    """Integer scales (the FPN / U-Net upsample), given as scales with an empty roi."""
    roi = np.zeros(0, np.float32)
    scales = np.array([1, 1, 2, 3], np.float32)
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="linear")
    m = make_model([node], [("x", [1, 5, 6, 7])], [("y", [1, 5, 12, 21])],
                   {"roi": roi, "scales": scales}, opset=opset)
    report = compile_to(m, tmp_path / "a")
    assert report["kernels"]["counts"] == {"resize": 1}, report["kernels"]
    x = np.random.default_rng(1).standard_normal((1, 5, 6, 7)).astype(np.float32)
    np.testing.assert_allclose(Session(tmp_path / "a").run(None, {"x": x})[0],
                               OrtSession(m).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,coord,nearest,shape,scales", [
    ("nearest", "asymmetric", "round_prefer_ceil", [1, 3, 7, 5], [1, 1, 1.5, 1.3]),
    ("nearest", "half_pixel", "round_prefer_floor", [1, 2, 9, 9], [1, 1, 1.2, 0.7]),
    ("nearest", "tf_half_pixel_for_nn", "floor", [1, 2, 3, 4], [1, 1, 1.3, 2]),
    ("linear", "half_pixel", "", [1, 4, 7, 6], [1, 1, 1.5, 1.7]),
    ("linear", "pytorch_half_pixel", "", [1, 2, 10, 5], [1, 1, 0.75, 1]),
    ("linear", "asymmetric", "", [1, 2, 5, 8], [1, 1, 2.5, 1.1])])
def test_resize_at_a_scale_the_size_does_not_keep(tmp_path, mode, coord, nearest, shape, scales):
    """7 rows at scale 1.5 give 10, and 10 / 7 != 1.5: onnxruntime samples at x / 1.5, TVM's
    importer turned the scales into sizes (x * 7 / 10, another row for most outputs). Such
    a Resize is lowered to gathers at onnxruntime's coordinates; 2x-style scales keep the
    kernel (``test_resize_by_scales``)."""
    attrs = {"nearest_mode": nearest} if nearest else {}
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode,
                            coordinate_transformation_mode=coord, **attrs)
    out = [int(np.floor(np.float32(n) * np.float32(s))) for n, s in zip(shape, scales)]
    m = make_model([node], [("x", shape)], [("y", out)],
                   {"scales": np.array(scales, np.float32)}, opset=13)
    report = compile_to(m, tmp_path / "a")
    assert "resize" not in report["kernels"]["counts"], report["kernels"]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(Session(tmp_path / "a").run(None, {"x": x})[0],
                               OrtSession(m).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_resize_coordinates_match_onnxruntime():
    """The kernel's index tables against onnxruntime's nearest Resize (sizes input) over
    every small upsample and downsample, mode and rounding: float32 rounding of the
    coordinate decides ties (10 -> 12 asymmetric puts output 9 at 7.5; dividing by the
    scale gave 7.4999995 and picked pixel 7)."""
    from edgec.core.resize_coords import nearest_index
    bad = []
    for coord in ["asymmetric", "half_pixel", "tf_half_pixel_for_nn", "pytorch_half_pixel",
                  "align_corners"]:
        for nm in ["round_prefer_ceil", "round_prefer_floor", "floor", "ceil"]:
            for size in range(1, 11):
                # one model per (mode, rounding, size): outputs 1..24 side by side as rows
                outs = list(range(1, 25))
                nodes, outputs = [], []
                for o in outs:
                    nodes.append(helper.make_node(
                        "Resize", ["x", "", "", f"s{o}"], [f"y{o}"], mode="nearest",
                        coordinate_transformation_mode=coord, nearest_mode=nm))
                    outputs.append((f"y{o}", [1, 1, 1, o]))
                m = make_model(nodes, [("x", [1, 1, 1, size])], outputs,
                               {f"s{o}": np.array([1, 1, 1, o], np.int64) for o in outs},
                               opset=13)
                got = OrtSession(m).run(None, {"x": np.arange(size, dtype=np.float32)
                                               .reshape(1, 1, 1, size)})
                for o, y in zip(outs, got):
                    if not (nearest_index(size, o, coord, nm) == y.ravel()).all():
                        bad.append((coord, nm, size, o))
    assert not bad, bad[:10]


@given(c=st.integers(1, 10), h=st.integers(1, 12), w=st.integers(1, 12),
       oh=st.integers(1, 30), ow=st.integers(1, 30), mode=st.sampled_from(["linear", "nearest"]),
       coord=st.sampled_from(["half_pixel", "align_corners", "asymmetric",
                              "pytorch_half_pixel", "tf_half_pixel_for_nn"]),
       nearest=st.sampled_from(["floor", "ceil", "round_prefer_floor", "round_prefer_ceil"]))
@example(c=1, h=1, w=10, oh=1, ow=12, mode="nearest", coord="asymmetric",
         nearest="round_prefer_ceil")  # output 9 at exactly 7.5
@example(c=2, h=3, w=7, oh=3, ow=2, mode="nearest", coord="asymmetric",
         nearest="round_prefer_ceil")  # 7 -> 2: output 1 at exactly 3.5
@example(c=1, h=3, w=4, oh=3, ow=6, mode="nearest", coord="tf_half_pixel_for_nn",
         nearest="round_prefer_ceil")  # rows unchanged: onnxruntime copies them
@SETTINGS
def test_resize_shapes(tmp_path_factory, c, h, w, oh, ow, mode, coord, nearest):
    sizes = np.array([1, c, oh, ow], np.int64)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode,
                            coordinate_transformation_mode=coord, nearest_mode=nearest)
    m = make_model([node], [("x", [1, c, h, w])], [("y", [1, c, oh, ow])], {"sizes": sizes},
                   opset=13)
    report = _compile_and_compare(m, tmp_path_factory.mktemp("rs"))
    assert report["kernels"]["counts"] == {"resize": 1}, report["kernels"]


@given(m_=st.integers(1, 9), k_=st.integers(1, 70), n_=st.integers(1, 90),
       trans_b=st.integers(0, 1), bias=st.booleans())
@SETTINGS
def test_gemm_shapes(tmp_path_factory, m_, k_, n_, trans_b, bias):
    rng = np.random.default_rng(m_ * 1000 + k_)
    inits = {"B": rng.standard_normal((n_, k_) if trans_b else (k_, n_)).astype(np.float32)}
    if bias:
        inits["C"] = rng.standard_normal(n_).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "B", *(["C"] if bias else [])], ["y"],
                            transB=trans_b)
    m = make_model([node], [("x", [m_, k_])], [("y", [m_, n_])], inits)
    report = _compile_and_compare(m, tmp_path_factory.mktemp("gemm"))
    assert report["kernels"]["counts"] == {"dense-packed": 1}, report["kernels"]


@pytest.mark.parametrize("mcpu", [None, "haswell"], ids=["host", "avx2"])
@pytest.mark.parametrize("chans,hw,axis,epi", [
    ([64, 64], (55, 55), 1, "relu"), ([64, 32, 32, 32, 32, 32, 32], (7, 7), 1, "bnrelu"),
    ([3, 5], (4, 6), 1, "none"), ([16, 16, 8], (13, 13), 1, "bnrelu"), ([8, 8], (9, 5), 2, "relu")])
def test_concat(tmp_path, mcpu, chans, hw, axis, epi):
    """Concat (fire modules, DenseNet's growing feature stacks) with the epilogue fused
    after it (DenseNet's pre-activation BN-ReLU), one input at a time."""
    rng = np.random.default_rng(len(chans))
    h, w = hw
    shapes = [[1, c, h, w] if axis == 1 else [1, 4, c, w] for c in chans]
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    names = [f"x{i}" for i in range(len(chans))]
    nodes = [helper.make_node("Concat", names, ["c"], axis=axis)]
    inits = {}
    last = "c"
    if epi == "bnrelu":
        k = out[1]
        inits = {"s": rng.uniform(0.5, 2, k).astype(np.float32),
                 "b": rng.standard_normal(k).astype(np.float32),
                 "m": rng.standard_normal(k).astype(np.float32),
                 "v": rng.uniform(0.5, 2, k).astype(np.float32)}
        nodes.append(helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]))
        last = "n"
    if epi in ("relu", "bnrelu"):
        nodes.append(helper.make_node("Relu", [last], ["y"]))
        last = "y"
    m = make_model(nodes, list(zip(names, shapes)), [(last, out)], inits, opset=13)
    report = compile_to(m, tmp_path / "a", target_options={"mcpu": mcpu} if mcpu else {})
    assert report["kernels"]["counts"] == {"concat": 1}, report["kernels"]
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}
    ref = OrtSession(m).run(None, feeds)[0]
    np.testing.assert_allclose(Session(tmp_path / "a").run(None, feeds)[0], ref, rtol=1e-5,
                               atol=1e-5)
