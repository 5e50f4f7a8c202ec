"""Runners with one interface, ``run(output_names, feeds) -> list[np.ndarray]``, like
onnxruntime's ``InferenceSession``:

* :class:`Session` runs a compiled artifact with the TVM runtime only (no onnx, no compiler),
  so the same code runs on a device;
* :class:`OrtSession` runs an ONNX model (file or proto) in onnxruntime.

Both take feeds whose batch differs from the compiled one: :func:`run_batched` splits them
into the compiled batch size (padding the last chunk) and concatenates the outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgec.core.errors import EdgecError, one_line

from .artifact import LIBRARY, ONNX, check_library, read_manifest, verify_file


class _Runner:
    input_specs: list[dict]
    output_specs: list[dict]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.input_specs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.output_specs]

    def get_inputs(self):
        return self.input_specs

    def get_outputs(self):
        return self.output_specs

    def _check_feeds(self, feeds: dict[str, np.ndarray], exact_shape: bool) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise EdgecError(f"missing input(s) {', '.join(missing)} (model inputs: "
                             f"{', '.join(self.input_names)})")
        extra = [n for n in feeds if n not in self.input_names]
        if extra:
            raise EdgecError(f"unknown input(s) {', '.join(extra)} (model inputs: "
                             f"{', '.join(self.input_names)})")
        arrays = []
        for spec in self.input_specs:
            a = np.asarray(feeds[spec["name"]])
            want = np.dtype(spec["dtype"])
            if a.dtype != want:
                # float64 -> float32 is fine; ints or bools silently turned into floats are not
                if a.dtype.kind == want.kind and np.can_cast(a.dtype, want, "same_kind"):
                    a = a.astype(want)
                else:
                    raise EdgecError(f"input '{spec['name']}' has dtype {a.dtype}, the model "
                                     f"takes {want}")
            shape = spec["shape"]
            if exact_shape and list(a.shape) != list(shape):
                raise EdgecError(f"input '{spec['name']}' has shape {list(a.shape)}, the "
                                 f"compiled model takes {list(shape)}")
            if not exact_shape and (a.ndim != len(shape) or any(
                    isinstance(s, int) and s > 0 and s != d
                    for s, d in zip(shape[1:], a.shape[1:]))):
                raise EdgecError(f"input '{spec['name']}' has shape {list(a.shape)}, the "
                                 f"model takes {list(shape)}")
            arrays.append(np.ascontiguousarray(a))
        return arrays

    def _check_output_names(self, output_names) -> list[str]:
        if output_names is None:
            return self.output_names
        if isinstance(output_names, str) or not all(isinstance(n, str) for n in output_names):
            raise EdgecError("output_names must be a list of output names or None")
        unknown = [n for n in output_names if n not in self.output_names]
        if unknown:
            raise EdgecError(f"unknown output(s) {', '.join(unknown)} (model outputs: "
                             f"{', '.join(self.output_names)})")
        return list(output_names)


def max_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(num_threads: int | None) -> int | None:
    """``None`` stays the default; more threads than CPUs are capped (they only contend)."""
    if num_threads is None:
        return None
    if not isinstance(num_threads, int) or num_threads < 1:
        raise EdgecError(f"the number of threads must be a positive integer, not {num_threads}")
    return min(num_threads, max_threads())


def default_threads() -> int:
    """Physical cores available to this process (psutil), else the CPUs it may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        import psutil

        return max(1, min(cpus, psutil.cpu_count(logical=False) or cpus))
    except ImportError:
        return cpus


