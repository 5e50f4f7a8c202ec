"""edgec: an ONNX graph-rewriting compiler for CNNs on edge devices.

Two layers, imports going one way (the ground never imports the roof):

* :mod:`edgec.core`     -- the ground: errors, the ONNX graph helpers, model statistics, the
  importer (load and normalize any exported ONNX model). :mod:`edgec.passes`,
  :mod:`edgec.targets` and :mod:`edgec.runtime` build on it and nothing above it;
* :mod:`edgec.passes`   -- graph rewrites, one pure function per file, registered by name;
* :mod:`edgec.targets`  -- TVM targets (x86, arm, cuda/jetson), their pipelines and builds;
* :mod:`edgec.runtime`  -- the artifact, runners (TVM and onnxruntime), comparison statistics;
* :mod:`edgec.driver`   -- the roof: the pass pipeline, the compiler, check, bench and the
  command line (:mod:`edgec.driver.cli`, one module per subcommand).
"""

__version__ = "0.1.0"

import sys as _sys
from importlib.abc import MetaPathFinder as _MetaPathFinder


class _NoTorchForTvmFfi(_MetaPathFinder):
    """``tvm_ffi`` (and ``tvm.relax``) import torch at their own import when torch is
    installed, for a DLPack exchange with torch tensors that edgec never makes: 2-3 s of
    every process that loads TVM (a CLI call, a bench or check worker). Torch is refused to
    imports made by TVM's own modules (they catch the ImportError); anything else -- the
    zoo's exporters -- imports it as usual, before or after."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        f = _sys._getframe(1)
        while f is not None and f.f_globals.get("__name__", "").startswith("importlib"):
            f = f.f_back
        if f is not None and f.f_globals.get("__name__", "").split(".")[0] in ("tvm_ffi", "tvm"):
            raise ImportError("edgec: torch is not loaded for tvm_ffi")
        return None


if not any(isinstance(f, _NoTorchForTvmFfi) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _NoTorchForTvmFfi())

from .core.errors import EdgecError  # noqa: E402,F401
