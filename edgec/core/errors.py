"""Errors a user can cause. The CLI prints them as one line and exits 2.

:func:`one_line` is the one way to turn an exception (or any error text: a native library's,
a subprocess's stderr) into the single line such an error message carries.
"""

from __future__ import annotations


class EdgecError(Exception):
    """A user-facing error: bad input, bad option, unsupported model."""


class UnsupportedOpError(EdgecError):
    def __init__(self, op_type: str, node_name: str, where: str = "the TVM ONNX frontend"):
        self.op_type = op_type
        self.node_name = node_name
        super().__init__(f"unsupported op '{op_type}' at node '{node_name}' "
                         f"(not handled by {where})")


class PassError(EdgecError):
    """A pass raised or produced an invalid model; names the pass."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}' failed: {message}")


class PassDriftError(EdgecError):
    """--verify found outputs drifting beyond a pass's declared tolerance."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}' drifted beyond its tolerance: {message}")


def one_line(text: object, limit: int | None = 300, *, last: bool = False) -> str:
    """One line of ``text`` (an exception or a string): its first non-blank line, stripped, or
    its last one with ``last=True`` (where tracebacks and native errors put the cause); cut to
    ``limit`` characters (``None``: not cut). Empty text gives ``""``."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1] if last else lines[0]
    return line if limit is None else line[:limit]
