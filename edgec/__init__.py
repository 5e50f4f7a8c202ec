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

from .core.errors import EdgecError  # noqa: E402,F401
