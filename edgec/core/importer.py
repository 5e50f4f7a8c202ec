"""Load and normalize an ONNX model as users export it.

Real exports are messy: weights held in ``Constant`` / ``ConstantOfShape`` nodes, initializers
also listed as graph inputs (opset < 9 exporters), external data files, dynamic batch dims,
shape sub-graphs (``Shape -> Gather -> Concat -> Reshape``), opsets from 7 upward.
:func:`load_model` reads a file without ever writing to it; :func:`normalize` returns a new,
static-shaped model at a canonical opset that every pass and the backend can rely on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from .errors import EdgecError, one_line
from .graph import attr, initializers, opset_of, value_shapes
from .resize_coords import COORD_MODES, linear_taps, nearest_index

# The opset every pass sees. Models below it are converted up (ops like Clip, Squeeze,
# ReduceSum and Split take their constants as inputs from 13 on); models above are kept.
CANONICAL_OPSET = 13
MAX_OPSET = 23


@dataclass
class ImportNotes:
    """What normalization changed, for the compile report."""

    source_opset: int = 0
    opset: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, msg: str) -> None:
        self.notes.append(msg)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (and its external data) without modifying it.

    Raises :class:`EdgecError` with one line for a missing file, a file that is not ONNX,
    a truncated protobuf, or external data outside the model's folder.
    """
    p = Path(path)
    if not p.exists():
        raise EdgecError(f"model file not found: {p}")
    if not p.is_file():
        raise EdgecError(f"model path is not a file: {p}")
    if p.stat().st_size > PROTOBUF_LIMIT:
        raise EdgecError(f"{p} is {p.stat().st_size / 2**30:.1f} GiB, over protobuf's 2 GiB "
                         "limit for one message: save it with its weights as external data "
                         "(onnx.save_model(m, path, save_as_external_data=True))")
    data = p.read_bytes()
    if not data:
        raise EdgecError(f"not an ONNX model (empty file): {p}")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as e:
        if "runcated" in str(e) or _looks_truncated(data):
            raise EdgecError(f"truncated or corrupt ONNX protobuf: {p} ({e})") from None
        raise EdgecError(f"not an ONNX model (protobuf parse failed): {p}") from None
    except Exception:  # noqa: BLE001 - protobuf raises several types
        raise EdgecError(f"not an ONNX model (protobuf parse failed): {p}") from None
    if model.ir_version == 0 or not model.HasField("graph") or (
            len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise EdgecError(f"not an ONNX model (no graph found): {p}")
    if model.ir_version > onnx.IR_VERSION:
        raise EdgecError(f"model ir_version {model.ir_version} is newer than the newest this "
                         f"onnx ({onnx.__version__}) knows ({onnx.IR_VERSION})")
    inline = model.ByteSize()
    _load_external_data(model, p.parent.resolve(), inline)
    _check_tensors(model)
    return model


# Protobuf cannot serialize (or parse) one message over 2 GiB; edgec holds the whole model,
# its weights inlined, in one ModelProto.
PROTOBUF_LIMIT = (1 << 31) - 1


def _check_tensors(model: onnx.ModelProto) -> None:
    """Every weight's data must be exactly what its dims and data type say (onnxruntime
    refuses the rest; TVM fails late on short data and silently takes long data)."""
    for t in external_data_helper._get_all_tensors(model):
        _check_tensor(t)


_PACKED4 = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
            if hasattr(onnx.TensorProto, n)}


def _check_tensor(t: onnx.TensorProto) -> None:
    name = _short(t.name)
    if any(d < 0 for d in t.dims):
        raise EdgecError(f"tensor '{name}' has a negative dim {list(t.dims)}")
    if t.data_type == onnx.TensorProto.UNDEFINED or \
            t.data_type not in onnx.TensorProto.DataType.values():
        raise EdgecError(f"tensor '{name}' has an unknown data type {t.data_type}")
    n = int(np.prod(t.dims, dtype=object)) if len(t.dims) else 1
    packed = t.data_type in _PACKED4
    if t.HasField("raw_data"):
        if t.data_type == onnx.TensorProto.STRING:
            raise EdgecError(f"tensor '{name}': string tensors cannot hold raw data")
        want = (n + 1) // 2 if packed else n * _itemsize(t.data_type)
        got, unit = len(t.raw_data), "bytes"
    else:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
        got, unit = len(getattr(t, field)), "values"
        complex_ = t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
        want = (n + 1) // 2 if packed else n * (2 if complex_ else 1)
    if got != want:
        dtype = onnx.TensorProto.DataType.Name(t.data_type)
        raise EdgecError(f"tensor '{name}' holds {got} {unit} of data, its dims "
                         f"{list(t.dims)} of {dtype} need {want}")


