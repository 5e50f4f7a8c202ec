"""``edgec compile``: import -> normalize -> passes -> TVM build -> artifact folder."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgec import __version__
from edgec.core.errors import EdgecError
from edgec.core.importer import graph_inputs, load_model, normalize
from edgec.core.stats import model_stats
from edgec.driver.pipeline import Pipeline, parse_sets, resolve_passes
from edgec.passes import make_config
from edgec.targets import get_target

DEFAULT_OUT_SUFFIX = ".edgec"


def default_out_dir(model_path: str | Path, target: str) -> Path:
    """Default artifact folder: beside the model, ``<stem>.edgec/<target>/``."""
    p = Path(model_path)
    return p.parent / f"{p.stem}{DEFAULT_OUT_SUFFIX}" / target


@dataclass
class CompileOptions:
    target: str = "x86"
    passes: list[str] | None = None
    preset: str | None = None
    sets: list[str] = field(default_factory=list)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calib: dict[str, np.ndarray] | None = None
    verify: bool = False
    target_options: dict = field(default_factory=dict)
    build: bool = True  # False: stop after the passes (no TVM library)
    tune_trials: int | None = None     # tune (MetaSchedule) before building
    tune_minutes: float | None = None
    use_tuning_db: bool = True         # apply the target's tuning database if it exists
    progress: bool = True
    extra_files: dict = field(default_factory=dict)   # relative path -> bytes (the search's)
    report_extra: dict = field(default_factory=dict)  # merged into report.json


# Passes that change the model's function (the estimated-drop line follows them)
COMPRESSING = ("prune", "lowrank", "sparse", "quantize", "fp16")
DEFAULT_BUDGET = 1.0   # points of top-1 agreement on held-out calibration rows


def validate_calib(model: onnx.ModelProto, calib: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Calibration data must name every model input with the model's per-sample shape."""
    inputs = {vi.name: vi for vi in graph_inputs(model)}
    data = {k: v for k, v in calib.items() if k != "labels"}
    missing = [n for n in inputs if n not in data]
    if missing:
        raise EdgecError(f"calibration data lacks input(s) {', '.join(missing)} "
                         f"(it has: {', '.join(data) or 'nothing'})")
    extra = [n for n in data if n not in inputs]
    if extra:
        raise EdgecError(f"calibration data has array(s) {', '.join(extra)} that are not model "
                         f"inputs ({', '.join(inputs)})")
    rows = set()
    for name, vi in inputs.items():
        a = np.asarray(data[name])
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if a.ndim != len(shape) or list(a.shape[1:]) != shape[1:]:
            raise EdgecError(f"calibration array '{name}' has shape {list(a.shape)}, the model "
                             f"input is {shape} (any batch)")
        want = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(want, np.floating) and not np.issubdtype(a.dtype, np.floating):
            raise EdgecError(f"calibration array '{name}' has dtype {a.dtype}, the model "
                             f"takes {np.dtype(want)}")
        if a.shape[0] == 0:
            raise EdgecError(f"calibration array '{name}' has 0 rows")
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(want, copy=False)  # finiteness after the cast: 1e300 overflows
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise EdgecError(f"calibration array '{name}' contains NaN or infinity (or values "
                             f"beyond {np.dtype(want)})")
        rows.add(a.shape[0])
        data[name] = a
    if len(rows) > 1:
        raise EdgecError(f"calibration arrays disagree on the number of rows: {sorted(rows)}")
    return data


def io_specs(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def spec(vi):
        tt = vi.type.tensor_type
        return {"name": vi.name,
                "shape": [d.dim_value if d.HasField("dim_value") else None
                          for d in tt.shape.dim],
                "dtype": str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))}

    return [spec(v) for v in graph_inputs(model)], [spec(v) for v in model.graph.output]


def target_info(opts: CompileOptions):
    """What the passes may know of the target (the CPU backend's integer ISA, for one)."""
    from edgec.passes import TargetInfo

    spec = get_target(opts.target)
    isa = None
    if spec.device == "cpu":
        from edgec.targets.backend import int8_isa

        isa = int8_isa(spec, opts.target_options)
    return TargetInfo(spec.name, spec.host_arch, spec.device, isa)


@dataclass
class Prepared:
    notes: object
    result: object
    before: object
    timings: dict
    estimate: dict | None = None


