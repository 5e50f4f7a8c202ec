"""Measured tables into ``docs/results.md``: each benchmark script replaces its own section
(between ``<!-- BEGIN name -->`` and ``<!-- END name -->``) with what it printed, headed by
the date, the host's CPU and vector features and the commit it ran, so the file always says
where each figure came from. Sections of other scripts are left as they are."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "asimd", "asimddp")
HEADER = """# Measured results

Written by the benchmark scripts in `benchmarks/` (each replaces its own section when it
runs); every section names the date, the host CPU and its vector features, and the commit.
Timings are medians of runs where each runtime runs in its own process, onnxruntime in the
same run; ratios are onnxruntime ms / edgec ms (above 1: edgec faster) unless a table says
otherwise.
"""


def host() -> str:
    """``CPU model (nproc cores): flags`` of this machine."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags]
    return f"{model} ({os.cpu_count()} CPUs): {' '.join(have) or 'no vector flags seen'}"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return (rev or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record(name: str, title: str, body: str, command: str, path: Path = RESULTS) -> None:
    """Replace section ``name`` of ``path`` (appended when new) with ``body`` under ``title``."""
    stamp = (f"`{command}` -- {datetime.date.today().isoformat()}, {host()}, "
             f"commit {commit()}")
    section = (f"<!-- BEGIN {name} -->\n## {title}\n\n{stamp}\n\n{body.strip()}\n"
               f"<!-- END {name} -->")
    text = path.read_text() if path.is_file() else HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->",
                         re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    print(f"(recorded in {path.relative_to(ROOT)}, section '{name}')")


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def main_recorded(name: str, title: str, main, argv=None) -> int:
    """Run a benchmark's ``main(argv)`` with its stdout also captured, and record what it
    printed as section ``name`` of docs/results.md (``--no-record``: print only). Sections
    may depend on the arguments: ``name`` and ``title`` may be callables of the argv list."""
    import io
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    keep = "--no-record" not in argv
    argv = [a for a in argv if a != "--no-record"]
    buf = io.StringIO()
    out, sys.stdout = sys.stdout, _Tee(sys.stdout, buf)
    try:
        rc = main(argv)
    finally:
        sys.stdout = out
    if rc == 0 and keep:
        name = name(argv) if callable(name) else name
        title = title(argv) if callable(title) else title
        script = Path(sys.argv[0]).name
        record(name, title, buf.getvalue(),
               " ".join(["python", f"benchmarks/{script}", *argv]))
    return rc


def arg_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), else None."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None
