"""Tensor intrinsics of the integer dot products (:class:`~edgec.targets.cpu.isa.DotISA`), from
one builder (:func:`_register`): channels in the lanes (:func:`register_intrin`), pixels in
the lanes (:func:`register_px_intrin`), and int16 channel pairs for the Winograd products
(:func:`register_pair_intrin`); each registered once per process.

Every one computes ``C[l] += sum_d a(l, d) * b(l, d)`` over ``L`` int32 lanes and ``D``
products per lane (the description), with one LLVM instruction (or two: ``vpmaddubsw`` then
``vpmaddwd`` by ones) on whole vectors (the implementation)."""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from ..isa import ISAS, DotISA

_REGISTERED: set[str] = set()


def _register(name: str, lanes: int, depth: int, a, b, a_elem, b_elem, value, word=None):
    """Register ``name``: ``a``, ``b`` = ``(shape, dtype, region(buf))`` of the operands;
    ``a_elem(A, l, d)`` and ``b_elem(B, l, d)`` the description's products;
    ``value(A, B, C, a32)`` the implementation's new ``C``, where ``a32`` is ``word(A)``
    bound once (None: no binding)."""
    L, D = lanes, depth
    (a_shape, a_dt, a_reg), (b_shape, b_dt, b_reg) = a, b
    i32 = "int32"  # (names, not literals, in the TVMScript annotations)

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer(a_shape, a_dt, offset_factor=1),
             B: T.Buffer(b_shape, b_dt, offset_factor=1),
             C: T.Buffer((L,), i32, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], a_reg(A), b_reg(B))
            T.writes(C[0:L])
            for i in T.serial(0, L):
                for k in T.serial(0, D):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.Cast("int32", a_elem(A, vi, vk)) * \
                            T.Cast("int32", b_elem(B, vi, vk))

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer(a_shape, a_dt, offset_factor=1),
             B: T.Buffer(b_shape, b_dt, offset_factor=1),
             C: T.Buffer((L,), i32, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], a_reg(A), b_reg(B))
            T.writes(C[0:L])
            a32 = word(A) if word is not None else T.meta_var(None)  # (a let only with word)
            C[T.ramp(T.int32(0), 1, L)] = value(A, B, C, a32)

    TensorIntrin.register(name, desc, impl, override=True)
    _REGISTERED.add(name)
    return name


def _instruction(isa: DotISA, acc: str):
    """``(C, a, b) -> C + a . b`` on vectors with the ISA's instruction(s)."""
    L = isa.lanes

    def call(name, *args, dtype):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), *args, dtype=dtype)

    if isa.widen:  # vpmaddubsw (u8 x s7 -> s16 pair sums, exact) + vpmaddwd by ones
        ones = T.broadcast(T.int16(1), L * 2)
        return lambda c, a, b: c + call(isa.widen, call(isa.llvm, a, b, dtype=f"int16x{L * 2}"),
                                        ones, dtype=acc)
    if isa.accumulates:  # vpdpbusd / sdot: acc += 4-products sums
        return lambda c, a, b: call(isa.llvm, c, a, b, dtype=acc)
    return lambda c, a, b: c + call(isa.llvm, a, b, dtype=acc)  # vpmaddwd: then added to C


def _unpack(bits: int, a_dtype: str):
    """The ``d``-th value of ``a_dtype`` packed in a 32-bit word."""
    mask = (1 << bits) - 1
    return lambda word, d: T.Cast(a_dtype, T.bitwise_and(
        T.shift_right(word, T.Cast("uint32", d * bits)), T.uint32(mask)))


def register_intrin(isa: DotISA) -> str | None:
    """Channels in the lanes: ``A`` one 32-bit word of ``D`` activations (broadcast), ``B``
    the ``L x D`` weights; its name, or None for plain vector code."""
    if isa.llvm is None:
        return None
    name = isa.intrin_name
    if name in _REGISTERED:
        return name
    L, D, bt = isa.lanes, isa.depth, isa.b_dtype
    a_wide, b_vec, acc = f"{isa.a_dtype}x{L * D}", f"{bt}x{L * D}", f"int32x{L}"
    unpack, op = _unpack(32 // D, isa.a_dtype), _instruction(isa, acc)
    return _register(
        name, L, D, ((1,), "uint32", lambda A: A[0:1]), ((L, D), bt, lambda B: B[0:L, 0:D]),
        lambda A, i, k: unpack(A[0], k), lambda B, i, k: B[i, k],
        lambda A, B, C, a32: op(C.vload([0], dtype=acc),
                                T.reinterpret(T.broadcast(a32, L), dtype=a_wide),
                                B.vload([0, 0], dtype=b_vec)),
        word=lambda A: T.reinterpret(A[0], dtype="int32"))


def register_px_intrin(isa: DotISA) -> str | None:
    """The same instruction turned around for the pixel kernel: the lanes are ``L`` pixels
    (one vector load of ``L`` packed words) and the ``D`` weights of one output channel are
    broadcast from one 32-bit word."""
    if isa.llvm is None:
        return None
    name = isa.intrin_name + "_px"
    if name in _REGISTERED:
        return name
    L, D, bt = isa.lanes, isa.depth, isa.b_dtype
    a_wide, b_vec, acc = f"{isa.a_dtype}x{L * D}", f"{bt}x{L * D}", f"int32x{L}"
    unpack, op = _unpack(32 // D, isa.a_dtype), _instruction(isa, acc)
    return _register(
        name, L, D, ((L,), "uint32", lambda A: A[0:L]), ((D,), bt, lambda B: B[0:D]),
        lambda A, i, k: unpack(A[i], k), lambda B, i, k: B[k],
        lambda A, B, C, _: op(
            C.vload([0], dtype=acc),
            T.reinterpret(A.vload([0], dtype=f"uint32x{L}"), dtype=a_wide),
            T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], dtype=f"{bt}x{D}"),
                                                    dtype="int32"), L), dtype=b_vec)))


def register_pair_intrin(isa: DotISA) -> str:
    """``C[l] += sum_d A[d] * B[l, d]`` for two int16 ``A`` (one 32-bit word, broadcast) and
    ``L x 2`` int16 ``B``: ``vpmaddwd`` plus an add."""
    s16 = ISAS[isa.name.removesuffix("-s7")]
    name = s16.intrin_name + "_wino"
    if name in _REGISTERED:
        return name
    L = s16.lanes
    acc, pair = f"int32x{L}", f"int16x{2 * L}"
    op = _instruction(s16, acc)
    return _register(
        name, L, 2, ((2,), "int16", lambda A: A[0:2]), ((L, 2), "int16", lambda B: B[0:L, 0:2]),
        lambda A, i, k: A[k], lambda B, i, k: B[i, k],
        lambda A, B, C, a32: op(C.vload([0], dtype=acc),
                                T.reinterpret(T.broadcast(a32, L), dtype=pair),
                                B.vload([0, 0], dtype=pair)),
        word=lambda A: T.reinterpret(A.vload([0], dtype="int16x2"), dtype="int32"))