class _VmRunner(_Runner):
    """What a local and a remote artifact run share: the Relax VM's ``main`` on a device."""

    manifest: dict
    device: object
    _vm: object
    _main: object

    def _read(self, artifact) -> None:
        self.path = Path(artifact)
        self.manifest = read_manifest(self.path)
        self.input_specs = self.manifest["inputs"]
        self.output_specs = self.manifest["outputs"]

    def _library(self) -> Path:
        """``model.so``, checked before any of its native code runs (loading runs it): there,
        of the sha256 the manifest records, a whole ELF of the manifest's architecture."""
        lib_path = self.path / LIBRARY
        if not lib_path.is_file():
            raise EdgecError(f"artifact {self.path} has no {LIBRARY}")
        verify_file(self.path, self.manifest, LIBRARY)
        check_library(lib_path, self.manifest.get("host_arch"))
        return lib_path

    @property
    def batch(self) -> int | None:
        shapes = [i["shape"] for i in self.input_specs]
        return shapes[0][0] if shapes and shapes[0] else None

    def _load_vm(self, lib, where: str) -> None:
        from tvm import relax

        try:
            self._vm = relax.VirtualMachine(lib, self.device)
            self._main = self._vm["main"]
        except Exception as e:  # noqa: BLE001 - a library that is not a Relax executable
            raise EdgecError(f"{where} is not an edgec/TVM model library: "
                             f"{one_line(e, None, last=True)}") from None

    def _call(self, args):
        try:
            return self._main(*args)
        except Exception as e:  # noqa: BLE001 - e.g. a manifest that does not match the library
            raise EdgecError(f"artifact {self.path}: the compiled model refused the inputs the "
                             f"manifest describes: {one_line(e, None, last=True)}") from None

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]
            ) -> list[np.ndarray]:
        output_names = self._check_output_names(output_names)
        arrays = self._check_feeds(feeds, exact_shape=True)
        args = [self._tvm.runtime.tensor(a, self.device) for a in arrays]
        outs = _flatten(self._call(args))
        if len(outs) != len(self.output_specs):
            raise EdgecError(f"compiled model returned {len(outs)} outputs, manifest lists "
                             f"{len(self.output_specs)}")
        by_name = {}
        for spec, o in zip(self.output_specs, outs):
            a = o.numpy()
            if a.ndim != len(spec["shape"]) or a.dtype != np.dtype(spec["dtype"]) or any(
                    d is not None and d != n for d, n in zip(spec["shape"], a.shape)):
                raise EdgecError(f"artifact {self.path}: output '{spec['name']}' is "
                                 f"{a.dtype}{list(a.shape)}, the manifest says "
                                 f"{spec['dtype']}{spec['shape']}: manifest and library "
                                 "do not match")
            by_name[spec["name"]] = a
        return [by_name[n] for n in output_names]

    def timer(self, feeds: dict[str, np.ndarray], number: int = 1):
        """A callable returning one latency in seconds per call, measured by the TVM runtime
        on the device (inputs already there: kernel time plus VM overhead)."""
        arrays = self._check_feeds(feeds, exact_shape=True)
        args = [self._tvm.runtime.tensor(a, self.device) for a in arrays]
        self._call(args)  # warm up
        self._vm.save_function("main", "edgec_bench", *args)
        evaluator = self._vm.time_evaluator("edgec_bench", self.device, number=number,
                                            repeat=1)
        return lambda: float(evaluator().results[0])


class Session(_VmRunner):
    """Run a compiled artifact folder with the TVM runtime."""

    def __init__(self, artifact: str | os.PathLike, device_id: int = 0,
                 num_threads: int | None = None):
        self._read(artifact)
        num_threads = check_threads(num_threads)
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
        kind = self.manifest["device"]
        if num_threads:
            os.environ["TVM_NUM_THREADS"] = str(num_threads)
        elif kind == "cpu":
            # TVM's own default on x86 is half the logical CPUs (it assumes hyper-threads):
            # one thread on a 2-vCPU machine, where MobileNetV2 int8 then ran 2.2 ms instead
            # of 1.0 ms. Use every core this process may run on, as onnxruntime does.
            os.environ.setdefault("TVM_NUM_THREADS", str(default_threads()))
        import tvm

        self._tvm = tvm
        self.device = tvm.cuda(device_id) if kind == "cuda" else tvm.cpu(device_id)
        if not self.device.exist:
            raise EdgecError(f"artifact {self.path} was compiled for target "
                             f"'{self.manifest['target']}' and needs a {kind} device, which "
                             "this machine does not have")
        import platform

        host = self.manifest.get("host_arch")
        if host and host != platform.machine():
            raise EdgecError(f"artifact {self.path} is a {host} library; this machine is "
                             f"{platform.machine()}: run it on the device (or over RPC, "
                             "--rpc HOST:PORT --key KEY)")
        lib_path = self._library()
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except Exception as e:  # noqa: BLE001
            raise EdgecError(f"cannot load {lib_path}: {one_line(e, None, last=True)}") from None
        self._load_vm(lib, str(lib_path))
        if num_threads:
            cfg = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
            if cfg is not None:
                cfg(0, int(num_threads))


def open_session(artifact: str | os.PathLike, num_threads: int | None = None,
                 rpc: str | None = None, key: str | None = None) -> _VmRunner:
    """The artifact here (:class:`Session`), or with ``rpc``/``key`` on a board registered
    with TVM's RPC tracker (:class:`~edgec.runtime.remote.RemoteSession`)."""
    if rpc or key:
        from .remote import RemoteSession

        return RemoteSession(artifact, rpc or "", key or "")
    return Session(artifact, num_threads=num_threads)


