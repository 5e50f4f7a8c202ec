"""The ground layer: what :mod:`edgec.passes`, :mod:`edgec.targets` and :mod:`edgec.runtime`
may import.

* :mod:`edgec.core.errors`   -- user-facing errors and :func:`~edgec.core.errors.one_line`;
* :mod:`edgec.core.graph`    -- small ONNX graph helpers (attributes, names, provenance);
* :mod:`edgec.core.stats`    -- parameter, MAC and byte counts of a model;
* :mod:`edgec.core.importer` -- load and normalize any exported ONNX model.

Nothing here imports :mod:`edgec.driver`, a pass, a target or the runtime.
"""
