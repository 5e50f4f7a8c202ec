"""prune: remove output channels of Convs (sized by PCA, ranked by L1), safely across residuals, with least-squares reconstruction.

Algebra. Let a Conv produce channels ``y_k = W_k * x + b_k`` (k = 1..C) and let the channels in
a kept set ``S`` survive. Every reader of y only ever sees ``y_S``:

* the producer keeps ``W[S], b[S]``;
* a Conv reading y keeps input channels ``W'[:, S]``; a depthwise Conv keeps ``W'[S]``,
  ``b'[S]`` and ``group = |S|`` (its output is again indexed by S); BatchNormalization keeps
  its statistics at S; elementwise ops with a per-channel constant keep ``const[S]``;
  unary ops and pools pass S through;
* ``Flatten``/``Reshape`` of ``[N, C, H, W]`` to ``[N, C*H*W]`` followed by Gemm/MatMul keeps
  the weight rows ``{c*H*W + j : c in S, 0 <= j < H*W}``; Concat keeps S at each input's offset.

Channels tied together -- the operands of a residual Add/Sub/Mul/Max/Min/Div, the channels a
depthwise conv or BN passes through -- form one dependency group (union-find over producers,
as DepGraph does) that is pruned with one S or not at all. A group that reaches a graph output
or an op that is not channel-aware is left alone with the reason in the report.

How many: PCA of the group's output activations on ``--calib`` data keeps the fewest
components whose cumulative contribution reaches ``alpha`` (the seed's 99 %), or ``ratio``, or
the sigma rule (drop channels whose mean |w| < k * std(W)). Which: smallest filter L1 norm (the
seed's rule) or least activation energy.

Reconstruction (with calib): every reader Conv/Gemm of a pruned group is refitted by ridge
least squares, in graph order on the already-pruned model's activations, so that its output
matches the unpruned model's: ``W' = argmin ||X_S W'^T + b' - X W^T - b||`` (ThiNet/AIMET
style), no retraining.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.errors import EdgecError
from edgec.core.graph import (all_names, attr, initializers, set_provenance, unique_name,
                              value_shapes)

from . import PassContext, PassReport, Tolerance, copy_model, register_pass

PASS = "prune"
UNARY = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
         "Elu", "Selu", "Softplus", "Identity", "Dropout", "Neg", "Abs", "Mish", "Gelu",
         "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min"}


@dataclass(frozen=True)
class PruneConfig:
    alpha: float | None = 0.99        # PCA cumulative contribution kept (needs --calib)
    ratio: float | None = None        # fraction of channels removed per group (overrides alpha)
    sigma_k: float | None = None      # sigma rule: drop channels with mean|w| < k*std(W)
    rank_by: Literal["l1", "energy"] = "l1"
    reconstruct: bool = True          # least-squares refit of the readers (needs --calib)
    min_channels: int = 4             # never keep fewer channels in a group
    max_prune: float = 0.9            # never remove more than this fraction of a group
    round_to: int = 1                 # keep a multiple of this many channels (SIMD width)
    include: tuple[str, ...] = ()     # only groups with one of these producer nodes
    exclude: tuple[str, ...] = ()     # leave groups with one of these producer nodes alone
    calib_samples: int = 512          # calibration images used at most
    calib_rows: int = 4096            # im2col rows sampled per refitted reader
    ridge: float = 1e-7               # Tikhonov term, relative to the mean input energy

    def __post_init__(self):
        for k in ("alpha", "ratio", "max_prune"):
            v = getattr(self, k)
            if v is not None and not (0.0 <= v <= 1.0):
                raise ValueError(f"{k} must be within [0, 1], got {v}")
        if self.sigma_k is not None and self.sigma_k < 0:
            raise ValueError("sigma_k must be >= 0")
        if self.min_channels < 1 or self.round_to < 1 or self.calib_rows < 16:
            raise ValueError("min_channels >= 1, round_to >= 1 and calib_rows >= 16 required")

    def criterion(self) -> str:
        if self.ratio is not None:
            return "ratio"
        if self.sigma_k is not None:
            return "sigma_k"
        return "alpha"


# ----------------------------------------------------------------------------- the group graph

@dataclass
class Graph:
    """Channel maps: which (group, channel range) each channel of a tensor comes from."""
    maps: dict = field(default_factory=dict)     # tensor -> [(gid, lo, hi)]
    flat: dict = field(default_factory=dict)     # tensor -> ([(gid, lo, hi)], spatial size)
    sources: dict = field(default_factory=dict)  # gid -> Conv node producing it
    parent: dict = field(default_factory=dict)   # union-find
    frozen: dict = field(default_factory=dict)   # gid -> reason
    readers: list = field(default_factory=list)  # (kind, node, tensor) to slice

    def new(self, node, channels: int) -> list:
        gid = len(self.sources)
        self.sources[gid] = node
        self.parent[gid] = gid
        return [(gid, 0, channels)]

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def freeze(self, segs, reason: str) -> None:
        for gid, _, _ in segs:
            self.frozen.setdefault(gid, reason)


def _couple(g: Graph, a: list, b: list, op: str) -> bool:
    if len(a) == len(b) and all(x[1:] == y[1:] for x, y in zip(a, b)) and \
            all(x[1] == 0 for x in a):
        for x, y in zip(a, b):
            g.union(x[0], y[0])
        return True
    g.freeze(a + b, f"{op} joins tensors whose channels come from different concatenations")
    return False


def _channel_const(arr: np.ndarray, rank: int, channels: int) -> str:
    """How a constant operand broadcasts against [N, C, ...] of ``rank``: 'none' (no channel
    axis), 'slice' (one value per channel) or 'bad'."""
    if arr.ndim == 0 or arr.size == 1:
        return "none"
    if arr.ndim > rank:
        return "bad"
    axis = 1 - (rank - arr.ndim)  # the channel axis in the constant's own indexing
    if axis < 0:
        return "none" if all(d == 1 for d in arr.shape) else "bad"
    if arr.shape[axis] == 1:
        return "none"
    if arr.shape[axis] == channels and all(d == 1 for i, d in enumerate(arr.shape)
                                           if i > axis):
        return "slice"
    return "bad"


def build_groups(m: onnx.ModelProto, inits: dict, shapes: dict, config: PruneConfig) -> Graph:
    g = Graph()
    consts = {k: numpy_helper.to_array(v) for k, v in inits.items()}
    for node in m.graph.node:
        op = node.op_type
        mapped = [i for i in node.input if i in g.maps]
        flat_in = [i for i in node.input if i in g.flat]
        if op == "Conv":
            w = consts.get(node.input[1]) if len(node.input) > 1 else None
            group = attr(node, "group", 1)
            x = node.input[0]
            if x in g.maps:
                c_in = sum(hi - lo for _, lo, hi in g.maps[x])
                if w is None:
                    g.freeze(g.maps[x], f"read by {node.name} whose weight is not a constant")
                elif group == 1:
                    g.readers.append(("conv", node, x))
                elif group == c_in and w.shape[0] == c_in and w.shape[1] == 1:
                    g.readers.append(("dwconv", node, x))
                    if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
                        g.freeze(g.maps[x], f"depthwise {node.name} has a non-constant bias")
                    g.maps[node.output[0]] = g.maps[x]
                    continue
                else:
                    g.freeze(g.maps[x], f"read by grouped conv {node.name} (group={group})")
            if w is not None and group == 1 and w.ndim >= 3:
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
                if bias is None or bias in consts:
                    g.maps[node.output[0]] = g.new(node, w.shape[0])
            continue
        if op == "BatchNormalization":
            x = node.input[0]
            if x in g.maps:
                if all(i in consts for i in node.input[1:5]) and len(
                        [o for o in node.output if o]) == 1:
                    g.readers.append(("bn", node, x))
                    g.maps[node.output[0]] = g.maps[x]
                else:
                    g.freeze(g.maps[x], f"BatchNormalization {node.name} in training mode or "
                                        "with non-constant statistics")
            continue
        if op in UNARY and node.input and node.input[0] in g.maps:
            if op == "PRelu" and len(node.input) > 1:
                slope = consts.get(node.input[1])
                rank = len(shapes.get(node.input[0]) or ())
                chans = sum(hi - lo for _, lo, hi in g.maps[node.input[0]])
                kind = _channel_const(slope, rank, chans) if slope is not None else "bad"
                if kind == "bad":
                    g.freeze(g.maps[node.input[0]], f"PRelu {node.name} slope does not "
                                                    "broadcast per channel")
                elif kind == "slice":
                    g.readers.append(("const1", node, node.input[0]))
            g.maps[node.output[0]] = g.maps[node.input[0]]
            continue
        if op in BINARY and len(node.input) == 2:
            a, b = node.input
            if a in g.maps and b in g.maps:
                _couple(g, g.maps[a], g.maps[b], f"{op} {node.name}")
                g.maps[node.output[0]] = g.maps[a]
                continue
            if (a in g.maps) != (b in g.maps):
                x, other = (a, b) if a in g.maps else (b, a)
                arr = consts.get(other)
                rank = len(shapes.get(x) or ())
                chans = sum(hi - lo for _, lo, hi in g.maps[x])
                out_shape = shapes.get(node.output[0])
                if arr is None:
                    g.freeze(g.maps[x], f"{op} {node.name} combines it with a computed tensor")
                    continue
                kind = _channel_const(arr, rank, chans)
                if kind == "bad" or (out_shape is not None and len(out_shape) != rank):
                    g.freeze(g.maps[x], f"{op} {node.name}: constant does not broadcast per "
                                        "channel")
                    continue
                if kind == "slice":
                    g.readers.append(("const", node, x))
                g.maps[node.output[0]] = g.maps[x]
                continue
        if op == "Concat" and mapped:
            rank = len(shapes.get(node.input[0]) or ())
            axis = attr(node, "axis", 1)
            axis = axis + rank if axis < 0 else axis
            if axis == 1 and len(mapped) == len(node.input):
                g.maps[node.output[0]] = [s for i in node.input for s in g.maps[i]]
            else:
                for i in mapped:
                    g.freeze(g.maps[i], f"Concat {node.name} mixes it with unmapped tensors or "
                                        f"concatenates on axis {axis}")
            continue
        if op in ("Flatten", "Reshape") and node.input[0] in g.maps:
            xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
            ok = (xs is not None and ys is not None and len(xs) == 4 and len(ys) == 2
                  and all(isinstance(d, int) and d > 0 for d in xs[1:])
                  and ys[1] == xs[1] * xs[2] * xs[3]
                  and (op == "Reshape" or attr(node, "axis", 1) == 1))
            if ok:
                g.flat[node.output[0]] = (g.maps[node.input[0]], xs[2] * xs[3])
            else:
                g.freeze(g.maps[node.input[0]], f"{op} {node.name} is not a flatten of NCHW "
                                                "into [N, C*H*W]")
            continue
        if op in ("Gemm", "MatMul") and node.input and node.input[0] in g.flat:
            ok = (len(node.input) > 1 and node.input[1] in consts
                  and consts[node.input[1]].ndim == 2
                  and (op == "MatMul" or attr(node, "transA", 0) == 0))
            if ok:
                g.readers.append(("flatgemm", node, node.input[0]))
            else:
                g.freeze(g.flat[node.input[0]][0], f"{op} {node.name} after the flatten has a "
                                                   "non-constant weight or transA")
            continue
        for i in mapped:
            g.freeze(g.maps[i], f"read by {op} {node.name}, which is not channel-aware")
        for i in flat_in:
            g.freeze(g.flat[i][0], f"flattened channels read by {op} {node.name}")
    for o in m.graph.output:
        if o.name in g.maps:
            g.freeze(g.maps[o.name], f"reaches the graph output {o.name}")
        if o.name in g.flat:
            g.freeze(g.flat[o.name][0], f"reaches the graph output {o.name}")
    return g


# ----------------------------------------------------------------------------- decisions

def _pca_keep(cov: np.ndarray, alpha: float) -> int:
    ev = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    total = ev.sum()
    if total <= 0:
        return 1
    return int(np.searchsorted(np.cumsum(ev) / total, alpha - 1e-12)) + 1


def _activation_stats(m, g: Graph, groups: dict, calib, config, seed):
    """Per group: channel covariance (PCA) and mean square (energy) of its producers'
    outputs, accumulated batch by batch."""
    from ._calib import calib_rows, fixed_batch, stream_activations

    names = {gid: g.sources[gid].output[0] for members in groups.values() for gid in members}
    total = min(calib_rows(calib), config.calib_samples)
    cov: dict[int, np.ndarray] = {}
    count: dict[int, int] = {}
    rng = np.random.default_rng(seed)
    for acts in stream_activations(m, calib, list(names.values()),
                                   batch=fixed_batch(m) or 32, limit=total):
        for gid, name in names.items():
            y = acts[name]
            y2 = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]).astype(np.float64)
            if len(y2) > 8192:
                y2 = y2[rng.integers(0, len(y2), 8192)]
            root = g.find(gid)
            y2 = y2 - y2.mean(axis=0, keepdims=True)  # PCA of the centred activations
            c = y2.T @ y2
            cov[root] = cov.get(root, 0) + c
            count[root] = count.get(root, 0) + len(y2)
    return {r: cov[r] / max(count[r], 1) for r in cov}


def _scores(g: Graph, members: list[int], inits: dict, how: str, cov) -> np.ndarray:
    if how == "energy" and cov is not None:
        return np.diag(cov).copy()
    s = 0.0
    for gid in members:
        w = numpy_helper.to_array(inits[g.sources[gid].input[1]]).astype(np.float64)
        l1 = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
        s = s + l1 / max(l1.mean(), 1e-30)
    return s


def _round_keep(keep: int, c: int, config: PruneConfig) -> int:
    keep = max(keep, config.min_channels, math.ceil(c * (1 - config.max_prune)))
    if config.round_to > 1:
        keep = math.ceil(keep / config.round_to) * config.round_to
    return min(keep, c)


# ----------------------------------------------------------------------------- the pass

@register_pass(PASS, PruneConfig, tolerance=Tolerance(rtol=0.0, atol=0.0, min_cosine=0.9))
def prune(model: onnx.ModelProto, config: PruneConfig, ctx: PassContext):
    crit = config.criterion()
    if crit == "alpha" and config.alpha is not None and ctx.calib is None:
        raise EdgecError("prune: alpha (PCA of activations) needs calibration data: give "
                         "--calib FILE.npz, or set prune.ratio or prune.sigma_k")
    m = copy_model(model)
    report = PassReport(PASS)
    inits = initializers(m)
    shapes = value_shapes(m)
    g = build_groups(m, inits, shapes, config)
    groups: dict[int, list[int]] = {}
    for gid in g.sources:
        groups.setdefault(g.find(gid), []).append(gid)
    frozen_roots: dict[int, str] = {}
    for gid, why in g.frozen.items():
        frozen_roots.setdefault(g.find(gid), why)
    for root, members in groups.items():
        names = {g.sources[x].name for x in members}
        if root in frozen_roots:
            continue
        if config.include and not names & set(config.include):
            frozen_roots[root] = "not in prune.include"
        elif names & set(config.exclude):
            frozen_roots[root] = "in prune.exclude"

    live = {r: mem for r, mem in groups.items() if r not in frozen_roots}
    cov = {}
    if ctx.calib is not None and live and (crit == "alpha" or config.rank_by == "energy"):
        cov = _activation_stats(m, g, live, ctx.calib, config, ctx.seed)

    kept: dict[int, np.ndarray] = {}
    table = []
    for root, members in groups.items():
        srcs = [g.sources[x] for x in members]
        chans = int(numpy_helper.to_array(inits[srcs[0].input[1]]).shape[0])
        row = {"producers": [s.name for s in srcs], "channels": chans}
        if root in frozen_roots:
            row["skipped"] = frozen_roots[root]
            table.append(row)
            for s in srcs:
                report.skip(s, frozen_roots[root])
            continue
        if crit == "ratio":
            keep = chans - int(math.floor(config.ratio * chans))
        elif crit == "sigma_k":
            keep_mask = np.zeros(chans, bool)
            for s in srcs:
                w = numpy_helper.to_array(inits[s.input[1]]).astype(np.float64)
                mean_abs = np.abs(w.reshape(chans, -1)).mean(axis=1)
                keep_mask |= mean_abs >= config.sigma_k * w.std()
            keep = int(keep_mask.sum())
        else:
            keep = _pca_keep(cov[root], config.alpha)
            row["pca_components"] = keep
        keep = _round_keep(keep, chans, config)
        if keep >= chans:
            why = f"{crit} keeps all {chans} channels"
            row["skipped"] = why
            table.append(row)
            for s in srcs:
                report.skip(s, why)
            continue
        score = _scores(g, members, inits, config.rank_by, cov.get(root))
        idx = np.sort(np.argsort(-score, kind="stable")[:keep])
        kept[root] = idx
        row.update(kept=keep, removed=chans - keep, kept_fraction=round(keep / chans, 4))
        table.append(row)
        for s in srcs:
            report.rewrite(s, f"output channels {chans} -> {keep}", channels=chans, kept=keep)

    report.details = {"criterion": crit, "groups": table, "reconstruction": []}
    if not kept:
        return m, report

    def idx_of(segs) -> np.ndarray:
        out, off = [], 0
        for gid, lo, hi in segs:
            k = kept.get(g.find(gid))
            sel = np.arange(lo, hi) if k is None else k[(k >= lo) & (k < hi)]
            out.append(off + sel - lo)
            off += hi - lo
        return np.concatenate(out).astype(np.int64)

    names = all_names(m)
    new_inits: dict[str, np.ndarray] = {}

    marked: set[str] = set()

    def replace(node, pos: int, arr: np.ndarray, what: str) -> None:
        base = node.input[pos]
        name = unique_name(names, f"{base}_pruned")
        new_inits[name] = np.ascontiguousarray(arr)
        node.input[pos] = name
        if node.name not in marked:  # one provenance record per node
            marked.add(node.name)
            set_provenance(node, PASS, node.name, changed=what)

    base_arrays = {k: numpy_helper.to_array(v) for k, v in inits.items()}

    class _Arrays:  # the current value of an input: already sliced once, or the original
        def __getitem__(self, name):
            return new_inits[name] if name in new_inits else base_arrays[name]

    arrays = _Arrays()
    for gid, node in g.sources.items():
        k = kept.get(g.find(gid))
        if k is None:
            continue
        replace(node, 1, arrays[node.input[1]][k], "output channels")
        if len(node.input) > 2 and node.input[2]:
            replace(node, 2, arrays[node.input[2]][k], "bias")
    refit = []
    for kind, node, x in g.readers:
        segs = g.flat[x][0] if kind == "flatgemm" else g.maps[x]
        if all(g.find(s[0]) not in kept for s in segs):
            continue
        idx = idx_of(segs)
        if kind == "conv":
            replace(node, 1, arrays[node.input[1]][:, idx], "input channels")
            refit.append((node, x, idx))
        elif kind == "dwconv":
            replace(node, 1, arrays[node.input[1]][idx], "depthwise channels")
            if len(node.input) > 2 and node.input[2]:
                replace(node, 2, arrays[node.input[2]][idx], "bias")
            for a in node.attribute:
                if a.name == "group":
                    a.i = len(idx)
        elif kind == "bn":
            for pos in range(1, 5):
                replace(node, pos, arrays[node.input[pos]][idx], "statistics")
        elif kind in ("const", "const1"):
            pos = 1 if kind == "const1" else [i for i, n in enumerate(node.input) if n != x][0]
            arr = arrays[node.input[pos]]
            rank = len(shapes.get(x) or ())
            axis = 1 - (rank - arr.ndim)
            replace(node, pos, np.take(arr, idx, axis=axis), "per-channel constant")
        elif kind == "flatgemm":
            spatial = g.flat[x][1]
            rows = (idx[:, None] * spatial + np.arange(spatial)[None, :]).reshape(-1)
            w = arrays[node.input[1]]
            trans_b = node.op_type == "Gemm" and attr(node, "transB", 0)
            replace(node, 1, w[:, rows] if trans_b else w[rows], "input features")
            refit.append((node, x, rows))
    m.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_inits.items())
    m = _drop_unused(m)
    _fix_shapes(m)

    if ctx.calib is not None and config.reconstruct and refit:
        out_kept = {node.name: kept[g.find(gid)] for gid, node in g.sources.items()
                    if g.find(gid) in kept}
        m = _reconstruct(model, m, refit, out_kept, ctx, config, report)
    return m, report


def _drop_unused(m: onnx.ModelProto) -> onnx.ModelProto:
    used = {i for n in m.graph.node for i in n.input}
    kept = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    return m


def _fix_shapes(m: onnx.ModelProto) -> None:
    """Channel counts changed: drop inferred intermediate shapes (re-inferred afterwards)."""
    del m.graph.value_info[:]


# ----------------------------------------------------------------------------- reconstruction

def _reader_rows(node, kernel, x: np.ndarray, shapes_out, n_rows: int, rng) -> np.ndarray:
    from ._calib import sample_patches, sample_rows

    if node.op_type == "Conv":
        return sample_patches(x, kernel, attr(node, "strides", [1, 1]),
                              attr(node, "dilations", [1, 1]),
                              tuple(attr(node, "pads", [0, 0, 0, 0])), shapes_out, n_rows, rng)
    return sample_rows(x, n_rows, rng)


def _reconstruct(original, m, refit, out_kept, ctx, config, report) -> onnx.ModelProto:
    """Refit each reader's weights (and bias) by ridge least squares, in graph order, from the
    pruned model's activations to the unpruned model's outputs."""
    from edgec.core.importer import infer_shapes

    from ._calib import calib_rows, fixed_batch, stream_activations

    orig_nodes = {n.name: n for n in original.graph.node}
    orig_inits = {k: numpy_helper.to_array(v) for k, v in initializers(original).items()}
    shapes = value_shapes(original)
    total = min(calib_rows(ctx.calib), config.calib_samples)
    batch = fixed_batch(original) or 32
    per = math.ceil(config.calib_rows / max(1, math.ceil(total / batch)))

    def capture(model, items, which, first=0):
        """Rows at positions keyed by (seed, reader index, batch): identical in both models."""
        out = {i: [] for i in range(len(items))}
        names = [(orig_nodes[n.name].input[0] if which == "orig" else n.input[0])
                 for n, _, _ in items]
        for bi, acts in enumerate(stream_activations(model, ctx.calib, names, batch=batch,
                                                     limit=total)):
            for i, (node, _, _) in enumerate(items):
                rng = np.random.default_rng([ctx.seed, first + i, bi])
                out_hw = shapes.get(node.output[0])
                out_hw = out_hw[2:4] if out_hw and len(out_hw) == 4 else None
                kernel = orig_inits[orig_nodes[node.name].input[1]].shape[2:4]
                out[i].append(_reader_rows(node, kernel, acts[names[i]], out_hw, per, rng))
        return {i: np.concatenate(v) for i, v in out.items()}

    if any(node.op_type == "Conv" and attr(node, "auto_pad", b"NOTSET") not in
           (b"NOTSET", "NOTSET") for node, _, _ in refit):
        report.details["reconstruction"].append({"skipped": "auto_pad convs are not refitted"})
        return m
    orig_rows = capture(original, refit, "orig")
    for i, (node, x, idx) in enumerate(refit):
        cur = infer_shapes(m)
        node_now = next(n for n in cur.graph.node if n.name == node.name)
        X = capture(cur, [(node_now, x, idx)], "cur", first=i)[0]
        A = orig_rows[i]
        on = orig_nodes[node.name]
        W0 = orig_inits[on.input[1]].astype(np.float64)
        cur_inits = initializers(cur)
        W1 = numpy_helper.to_array(cur_inits[node_now.input[1]])
        dtype = W1.dtype
        W1 = W1.astype(np.float64)
        out_idx = out_kept.get(node.name)  # a reader that is itself a pruned producer
        if out_idx is not None:
            W0 = W0[out_idx]
        if node.op_type == "Conv":
            K = W0.shape[0]
            Y = A.reshape(len(A), -1).astype(np.float64) @ W0.reshape(K, -1).T
            Xf = X.reshape(len(X), -1).astype(np.float64)
            prior = W1.reshape(K, -1).T
        else:
            trans_b = node.op_type == "Gemm" and attr(node, "transB", 0)
            Wm0 = W0.T if trans_b else W0          # [in, out]
            Wm1 = W1.T if trans_b else W1
            alpha = attr(node, "alpha", 1.0) if node.op_type == "Gemm" else 1.0
            Y = alpha * A.astype(np.float64) @ Wm0
            Xf = X.astype(np.float64)
            prior = alpha * Wm1
        n = len(Xf)
        cut = int(n * 0.8)
        Z = np.concatenate([Xf, np.ones((n, 1))], axis=1)
        P = np.concatenate([prior, np.zeros((1, prior.shape[1]))], axis=0)
        G = Z[:cut].T @ Z[:cut]
        G += np.eye(len(G)) * config.ridge * max(np.trace(G) / len(G), 1e-12)
        sol = P + np.linalg.solve(G, Z[:cut].T @ (Y[:cut] - Z[:cut] @ P))
        ny = max(float(np.sum(Y[cut:] ** 2)), 1e-30)
        e0 = math.sqrt(float(np.sum((Z[cut:] @ P - Y[cut:]) ** 2)) / ny)
        e1 = math.sqrt(float(np.sum((Z[cut:] @ sol - Y[cut:]) ** 2)) / ny)
        entry = {"node": node.name, "rows": n, "held_out_error_before": round(e0, 5),
                 "held_out_error_after": round(e1, 5), "applied": e1 < e0}
        report.details["reconstruction"].append(entry)
        if not e1 < e0:
            continue
        Wn, db = sol[:-1], sol[-1]
        if node.op_type == "Conv":
            Wn = Wn.T.reshape(W1.shape)
        else:
            Wn = Wn / alpha
            Wn = Wn.T if trans_b else Wn
        m = _set_weight_and_bias(m, node.name, Wn, db, dtype)
    return m


def _set_weight_and_bias(m, node_name: str, W: np.ndarray, db: np.ndarray, dtype):
    m = copy_model(m)
    node = next(n for n in m.graph.node if n.name == node_name)
    inits = initializers(m)
    names = all_names(m)
    wname = unique_name(names, f"{node.input[1]}_refit")
    m.graph.initializer.append(numpy_helper.from_array(W.astype(dtype), wname))
    node.input[1] = wname
    K = len(db)
    if node.op_type == "MatMul":
        b0 = np.zeros(K)
        bname = unique_name(names, f"{node_name}_refit_bias")
        m.graph.initializer.append(numpy_helper.from_array((b0 + db).astype(dtype), bname))
        mid = unique_name(names, f"{node.output[0]}_pre_bias")
        out = node.output[0]
        node.output[0] = mid
        add = onnx.helper.make_node("Add", [mid, bname], [out],
                                    name=unique_name(names, f"{node_name}/refit_bias"))
        set_provenance(add, PASS, node_name, changed="reconstruction bias")
        pos = list(m.graph.node).index(node)
        m.graph.node.insert(pos + 1, add)
    else:
        has_b = len(node.input) > 2 and node.input[2]
        beta = attr(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
        b0 = np.zeros(K)
        if has_b:
            b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) * beta
            b0 = np.broadcast_to(b.reshape(-1) if b.size == K else b, (K,))
        bname = unique_name(names, f"{node_name}_refit_bias")
        m.graph.initializer.append(numpy_helper.from_array((b0 + db).astype(dtype), bname))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = bname
        for a in list(node.attribute):
            if a.name == "beta":
                node.attribute.remove(a)
    set_provenance(node, PASS, node_name, changed="reconstructed")
    return _drop_unused(m)