def where(runner) -> str:
    """Where a runner runs: ``here`` or the board (an emulated board says so)."""
    return getattr(runner, "where", "here")


def _flatten(res) -> list:
    if hasattr(res, "numpy"):
        return [res]
    out = []
    for r in res:
        out.extend(_flatten(r))
    return out


# Ops whose onnxruntime kernels compute in integers: with graph optimizations on,
# onnxruntime fuses DQ -> Conv/MatMul -> Q into QLinearConv / MatMulInteger, whose u8 x s8
# products go through ``vpmaddubsw`` on x86 CPUs without VNNI (AVX2, AVX-512BW): 16-bit pair
# sums that saturate (255 * 127 * 2 > 32767), so the same QDQ model gives different answers
# on different hosts. With optimizations off, every DequantizeLinear runs alone and the
# convolution in float: exact QDQ arithmetic (up to float rounding at ties) on any host.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                     "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear"})


def has_qdq(model) -> bool:
    """Whether an ONNX model (proto or path) holds quantized-arithmetic ops."""
    import onnx

    if not hasattr(model, "graph"):
        model = onnx.load(str(model), load_external_data=False)
    graphs = [model.graph] + [f for f in model.functions]
    return any(n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx", "com.microsoft")
               for g in graphs for n in g.node)


class OrtSession(_Runner):
    """Run an ONNX model in onnxruntime, with the same interface as :class:`Session`.

    ``optimize``: onnxruntime's graph optimizations. ``None`` (the default, for references):
    on, except for a model with quantize/dequantize ops, which runs with them off so that the
    result is the exact QDQ arithmetic on every host (see :data:`QDQ_OPS`); ``True`` is what
    a deployment of the model in onnxruntime runs on this host (for timing it, or for showing
    how far that is from exact)."""

    def __init__(self, model, num_threads: int | None = None, optimize: bool | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        num_threads = check_threads(num_threads)
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)
            opts.inter_op_num_threads = 1
        if optimize is None:
            try:
                optimize = not has_qdq(model)
            except Exception:  # noqa: BLE001 - onnxruntime says what is wrong with the file
                optimize = True
        self.optimized = bool(optimize)
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
        try:
            self._sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise EdgecError(f"onnxruntime cannot load the model: "
                             f"{one_line(e)}") from None
        self.input_specs = [_ort_spec(i) for i in self._sess.get_inputs()]
        self.output_specs = [_ort_spec(o) for o in self._sess.get_outputs()]

    def run(self, output_names, feeds):
        output_names = self._check_output_names(output_names)
        arrays = self._check_feeds(feeds, exact_shape=False)
        return self._sess.run(output_names, dict(zip(self.input_names, arrays)))


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
              "tensor(int16)": "int16", "tensor(uint16)": "uint16"}


def _ort_spec(arg) -> dict:
    return {"name": arg.name, "shape": [d if isinstance(d, int) else None for d in arg.shape],
            "dtype": _ORT_TYPES.get(arg.type, "float32")}


def run_batched(runner: _Runner, feeds: dict[str, np.ndarray], batch: int | None,
                output_names: list[str] | None = None) -> list[np.ndarray]:
    """Run ``feeds`` (any leading batch N) through a runner compiled for ``batch`` rows at a
    time: chunks of ``batch``, the last one padded by repeating its final row."""
    names = output_names or runner.output_names
    n = _leading(feeds)
    if n == 0:
        raise EdgecError("the input data holds 0 rows")
    if batch is None or batch <= 0 or n == batch:
        return runner.run(names, feeds)
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        part = {}
        rows = min(batch, n - start)
        for k, v in feeds.items():
            piece = v[start:start + rows]
            if rows < batch:
                pad = np.repeat(piece[-1:], batch - rows, axis=0)
                piece = np.concatenate([piece, pad], axis=0)
            part[k] = piece
        outs = runner.run(names, part)
        chunks.append([o[:rows] for o in outs])
    return [np.concatenate([c[i] for c in chunks], axis=0) for i in range(len(names))]


def _leading(feeds: dict[str, np.ndarray]) -> int:
    sizes = {np.asarray(v).shape[0] if np.asarray(v).ndim else 1 for v in feeds.values()}
    if len(sizes) != 1:
        raise EdgecError(f"inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise EdgecError(f"data file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise EdgecError(f"cannot read {p} as .npz: {one_line(e, None)}") from None


__all__ = ["Session", "OrtSession", "open_session", "where", "run_batched", "load_npz", "has_qdq",
           "LIBRARY", "ONNX"]
