"""Target families, one module each (registered by :func:`edgec.targets._register_families`,
which imports every module here not starting with ``_``). A family module declares its
:class:`~edgec.targets.spec.TargetSpec` objects and imports no TVM at module level; shared
LLVM target-dict builders live in :mod:`._llvm`."""