def prepare(model_path: str | Path, opts: CompileOptions, pass_names: list[str] | None = None
            ) -> Prepared:
    """Load, normalize and run the passes (what ``compile`` and ``tune`` share)."""
    pass_names = pass_names if pass_names is not None else resolve_passes(opts.preset,
                                                                          opts.passes)
    sets = parse_sets(opts.sets, pass_names)
    for name in pass_names:  # bad options fail here, before the model is read or TVM loaded
        make_config(name, sets.get(name))
    timings = {}
    t0 = time.perf_counter()
    source = load_model(model_path)
    model, notes = normalize(source, opts.input_shapes)
    timings["import_s"] = time.perf_counter() - t0
    calib = validate_calib(model, opts.calib) if opts.calib is not None else None
    held = None
    if calib is not None and any(p in COMPRESSING for p in pass_names):
        calib, held = split_calib(calib)
    before = model_stats(model)
    t0 = time.perf_counter()
    result = Pipeline(pass_names, sets, verify=opts.verify, calib=calib,
                      target=target_info(opts)).run(model)
    timings["passes_s"] = time.perf_counter() - t0
    prep = Prepared(notes, result, before, timings)
    if held is not None and any(r.modified and r.name in COMPRESSING for r in result.reports):
        t0 = time.perf_counter()
        prep.estimate = estimate_drop(model, result.model, held,
                                      defaults=[p for p in pass_names if p in COMPRESSING
                                                and p not in sets])
        if prep.estimate is not None:
            prep.estimate["held_out"] = next(iter(calib.values())).shape[0] < \
                next(iter(opts.calib.values())).shape[0]
        timings["estimate_s"] = time.perf_counter() - t0
    return prep


