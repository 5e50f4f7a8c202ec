"""Target specs and their registry (no TVM here): :class:`TargetSpec`, the options a target
accepts (:data:`OPTIONS`), :func:`register_target` / :func:`get_target` / :func:`list_targets`."""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field
from typing import Callable

from edgec.core.errors import EdgecError


@dataclass(frozen=True)
class TargetOption:
    """A target option (``target_options`` key) and the command-line flag it comes from."""

    name: str      # target_options key, e.g. "cuda_arch"
    flag: str      # e.g. "--cuda-arch"
    help: str


OPTIONS: dict[str, TargetOption] = {o.name: o for o in (
    TargetOption("mcpu", "--mcpu", "override the target CPU (LLVM -mcpu)"),
    TargetOption("cuda_arch", "--cuda-arch",
                 "CUDA compute capability, e.g. sm_87 (cuda targets)"),
)}


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
    options: tuple[str, ...] = ()    # target options it accepts (keys of OPTIONS)

    def option_specs(self) -> list[TargetOption]:
        """The declared options, with their flags and help."""
        return [OPTIONS[name] for name in self.options]

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
        if self.host_arch != platform.machine():
            return False
        if self.device == "cuda":
            from .device import cuda_present  # (imports TVM: only when asked)

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


def all_options() -> list[TargetOption]:
    """Every option some target declares (for the command line's flags)."""
    used = {name for spec in _TARGETS.values() for name in spec.options}
    return [o for name, o in OPTIONS.items() if name in used]