def _looks_truncated(data: bytes) -> bool:
    # A model that starts like ONNX (field 1 = ir_version varint) but fails to parse.
    return len(data) > 2 and data[0] == 0x08


def _short(s: str, n: int = 80) -> str:
    s = s.encode("unicode_escape").decode("ascii")
    return s if len(s) <= n else s[:n] + f"...({len(s)} chars)"


def _external_int(tensor: onnx.TensorProto, info: dict, key: str) -> int | None:
    v = info.get(key)
    if v is None:
        return None
    if not re.fullmatch(r"[0-9]{1,19}", v.strip()):
        raise EdgecError(f"external data of tensor '{_short(tensor.name)}' has a bad {key} "
                         f"'{_short(v, 30)}' (must be a non-negative integer)")
    return int(v)


def _load_external_data(model: onnx.ModelProto, base: Path, inline: int = 0) -> None:
    todo = []
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        name = _short(tensor.name)
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        if not loc or "\0" in loc or len(loc) > 1024 or os.path.isabs(loc):
            raise EdgecError(f"external data of tensor '{name}' has an absolute, empty or "
                             f"invalid path '{_short(loc)}': refused (must lie inside the "
                             "model's folder)")
        try:
            target = (base / loc).resolve()
        except (OSError, ValueError) as e:
            raise EdgecError(f"external data of tensor '{name}': bad path '{_short(loc)}' "
                             f"({e})") from None
        if base != target and base not in target.parents:
            raise EdgecError(f"external data of tensor '{name}' points outside the model's "
                             f"folder ('{_short(loc)}'): refused")
        try:
            is_file = target.is_file()
        except OSError:
            is_file = False
        if not is_file:
            raise EdgecError(f"external data file of tensor '{name}' not found: "
                             f"{_short(str(target), 200)}")
        _check_tensor_dims(tensor)
        offset = _external_int(tensor, info, "offset") or 0
        length = _external_int(tensor, info, "length")
        expected = _nbytes(tensor)
        if length is not None and length != expected:
            raise EdgecError(f"external data of tensor '{name}' has length {length}, its dims "
                             f"{list(tensor.dims)} need {expected} bytes")
        todo.append((tensor, target, offset, length, expected, loc))
    total = inline + sum(t[4] for t in todo)
    if total > PROTOBUF_LIMIT:
        raise EdgecError(f"the model with its weights is {total / 2**30:.1f} GiB, over protobuf's "
                         "2 GiB limit for one message: edgec holds the whole model in one "
                         "protobuf and cannot compile it (smaller weights, e.g. exported in "
                         "fp16, are the way under the limit)")
    for tensor, target, offset, length, expected, loc in todo:
        with open(target, "rb") as f:
            f.seek(offset)
            raw = f.read(length if length is not None else expected + 1)
        if len(raw) != expected:
            what = "truncated" if len(raw) < expected else "longer than its dims"
            raise EdgecError(f"external data of tensor '{_short(tensor.name)}' is {what} "
                             f"({len(raw) if len(raw) <= expected else f'more than {expected}'}"
                             f" bytes from offset {offset} of {_short(loc)}, its dims "
                             f"{list(tensor.dims)} need {expected})")
        tensor.raw_data = raw
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _check_tensor_dims(t: onnx.TensorProto) -> None:
    if any(d < 0 for d in t.dims):
        raise EdgecError(f"tensor '{_short(t.name)}' has a negative dim {list(t.dims)}")
    if t.data_type == onnx.TensorProto.UNDEFINED or \
            t.data_type not in onnx.TensorProto.DataType.values() or \
            t.data_type == onnx.TensorProto.STRING:
        raise EdgecError(f"tensor '{_short(t.name)}' has an unknown or unsupported data type "
                         f"{t.data_type} for raw data")


