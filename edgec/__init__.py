"""edgec: an ONNX graph-rewriting compiler for CNNs on edge devices.

The stages, each in its own package:

* :mod:`edgec.importer` -- load and normalize any exported ONNX model;
* :mod:`edgec.passes`   -- graph rewrites, one pure function per file, registered by name;
* :mod:`edgec.pipeline` -- runs passes in order, verifies them, writes the compile report;
* :mod:`edgec.targets`  -- TVM targets (x86, arm, cuda/jetson), their pipelines and builds;
* :mod:`edgec.runtime`  -- the artifact, runners (TVM and onnxruntime), comparison statistics.
"""

__version__ = "0.1.0"

from .errors import EdgecError  # noqa: E402,F401
