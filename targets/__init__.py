"""Compilation targets: the registry, and the layers below it.

A :class:`~.spec.TargetSpec` names a TVM target (a JSON dict in TVM 0.27), the cross compiler that
links its shared library, its Relax pipeline phases, its tuning defaults and the target
options it accepts (:data:`OPTIONS`). Target families are the modules of
:mod:`.families`, each registering its specs when imported; they are found by iterating that
package, so a new family is one new file there. Listing targets imports no TVM.

Modules without TVM: :mod:`.spec` (specs and registry), :mod:`.records` (what a build did),
:mod:`.families`. The TVM side, bottom up (imports go one way): :mod:`.device` ->
:mod:`.phases` (phases every target shares) -> :mod:`.tuning_db` (reading a tuning database)
-> :mod:`.cpu` (the LLVM CPU backend: ISA table, schedule helpers, kernels, rewrites,
default-schedule rules, pipeline) -> :mod:`.backend` (import, build, export) ->
:mod:`.tuning` (the MetaSchedule search).
"""

from __future__ import annotations

import importlib
import os
import pkgutil

# tvm_ffi otherwise JIT-builds a torch DLPack bridge into ~/.cache on first import of tvm.
os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")

from . import families  # noqa: E402
from .spec import (OPTIONS, TargetOption, TargetSpec, all_options, get_target,  # noqa: E402
                   list_targets, register_target)

__all__ = ["OPTIONS", "TargetOption", "TargetSpec", "all_options", "get_target",
           "list_targets", "register_target"]


def _register_families() -> None:
    """Import every module of :mod:`.families` not starting with ``_``: one family per file."""
    for mod in pkgutil.iter_modules(families.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{families.__name__}.{mod.name}")


_register_families()
