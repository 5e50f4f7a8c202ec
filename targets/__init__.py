"""Compilation targets. One file per family: :mod:`.x86`, :mod:`.arm`, :mod:`.cuda`.

A :class:`TargetSpec` names a TVM target (a JSON dict in TVM 0.27), the cross compiler that
links its shared library, its Relax pipeline phases and its tuning defaults. TVM is imported
lazily (only here and in :mod:`edgec.runtime`), so listing targets is cheap.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Callable

from edgec.core.errors import EdgecError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    family: str                      # "x86" | "arm" | "cuda"
    description: str
    make_target: Callable[[dict], dict]   # options -> TVM target JSON dict
    phases: Callable[..., list]           # (tvm Target, record dict) -> Relax phases
    device: str = "cpu"              # TVM device the artifact runs on: "cpu" | "cuda"
    cross_compiler: str | None = None     # None: the host's default C++ compiler
    cross_package: str | None = None      # Debian package that provides cross_compiler
    host_arch: str = "x86_64"        # ISA of the library's host code
    tuning: dict = field(default_factory=dict)
    options: tuple[str, ...] = ()    # target options the CLI accepts (e.g. cuda_arch)

    def tvm_target_dict(self, options: dict | None = None) -> dict:
        return self.make_target(dict(options or {}))

    def check_toolchain(self) -> None:
        if self.cross_compiler and shutil.which(self.cross_compiler) is None:
            raise EdgecError(f"target '{self.name}' links with {self.cross_compiler}, which is "
                             f"not installed (apt-get install {self.cross_package})")
        if self.device == "cuda" and shutil.which("nvcc") is None:
            raise EdgecError(f"target '{self.name}' needs nvcc (the CUDA toolkit) to emit "
                             "device code; none found on PATH")

    def runs_on_host(self) -> bool:
        import platform

        if self.host_arch != platform.machine():
            return False
        if self.device == "cuda":
            from .backend import cuda_present

            return cuda_present()
        return True


_TARGETS: dict[str, TargetSpec] = {}


def register_target(spec: TargetSpec) -> TargetSpec:
    _TARGETS[spec.name] = spec
    return spec


def get_target(name: str) -> TargetSpec:
    if name not in _TARGETS:
        raise EdgecError(f"unknown target '{name}' (known: {', '.join(sorted(_TARGETS))})")
    return _TARGETS[name]


def list_targets() -> list[TargetSpec]:
    return [_TARGETS[k] for k in sorted(_TARGETS)]


from . import arm, cuda, x86  # noqa: E402,F401  (register)
