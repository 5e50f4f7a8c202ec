"""The roof: what drives the passes and the targets.

* :mod:`edgec.driver.pipeline` -- runs passes in order, verifies them, the presets;
* :mod:`edgec.driver.compiler` -- import -> normalize -> passes -> TVM build -> artifact folder;
* :mod:`edgec.driver.check`    -- accuracy regression against onnxruntime;
* :mod:`edgec.driver.bench`    -- latency of onnxruntime vs the artifact;
* :mod:`edgec.driver.cli`      -- the ``edgec`` command line, one module per subcommand.

Nothing below (``edgec.core``, passes, targets, runtime) imports this package.
"""