def split_calib(calib: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Hold out the last fifth of the calibration rows (at least 50 rows kept for the passes,
    at most 1000 held out) to estimate the drop on rows the passes did not fit on; with fewer
    than 100 rows the estimate uses the calibration rows themselves."""
    n = next(iter(calib.values())).shape[0]
    if n < 100:
        return calib, dict(calib)
    k = min(n // 5, 1000)
    return ({a: v[: n - k] for a, v in calib.items()}, {a: v[n - k:] for a, v in calib.items()})


def estimate_drop(model: onnx.ModelProto, new: onnx.ModelProto, held: dict[str, np.ndarray],
                  defaults: list[str] = ()) -> dict | None:
    """Top-1 disagreement of ``new`` with ``model`` on the held-out rows (first output, when it
    is class scores [N, C]) and its 90 % Wilson upper bound, in points."""
    from edgec.driver.search import wilson_upper
    from edgec.passes._calib import fixed_batch
    from edgec.runtime import OrtSession, run_batched

    try:
        ref = run_batched(OrtSession(model), held, fixed_batch(model))[0]
        got = run_batched(OrtSession(new), held, fixed_batch(new))[0]
    except EdgecError:
        return None
    n = ref.shape[0]
    if ref.ndim != 2 or ref.shape[1] < 2:
        rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
        return {"rows": n, "relative_error": rel}
    k = int(np.sum(ref.argmax(1) != got.argmax(1)))
    return {"rows": n, "disagreement": 100 * k / n, "upper_90": wilson_upper(k, n, 1.2816),
            "budget": DEFAULT_BUDGET, "default_settings": list(defaults)}


def write_plots(pass_reports: list[dict], folder: Path) -> list[str]:
    """Let each pass with a plot hook draw its figures into ``folder/plots``; returns the
    paths relative to ``folder``. Without matplotlib no figures are drawn (the numbers stay in
    the report)."""
    from edgec.passes import get_pass

    hooks = [(r, get_pass(r["name"]).plot) for r in pass_reports if r.get("modified") or
             r.get("details")]
    hooks = [(r, h) for r, h in hooks if h is not None]
    if not hooks:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return []
    out = folder / "plots"
    out.mkdir(exist_ok=True)
    paths: list[str] = []
    for r, hook in hooks:
        paths += [str(Path(p).relative_to(folder)) for p in hook(r, out)]
    return paths


def compile_model(model_path: str | Path, out_dir: str | Path, opts: CompileOptions) -> dict:
    """Compile ``model_path`` into the artifact folder ``out_dir``; returns the report.

    Everything that can fail on user input fails before anything is written; the artifact is
    staged in a temporary folder and renamed into place only when complete.
    """
    from edgec.runtime.artifact import (FORMAT, LIBRARY, MANIFEST, ONNX, REPORT,
                                        check_output_dir, file_hashes, resolve_output,
                                        sha256_file, staging, write_json)

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    spec = get_target(opts.target)
    model_path = Path(model_path)
    out_dir = resolve_output(out_dir)
    real_model = model_path.resolve()
    if out_dir == real_model:
        raise EdgecError("output folder is the model file itself")
    if out_dir in real_model.parents:
        # the swap would replace (and delete) the input model with the folder it lives in
        raise EdgecError(f"the model {model_path} lies inside the output folder {out_dir}, "
                         "which the compile replaces: copy the model out or choose another -o")
    check_output_dir(out_dir)  # fail before the work, not after it

    pass_names = resolve_passes(opts.preset, opts.passes)
    if opts.build:
        spec.check_toolchain()
    if opts.target_options.get("mcpu"):
        from edgec.targets import backend

        backend.make_target(spec, opts.target_options)  # an unknown --mcpu fails here
    prep = prepare(model_path, opts, pass_names)
    timings.update(prep.timings)
    notes, result, before, final = prep.notes, prep.result, prep.before, prep.result.model
    after = model_stats(final)
    inputs, outputs = io_specs(final)
    for o in outputs:
        if any(d is None or d <= 0 for d in o["shape"]):
            raise EdgecError(f"output '{o['name']}' has no static shape after normalization "
                             f"({o['shape']}): data-dependent shapes cannot be compiled")

    if opts.build:
        from edgec.targets import backend  # imports TVM

        backend.check_supported(final)

    tuning = None
    if opts.build and (opts.tune_trials or opts.tune_minutes):
        from edgec.targets.tuning import tune

        t0 = time.perf_counter()
        tuning = tune(final, spec, opts.target_options, trials=opts.tune_trials or 10_000,
                      minutes=opts.tune_minutes, progress=opts.progress)
        timings["tune_s"] = time.perf_counter() - t0

    report = {
        "edgec": __version__,
        "source": str(model_path),
        "target": spec.name,
        "import": {"source_opset": notes.source_opset, "opset": notes.opset,
                   "notes": notes.notes},
        "before": before.to_json(),
        "after": after.to_json(),
        "passes": [r.to_json() for r in result.reports],
        "verification": result.verification,
        "timings": timings,
    }
    if prep.estimate is not None:
        report["estimate"] = prep.estimate
    report.update(opts.report_extra)
    if tuning is not None:
        report["tuning"] = tuning
    with staging(out_dir) as tmp:
        onnx.save_model(final, str(tmp / ONNX))
        report["plots"] = write_plots(report["passes"], tmp)
        for rel, data in opts.extra_files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
            if rel.startswith("plots/"):
                report["plots"].append(rel)
        manifest = {
            "format": FORMAT,
            "target": spec.name,
            "device": spec.device,
            "host_arch": spec.host_arch,
            "inputs": inputs,
            "outputs": outputs,
            "passes": pass_names,
            "versions": {"edgec": __version__, "onnx": onnx.__version__},
            "source": {"path": str(model_path), "sha256": sha256_file(model_path)},
            "built_on": platform.machine(),
        }
        if opts.build:
            from edgec.targets import backend

            built = backend.build(final, spec, tmp / LIBRARY, opts.target_options,
                                  use_tuning_db=opts.use_tuning_db)
            timings.update({f"tvm_{k}": v for k, v in built.timings.to_json().items()})
            manifest["tvm_target"] = built.tvm_target
            manifest["versions"]["tvm"] = backend.tvm_version()
            manifest["library"] = LIBRARY
            # per fused function: its kernel or why it kept plain loops; the tuning database;
            # QDQ layers: the integer ISA, how many got integer kernels, why others stayed float
            report["kernels"] = built.record.kernel_summary()
        timings["total_s"] = time.perf_counter() - t_start
        write_json(tmp / REPORT, report)
        manifest["files"] = file_hashes(tmp)  # verified when the artifact is loaded
        write_json(tmp / MANIFEST, manifest)
        if opts.build and spec.runs_on_host():
            _load_once(tmp)
    return report


def _load_once(folder: Path) -> None:
    """Load the library as ``Session`` will: a compile never reports success for an artifact
    that does not load."""
    from edgec.runtime import Session

    try:
        Session(folder)
    except EdgecError as e:
        why = str(e).split(": ", 1)[-1] if str(folder) in str(e) else str(e)
        raise EdgecError(f"the built library does not load ({why}): nothing written") from None
