"""The pass contract and registry.

A pass is a pure function ``(model, config, ctx) -> (model, PassReport)``:

* it never mutates its input model (:func:`run_pass` checks this in debug runs);
* ``config`` is a frozen dataclass; ``--set pass.key=value`` is typed from its fields;
* ``ctx`` carries optional calibration data for data-aware passes;
* the report lists every node rewritten and every candidate skipped *with the reason*, and
  params / MACs / bytes before and after (filled in by :func:`run_pass`);
* new nodes carry provenance in ``metadata_props`` (:func:`edgec.core.graph.set_provenance`).

Passes register with :func:`register_pass` and declare a verification tolerance: exact
rewrites promise float round-off, lossy ones a looser bound. ``--verify`` holds them to it.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from edgec.core.errors import EdgecError, PassError, one_line
from edgec.core.stats import model_stats


@dataclass(frozen=True)
class Tolerance:
    """How far a pass may move the model's outputs on verification data."""

    rtol: float = 1e-4
    atol: float = 1e-4
    min_cosine: float = 0.9999

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TargetInfo:
    """What a pass may know of the compile target (``PassContext.target``; None when a pass
    runs outside ``edgec compile``)."""

    name: str                      # the edgec target name
    arch: str                      # ISA of the CPU that runs the model's host code
    device: str = "cpu"            # "cpu" | "cuda"
    int8_isa: str | None = None    # the CPU backend's integer dot product (targets.cpu.isa)

    @property
    def int8_pairs_saturate(self) -> bool:
        """Whether 8-bit u8 x s8 products are summed in saturating 16-bit pairs on this CPU
        (``vpmaddubsw``: x86 without VNNI), as onnxruntime's fused int8 kernels do there."""
        return self.device == "cpu" and self.arch == "x86_64" and \
            self.int8_isa not in ("avx512vnni", "avxvnni")


@dataclass
class PassContext:
    """What a pass may use besides the model: calibration feeds (name -> array, batched on
    axis 0), a seed for anything random, and the compile target (None outside a compile)."""

    calib: dict[str, np.ndarray] | None = None
    seed: int = 0
    target: TargetInfo | None = None


@dataclass
class PassReport:
    name: str
    modified: bool = False
    rewritten: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    def rewrite(self, node: onnx.NodeProto | str, what: str, **extra) -> None:
        name, op = (node.name, node.op_type) if isinstance(node, onnx.NodeProto) else (node, "")
        self.rewritten.append({"node": name, "op": op, "what": what, **extra})
        self.modified = True

    def skip(self, node: onnx.NodeProto | str, reason: str, **extra) -> None:
        name, op = (node.name, node.op_type) if isinstance(node, onnx.NodeProto) else (node, "")
        self.skipped.append({"node": name, "op": op, "reason": reason, **extra})

    def to_json(self) -> dict:
        return {"name": self.name, "modified": self.modified, "config": self.config,
                "rewritten": self.rewritten, "skipped": self.skipped, "before": self.before,
                "after": self.after, "details": self.details, "seconds": round(self.seconds, 4)}


PassFn = Callable[[onnx.ModelProto, Any, PassContext], "tuple[onnx.ModelProto, PassReport]"]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    config_cls: type
    tolerance: Tolerance
    needs_calib: bool
    summary: str
    plot: Callable | None = None  # plot(report_json, out_dir) -> [png paths]; needs matplotlib


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, config: type, tolerance: Tolerance = Tolerance(),
                  needs_calib: bool = False, plot: Callable | None = None):
    """Decorator: register ``fn(model, config, ctx)`` under ``name``.

    ``plot(report_json, out_dir)``, if given, draws the pass's figures (PNG) from its report
    into the artifact's ``plots/`` folder and returns their paths."""
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"pass {name}: config must be a frozen dataclass")

    def deco(fn: PassFn) -> PassFn:
        doc = (fn.__module__ and __import__(fn.__module__, fromlist=["x"]).__doc__) or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else name
        _REGISTRY[name] = PassInfo(name, fn, config, tolerance, needs_calib, summary, plot)
        return fn

    return deco


def get_pass(name: str) -> PassInfo:
    if name not in _REGISTRY:
        raise EdgecError(f"unknown pass '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def list_passes() -> list[PassInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _coerce(value: str, typ, pass_name: str, key: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or origin is types.UnionType:
        non_none = [a for a in args if a is not type(None)]
        if value.lower() in ("none", "null", "") and type(None) in args:
            return None
        return _coerce(value, non_none[0], pass_name, key)
    if origin is typing.Literal:
        if value not in [str(a) for a in args]:
            raise EdgecError(f"--set {pass_name}.{key}: '{value}' is not one of "
                             f"{', '.join(map(str, args))}")
        return next(a for a in args if str(a) == value)
    if origin in (tuple, list):
        inner = args[0] if args else str
        items = [v for v in value.split(",") if v != ""]
        conv = [_coerce(v, inner, pass_name, key) for v in items]
        return tuple(conv) if origin is tuple else conv
    try:
        if typ is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ in (int, float, str):
            return typ(value)
    except ValueError:
        raise EdgecError(f"--set {pass_name}.{key}: cannot read '{value}' as "
                         f"{getattr(typ, '__name__', typ)}") from None
    raise EdgecError(f"--set {pass_name}.{key}: unsupported option type {typ}")


def make_config(name: str, overrides: dict[str, str] | None = None):
    """Build a pass's config from string overrides, typed from the dataclass fields."""
    info = get_pass(name)
    hints = typing.get_type_hints(info.config_cls)
    fields = {f.name for f in dataclasses.fields(info.config_cls)}
    kwargs = {}
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise EdgecError(f"unknown option '{key}' for pass '{name}' (options: "
                             f"{', '.join(sorted(fields)) or 'none'})")
        kwargs[key] = _coerce(raw, hints[key], name, key) if isinstance(raw, str) else raw
    try:
        return info.config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise EdgecError(f"bad options for pass '{name}': {e}") from None


def run_pass(name: str, model: onnx.ModelProto, config=None, ctx: PassContext | None = None
             ) -> tuple[onnx.ModelProto, PassReport]:
    """Run one registered pass, fill in its statistics and check the result is valid ONNX."""
    info = get_pass(name)
    config = config if config is not None else info.config_cls()
    ctx = ctx or PassContext()
    if info.needs_calib and ctx.calib is None:
        raise EdgecError(f"pass '{name}' needs calibration data: give --calib FILE.npz")
    before = model_stats(model)
    snapshot = model.SerializeToString(deterministic=True)
    t0 = time.perf_counter()
    try:
        out, report = info.fn(model, config, ctx)
    except EdgecError:
        raise
    except Exception as e:  # noqa: BLE001 - name the pass that broke
        raise PassError(name, f"{type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    if model.SerializeToString(deterministic=True) != snapshot:
        raise PassError(name, "mutated its input model (passes must be pure)")
    if report.modified:
        from edgec.core.importer import infer_shapes

        out = infer_shapes(out)
    try:
        onnx.checker.check_model(out)
    except Exception as e:  # noqa: BLE001
        if _valid(model):  # an input the checker already rejects cannot be blamed on the pass
            raise PassError(name, f"produced an invalid model: {one_line(e, None)}") from e
    report.name = name
    report.config = dataclasses.asdict(config)
    report.before = before.to_json()
    report.after = model_stats(out).to_json()
    report.seconds = seconds
    return out, report


def _valid(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model)
        return True
    except Exception:  # noqa: BLE001
        return False


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _register_builtin() -> None:
    """Import every module of this package not starting with ``_``: one pass per file."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_register_builtin()