def _nbytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims, dtype=object)) if len(t.dims) else 1
    return (n + 1) // 2 if t.data_type in _PACKED4 else n * _itemsize(t.data_type)


def _itemsize(data_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except Exception:  # noqa: BLE001
        return 0


MAX_DIM = (1 << 31) - 1
MAX_ELEMENTS = 1 << 34
_SHAPE_RE = re.compile(r"^\s*([^=]+?)\s*=\s*(\d+(?:\s*[x,]\s*\d+)*)\s*$")


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` (or ``NAME=1,3,224,224``) options."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        m = _SHAPE_RE.match(spec)
        if not m:
            raise EdgecError(f"bad --input-shape '{spec}': expected NAME=1x3x224x224")
        dims = tuple(int(d) for d in re.split(r"\s*[x,]\s*", m.group(2)))
        if any(d <= 0 for d in dims):
            raise EdgecError(f"bad --input-shape '{spec}': dimensions must be positive")
        if any(d > MAX_DIM for d in dims) or int(np.prod(dims, dtype=object)) > MAX_ELEMENTS:
            raise EdgecError(f"bad --input-shape '{_short(spec)}': too large (at most {MAX_DIM} "
                             f"per dim and {MAX_ELEMENTS} elements)")
        if m.group(1) in out:
            raise EdgecError(f"--input-shape given twice for '{m.group(1)}'")
        out[m.group(1)] = dims
    return out


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def normalize(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
              ) -> tuple[onnx.ModelProto, ImportNotes]:
    """Return a normalized copy: canonical opset, weights as initializers, no initializer
    listed as an input, static input shapes, inferred shapes, no dead nodes."""
    notes = ImportNotes()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    notes.source_opset = opset_of(m)
    for imp in m.opset_import:
        if imp.domain not in ("", "ai.onnx", "ai.onnx.ml"):
            raise EdgecError(f"unsupported operator domain '{imp.domain}' (custom ops cannot be "
                             "compiled)")
    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise EdgecError(f"unsupported op '{node.domain}::{node.op_type}' at node "
                             f"'{node.name}' (custom domain)")

    if m.ir_version < 4:
        # IR < 4 requires every initializer to be a graph input; we drop those inputs.
        m.ir_version = 4
    shape_conflict = check_model(m, notes)
    _drop_initializer_inputs(m, notes)
    name_nodes(m)
    _constants_to_initializers(m, notes)
    _drop_empty_concat_inputs(m, notes)
    if notes.source_opset < 7:
        _prelu_slope_per_channel(m)
    m = _convert_opset(m, notes)
    m.ir_version = max(m.ir_version,
                       onnx.helper.find_min_ir_version_for(list(m.opset_import), True))
    _fix_input_shapes(m, input_shapes or {}, notes)
    m = _infer_shapes(m)
    if _resize_at_given_scale(m, notes):
        _clear_value_shapes(m)  # inferred from the Resizes as they were
        m = _infer_shapes(m)
    if shape_conflict:
        check_model(m)  # consistent now, or refused with onnx's words
    notes.opset = opset_of(m)
    return m, notes


def _resize_at_given_scale(m: onnx.ModelProto, notes: ImportNotes) -> bool:
    """A 4-D nearest or linear Resize by a constant ``scales`` input that its output size
    does not keep (7 pixels at 1.5 give 10, and 10 / 7 != 1.5) becomes gathers along H and
    W at onnxruntime's coordinates, ``x / scale``: TVM's importer turns scales into sizes
    and samples at ``x * 7 / 10``, another pixel for most outputs. Where the ratios agree
    (every export at 2x, or sizes given) the Resize stays for the resize kernel::

        nearest:  Y = Gather(Gather(X, iy, axis=2), ix, axis=3)
        linear:   T = Gather(X, y0, 2) * (1 - ay) + Gather(X, y1, 2) * ay,  then along W
    """
    inits = initializers(m)
    shapes = value_shapes(m)
    f = np.float32
    nodes, changed = [], False
    for node in m.graph.node:
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        mode = attr(node, "mode", b"nearest").decode()
        coord = attr(node, "coordinate_transformation_mode", b"half_pixel").decode()
        ins = list(node.input) + [""] * 4
        x_shape = list(shapes.get(ins[0], ()))
        if (ins[2] not in inits or ins[3] or mode not in ("nearest", "linear")
                or coord not in COORD_MODES or attr(node, "antialias", 0)
                or attr(node, "axes") is not None or len(x_shape) != 4 or not all(x_shape)):
            nodes.append(node)
            continue
        scales = numpy_helper.to_array(inits[ins[2]]).astype(f).ravel()
        if scales.size != 4 or scales[0] != 1 or scales[1] != 1 or not (scales > 0).all():
            nodes.append(node)
            continue
        out = [int(np.floor(f(n) * s)) for n, s in zip(x_shape, scales)]
        if out == x_shape or min(out) < 1:
            nodes.append(node)  # onnxruntime copies
            continue
        if all(f(o) / f(n) == s for n, o, s in zip(x_shape[2:], out[2:], scales[2:])):
            if out != [int(np.floor(n * float(s))) for n, s in zip(x_shape, scales)]:
                # onnx's inference rounds the product in float64: sizes say the same
                # for onnxruntime and onnx's inference agrees with them
                sizes = f"{node.name}/sizes"
                m.graph.initializer.append(numpy_helper.from_array(
                    np.array(out, np.int64), sizes))
                node.input[:] = [ins[0], ins[1], "", sizes]
                changed = True
                notes.add(f"Resize '{node.name}': scales {scales[2:].tolist()} give "
                          f"{out[2:]} in float32 (onnxruntime) and fewer in float64 (onnx's "
                          "inference): given as sizes")
            nodes.append(node)  # the sizes say the same
            continue
        rounding = attr(node, "nearest_mode", b"round_prefer_floor").decode()
        cur = ins[0]
        for axis in (2, 3):
            size, n_out, s = x_shape[axis], out[axis], float(scales[axis])
            if s == 1:
                continue
            tag = f"{node.name}/at_scale/{'hw'[axis - 2]}"
            last = axis == 3 or scales[3] == 1
            dst = node.output[0] if last else f"{tag}/out"

            def const(name, arr):
                m.graph.initializer.append(numpy_helper.from_array(arr, name))
                return name

            def gather(idx, name, out, src=cur, ax=axis):
                nodes.append(onnx.helper.make_node(
                    "Gather", [src, const(f"{name}/idx", idx.astype(np.int64))], [out],
                    axis=ax, name=name))
                return out

            if mode == "nearest":
                gather(nearest_index(size, n_out, coord, rounding, s), f"{tag}/gather", dst)
            else:
                i0, i1, w = linear_taps(size, n_out, coord, s)
                shape = [n_out, 1] if axis == 2 else [n_out]
                g0 = gather(i0, f"{tag}/g0", f"{tag}/g0")
                g1 = gather(i1, f"{tag}/g1", f"{tag}/g1")
                w1 = const(f"{tag}/w1", w.reshape(shape))
                w0 = const(f"{tag}/w0", (f(1) - w).astype(f).reshape(shape))
                nodes += [onnx.helper.make_node("Mul", [g0, w0], [f"{tag}/p0"],
                                                name=f"{tag}/p0"),
                          onnx.helper.make_node("Mul", [g1, w1], [f"{tag}/p1"],
                                                name=f"{tag}/p1"),
                          onnx.helper.make_node("Add", [f"{tag}/p0", f"{tag}/p1"], [dst],
                                                name=f"{tag}/sum")]
            cur = dst
        changed = True
        notes.add(f"Resize '{node.name}': scales {scales[2:].tolist()} do not keep the "
                  f"ratio of its output {out[2:]} to {x_shape[2:]}: lowered to gathers at "
                  "onnxruntime's coordinates (x / scale)")
    if changed:
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    return changed


# What onnx's strict inference says where a model's declared shape and the inferred one
# differ; a Resize by scales can be the cause (below)
SHAPE_CONFLICT = "Inferred shape and existing shape differ"


def check_model(m: onnx.ModelProto, notes: ImportNotes | None = None) -> bool:
    """ONNX's full checker (with strict shape inference), as onnxruntime applies it: duplicate
    output names, dangling inputs, bad opsets or attributes are refused, naming the rule.

    With ``notes``, a declared shape that onnx's inference contradicts is let through with
    a note (the structural checks still run): onnx computes a Resize's output size from
    its scales in float64, onnxruntime (and PyTorch's exporter, and TVM) in float32, so
    ``interpolate(scale_factor=0.7)`` on 10 pixels declares 7 where onnx infers 6;
    :func:`_resize_at_given_scale` rewrites such a Resize to sizes and the shapes are
    inferred again. Returns whether such a conflict was let through."""
    if opset_of(m) < 1:
        raise EdgecError(f"invalid ONNX model: default-domain opset {opset_of(m)}")
    if any(o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")
           for o in m.graph.output):
        # the checker wants a shape field on outputs; exporters (and onnxruntime) do without
        try:
            m = onnx.shape_inference.infer_shapes(m)
        except Exception:  # noqa: BLE001 - the checker below says what is wrong
            pass
        for o in m.graph.output:
            if o.type.HasField("tensor_type"):
                o.type.tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(m, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        msg = next((ln for ln in str(e).splitlines() if ln.strip()
                    and not ln.strip().startswith("==>")), e)  # the checker's own words
        if notes is not None and SHAPE_CONFLICT in str(e) and any(
                n.op_type == "Resize" for n in m.graph.node):
            bare = onnx.ModelProto()
            bare.CopyFrom(m)
            _clear_value_shapes(bare)
            check_model(bare)
            notes.add(f"declared shapes differ from onnx's inference ({one_line(msg, 300)}); "
                      "inferred again after import")
            return True
        raise EdgecError(f"invalid ONNX model: {one_line(msg)}") from None
    except ValueError as e:  # over 2 GiB, or protobuf's own refusals
        raise EdgecError(f"invalid ONNX model: {one_line(e)}") from None
    return False


def _clear_value_shapes(m: onnx.ModelProto) -> None:
    """Drop the shapes of intermediate values and outputs (stale, or to be inferred again)."""
    del m.graph.value_info[:]
    for o in m.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")


def _drop_initializer_inputs(m: onnx.ModelProto, notes: ImportNotes) -> None:
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    dropped = len(m.graph.input) - len(keep)
    if dropped:
        del m.graph.input[:]
        m.graph.input.extend(keep)
        notes.add(f"{dropped} initializers were also listed as graph inputs: treated as constants")


def _constants_to_initializers(m: onnx.ModelProto, notes: ImportNotes) -> None:
    """``Constant`` nodes, and ``ConstantOfShape`` of a constant shape, become initializers."""
    inits = {t.name: t for t in m.graph.initializer}
    keep, moved = [], 0
    for node in m.graph.node:
        arr = None
        if node.op_type == "Constant" and len(node.attribute) == 1 and \
                node.attribute[0].name != "sparse_value":
            a = node.attribute[0]
            val = onnx.helper.get_attribute_value(a)
            if a.name == "value":
                arr = numpy_helper.to_array(val)
            elif a.name in ("value_float", "value_floats"):
                arr = np.asarray(val, dtype=np.float32)
            elif a.name in ("value_int", "value_ints"):
                arr = np.asarray(val, dtype=np.int64)
        elif node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
            value = next((numpy_helper.to_array(a.t) for a in node.attribute
                          if a.name == "value"), np.zeros(1, np.float32))
            if int(np.prod(shape)) <= (16 << 20):
                arr = np.full(tuple(shape), value.reshape(-1)[0], dtype=value.dtype)
        if arr is None:
            keep.append(node)
            continue
        t = numpy_helper.from_array(np.asarray(arr), node.output[0])
        m.graph.initializer.append(t)
        inits[t.name] = t
        moved += 1
    if moved:
        del m.graph.node[:]
        m.graph.node.extend(keep)
        notes.add(f"{moved} Constant/ConstantOfShape nodes turned into initializers")


def _drop_empty_concat_inputs(m: onnx.ModelProto, notes: ImportNotes) -> None:
    """Concat inputs that are constants with no elements contribute nothing; TVM cannot bind
    a zero-size constant into a loadable library, so they are dropped."""
    inits = {t.name: t for t in m.graph.initializer}
    dropped = 0
    for node in m.graph.node:
        if node.op_type != "Concat":
            continue
        keep = [i for i in node.input if not (i in inits and 0 in inits[i].dims)]
        if keep and len(keep) < len(node.input):
            dropped += len(node.input) - len(keep)
            del node.input[:]
            node.input.extend(keep)
    if dropped:
        notes.add(f"{dropped} empty constant Concat input(s) dropped")


def _prelu_slope_per_channel(m: onnx.ModelProto) -> None:
    """Before opset 7, a PRelu slope of shape [C] applied per channel (axis 1); from 7 on it
    broadcasts numpy-style (last axis). Make it [C, 1, ..., 1] before converting the opset."""
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001
        return
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             list(inferred.graph.input) + list(inferred.graph.value_info)
             + list(inferred.graph.output)}
    inits = {t.name: t for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type != "PRelu" or node.input[1] not in inits:
            continue
        rank = ranks.get(node.input[0], 0)
        t = inits[node.input[1]]
        a = numpy_helper.to_array(t)
        if rank > 2 and a.ndim == 1 and a.size > 1:
            t.CopyFrom(numpy_helper.from_array(a.reshape([a.size] + [1] * (rank - 2)), t.name))


def name_nodes(m: onnx.ModelProto) -> None:
    """Give every node a unique name, so reports and errors can point at it."""
    seen: set[str] = set()
    for i, node in enumerate(m.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _convert_opset(m: onnx.ModelProto, notes: ImportNotes) -> onnx.ModelProto:
    opset = opset_of(m)
    if opset > MAX_OPSET:
        raise EdgecError(f"model opset {opset} is newer than the newest supported ({MAX_OPSET})")
    if opset >= CANONICAL_OPSET:
        return m
    from onnx import version_converter

    try:
        # The converter needs the ir_version that goes with its opsets.
        converted = version_converter.convert_version(m, CANONICAL_OPSET)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter fails in many ways on old models
        notes.add(f"opset {opset} kept: conversion to {CANONICAL_OPSET} failed "
                  f"({one_line(e, 160)})")
        return m
    notes.add(f"opset converted {opset} -> {CANONICAL_OPSET}")
    return converted


def _fix_input_shapes(m: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                      notes: ImportNotes) -> None:
    inputs = {i.name: i for i in m.graph.input}
    for name in shapes:
        if name not in inputs:
            raise EdgecError(f"--input-shape names '{name}', which is not a model input "
                             f"(inputs: {', '.join(inputs) or 'none'})")
    changed = differs = False
    for name, vi in inputs.items():
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise EdgecError(f"input '{name}' is not a tensor (sequences/maps are unsupported)")
        dims = tt.shape.dim
        if name in shapes:
            want = shapes[name]
            if tt.HasField("shape") and len(dims) != len(want):
                raise EdgecError(f"--input-shape {name}: rank {len(want)} given, the model's "
                                 f"input has rank {len(dims)}")
            if not tt.HasField("shape") or [d.dim_value if d.HasField("dim_value") else None
                                            for d in dims] != list(want):
                differs = True
            for d, w in zip(dims, want):
                if d.HasField("dim_value") and d.dim_value not in (0, w):
                    notes.add(f"input '{name}': static dim {d.dim_value} overridden to {w}")
            del tt.shape.dim[:]
            for w in want:
                tt.shape.dim.add().dim_value = w
            changed = True
        else:
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in dims) and \
                    any(d.dim_value == 0 for d in dims):
                raise EdgecError(f"input '{name}' has a zero-size dim "
                                 f"[{'x'.join(str(d.dim_value) for d in dims)}]: give its real "
                                 f"shape with --input-shape {name}=...")
            if not tt.HasField("shape") or any(
                    not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
                shown = "x".join(str(d.dim_value) if d.HasField("dim_value") and d.dim_value
                                 else (d.dim_param or "?") for d in dims)
                raise EdgecError(f"input '{name}' has a dynamic shape [{shown}]: fix it with "
                                 f"--input-shape, e.g. --input-shape {name}=" +
                                 "x".join(str(d.dim_value) if d.HasField("dim_value") and
                                          d.dim_value else "1" for d in dims))
    if changed and not differs:
        pass  # only restated the shapes the model has: nothing is stale
    elif changed:
        _clear_value_shapes(m)  # inferred for the old input shape: stale now
        notes.add("input shapes fixed: " + ", ".join(
            f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items()))


def _infer_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    # A rank-0 output shape may be one this function made up for the checker earlier (below):
    # never keep it over what inference finds now (e.g. after constant folding).
    m = _clear_scalar_outputs(m)
    out = _infer_once(m)
    fixed: dict[str, list[int]] = {}
    for _ in range(sum(n.op_type in _POOLS for n in m.graph.node)):
        new = {k: v for k, v in _ceil_pool_shapes(out).items() if fixed.get(k) != v}
        if not new:
            break
        # onnx's inference of ceil_mode pools can declare one column more than onnxruntime
        # (and TVM) compute: take onnxruntime's rule and infer the rest from it
        fixed.update(new)
        elem = {v.name: v.type.tensor_type.elem_type for v in
                list(out.graph.value_info) + list(out.graph.output)}
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        del m2.graph.value_info[:]
        outputs = {o.name: o for o in m2.graph.output}
        for name, shape in fixed.items():
            vi = outputs.get(name)
            if vi is None:
                vi = m2.graph.value_info.add()
                vi.name = name
                vi.type.tensor_type.elem_type = elem.get(name) or onnx.TensorProto.FLOAT
            vi.type.tensor_type.ClearField("shape")
            for d in shape:
                vi.type.tensor_type.shape.dim.add().dim_value = d
        for o in m2.graph.output:
            if o.name not in fixed and o.type.HasField("tensor_type"):
                o.type.tensor_type.ClearField("shape")
        out = _infer_once(m2)
    for o in out.graph.output:  # the checker wants a (possibly unknown) shape on outputs
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.shape.SetInParent()
    return out


def _infer_once(m: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False,
                                                 data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise EdgecError(f"shape inference failed: {one_line(e, 200)}") from None


def _clear_scalar_outputs(m: onnx.ModelProto) -> onnx.ModelProto:
    if not any(o.type.HasField("tensor_type") and o.type.tensor_type.HasField("shape") and
               not o.type.tensor_type.shape.dim for o in m.graph.output):
        return m
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    for o in m2.graph.output:
        if o.type.HasField("tensor_type") and not o.type.tensor_type.shape.dim:
            o.type.tensor_type.ClearField("shape")
    return m2


_POOLS = ("MaxPool", "AveragePool", "LpPool")


def _ceil_pool_shapes(m: onnx.ModelProto) -> dict[str, list[int]]:
    """Output shapes of ceil_mode pools by onnxruntime's rule (a last window that would start
    in the end padding is dropped) where onnx's inference says otherwise."""
    from .graph import attr, value_shapes

    shapes = value_shapes(m)
    out = {}
    for node in m.graph.node:
        if node.op_type not in _POOLS or not attr(node, "ceil_mode", 0) or \
                attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not x or any(not isinstance(d, int) or d <= 0 for d in x):
            continue
        k = list(attr(node, "kernel_shape", []))
        nsp = len(k)
        if nsp != len(x) - 2:
            continue
        st = list(attr(node, "strides", [1] * nsp))
        dil = list(attr(node, "dilations", [1] * nsp))
        pads = list(attr(node, "pads", [0] * 2 * nsp))
        want = list(x[:2])
        for i in range(nsp):
            n, pb, pe = x[2 + i], pads[i], pads[nsp + i]
            o = -(-(n + pb + pe - dil[i] * (k[i] - 1) - 1) // st[i]) + 1
            if (o - 1) * st[i] >= n + pb:
                o -= 1
            want.append(o)
        if y is None or list(y) != want:
            out[node.output[0]] = want
    return out


def infer_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    """Re-infer every intermediate shape (after a rewrite), keeping inputs fixed."""
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    del m2.graph.value_info[:]
    return _infer_shapes(m2)


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int | None = None
                 ) -> dict[str, np.ndarray]:
    """Seeded inputs of the model's static shapes, for verification runs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        if batch is not None and shape:
            shape[0] = batch
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[vi.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds

