"""An emulated aarch64 board on an x86-64 machine, served to TVM's RPC tracker.

What a Raspberry Pi or Jetson runs (``python -m tvm.exec.rpc_server --tracker HOST:9190
--key rpi4``), run here under qemu user mode: an arm64 Debian Python unpacked into a sysroot,
the aarch64 ``apache-tvm`` / ``apache-tvm-ffi`` wheels (the versions this machine has) and
their pure dependencies unpacked into a ``site`` folder, and TVM's own RPC server started
by :data:`SERVER` (which also answers ``edgec.board.describe``, so that a timing says it
came from an emulator). Installed once into ``$EDGEC_CACHE/board/aarch64`` or
``$EDGEC_EMULATOR`` (``edgec board --install``; ``.ci/run`` does it); the arm64 packages
come from the system's Debian archive (``dpkg --add-architecture arm64``, root), the wheels
from the package index.

Emulated times are instruction-by-instruction translation on an x86 core: they say nothing
about a Cortex-A72's speed. Numerics are the board's (the same aarch64 code runs).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgec.core.errors import EdgecError

QEMU = "qemu-aarch64-static"
QEMU_PKG = "qemu-user-static"
PYTHON = "python3.11"
# arm64 Debian 12 packages a Python 3.11 with TVM's runtime needs.
DEBS = ("libc6", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11-minimal",
        "libexpat1", "zlib1g", "libffi8", "libssl3", "libgcc-s1", "libstdc++6", "libbz2-1.0",
        "liblzma5", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libuuid1",
        "libcrypt1", "libdb5.3", "libgomp1", "libzstd1")
# Wheels for the board: TVM at this machine's versions, and what its RPC server imports.
PINNED = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions")
UNPINNED = ("cloudpickle", "psutil")
MARKER = "installed.txt"
DESCRIBE = "edgec.board.describe"

# The board's server: TVM's RPC server loop (as ``tvm.exec.rpc_server``), with one more
# function registered so that clients can tell an emulator from a board.
SERVER = '''\
"""edgec's emulated board: TVM's RPC server under qemu user mode."""
import argparse
import platform


def _init():
    import tvm

    @tvm.register_global_func("edgec.board.describe", override=True)
    def _describe():
        return ("emulated aarch64 (qemu user mode on an x86-64 host): times are emulation, "
                "not a board's; python " + platform.python_version())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tracker", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--port-end", type=int, default=9199)
    a = p.parse_args()
    from tvm.rpc import server

    _init()
    host, port = a.tracker.rsplit(":", 1)
    # rpc.Server would start the loop in a fresh interpreter (sys.executable), which the x86
    # kernel cannot exec without binfmt_misc: run the same loop in this process instead (each
    # session still forks, as on a board).
    state = server.PopenRPCServerState(a.host, a.port, a.port_end, key=a.key,
                                       tracker_addr=(host, int(port)))
    print(f"emulated board serving key {a.key!r} on port {state.port}", flush=True)
    state.thread.join()


if __name__ == "__main__":
    main()
'''


@dataclass(frozen=True)
class Emulator:
    root: Path

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / PYTHON

    def installed(self) -> bool:
        return (self.root / MARKER).is_file() and self.python.is_file() and \
            (self.site / "tvm").is_dir() and shutil.which(QEMU) is not None

    def command(self, *args: str) -> list[str]:
        """argv running the board's Python with ``args``."""
        return [shutil.which(QEMU) or QEMU, "-L", str(self.sysroot), str(self.python), *args]

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PYTHONPATH"] = str(self.site)
        env["PYTHONNOUSERSITE"] = "1"
        env["TVM_FFI_DISABLE_TORCH_C_DLPACK"] = "1"
        return env


def default_root() -> Path:
    """``$EDGEC_EMULATOR``, else ``$EDGEC_CACHE/board/aarch64`` (default ``~/.cache/edgec``)."""
    if os.environ.get("EDGEC_EMULATOR"):
        return Path(os.environ["EDGEC_EMULATOR"])
    from edgec.targets.tuning_db import cache_root

    return cache_root() / "board" / "aarch64"


def emulator(root: str | os.PathLike | None = None) -> Emulator:
    return Emulator(Path(root) if root else default_root())


def missing_reason(emu: Emulator | None = None) -> str | None:
    """Why the emulated board cannot run here (``None``: it can)."""
    emu = emu or emulator()
    if os.uname().machine != "x86_64":
        return f"the aarch64 emulator is for x86-64 hosts, this one is {os.uname().machine}"
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install {QEMU_PKG}; or `edgec board --install`)"
    if not emu.installed():
        return f"the emulated board is not installed in {emu.root} (run `edgec board --install`)"
    return None


def _run(cmd: list[str], what: str, **kw) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        raise EdgecError(f"{what} failed: {tail[0][:300]}")


def _sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"]
    raise EdgecError("installing the emulator's system packages needs root (or sudo)")


def _apt_setup() -> None:
    """qemu user mode and the arm64 architecture in dpkg (for ``apt-get download``)."""
    if shutil.which("dpkg") is None or shutil.which("apt-get") is None:
        raise EdgecError("installing the emulated board needs a Debian/Ubuntu host (apt-get)")
    arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                            text=True).stdout.split()
    need_qemu = shutil.which(QEMU) is None
    if "arm64" not in arches:
        _run(_sudo() + ["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64")
    if "arm64" not in arches or need_qemu:
        _run(_sudo() + ["apt-get", "update", "-qq"], "apt-get update")
    if need_qemu:
        _run(_sudo() + ["apt-get", "install", "-y", "-qq", QEMU_PKG], f"installing {QEMU_PKG}",
             env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def _wheels(dest: Path) -> list[str]:
    specs = []
    for name in PINNED:
        try:
            specs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            specs.append(name)
    specs += list(UNPINNED)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
          "--python-version", "3.11", "--implementation", "cp", "-d", str(dest), *specs],
         "downloading the aarch64 wheels")
    return specs


def install(root: str | os.PathLike | None = None, log=print) -> Emulator:
    """Install the emulated board (idempotent): qemu, an arm64 Python sysroot, TVM wheels."""
    emu = emulator(root)
    if emu.installed():
        log(f"emulated board already installed in {emu.root}")
        return emu
    if os.uname().machine != "x86_64":
        raise EdgecError(f"the aarch64 emulator is for x86-64 hosts, not {os.uname().machine}")
    _apt_setup()
    emu.root.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".aarch64-", dir=emu.root.parent))
    try:
        debs, wheels = stage / "debs", stage / "wheels"
        debs.mkdir()
        log(f"downloading {len(DEBS)} arm64 Debian packages")
        _run(["apt-get", "download", "-q", *[f"{d}:arm64" for d in DEBS]],
             "apt-get download (arm64 packages)", cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(stage / "sysroot")], f"unpacking {deb.name}")
        log("downloading the aarch64 wheels")
        specs = _wheels(wheels)
        import zipfile

        for whl in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(stage / "site")
        (stage / "site" / "edgec_board_server.py").write_text(SERVER)
        shutil.rmtree(debs)
        shutil.rmtree(wheels)
        (stage / MARKER).write_text("\n".join(specs) + "\n")
        if emu.root.exists():
            shutil.rmtree(emu.root)
        os.rename(stage, emu.root)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    probe = subprocess.run(emu.command("-c", "import tvm, numpy; print(tvm.__version__)"),
                           env=emu.env(), capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        raise EdgecError("the emulated board's Python cannot import TVM: "
                         f"{(probe.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    log(f"emulated board installed in {emu.root} (TVM {probe.stdout.strip()} under {QEMU})")
    return emu


def serve(tracker: str, key: str, root: str | os.PathLike | None = None,
          threads: int | None = None, quiet: bool = False) -> subprocess.Popen:
    """Start the emulated board as an RPC server registered with ``tracker`` under ``key``;
    returns the process (it runs until killed)."""
    emu = emulator(root)
    reason = missing_reason(emu)
    if reason:
        raise EdgecError(f"cannot start the emulated board: {reason}")
    # the SERVER source of this edgec, whatever the installed copy says
    script = emu.site / "edgec_board_server.py"
    if not script.is_file() or script.read_text() != SERVER:
        tmp = script.with_name(f".{script.name}.{os.getpid()}")
        tmp.write_text(SERVER)
        os.replace(tmp, script)
    env = emu.env()
    if threads:
        env["TVM_NUM_THREADS"] = str(threads)
    return subprocess.Popen(emu.command("-m", "edgec_board_server", "--tracker", tracker,
                                        "--key", key), env=env,
                            stdout=subprocess.DEVNULL if quiet else None,
                            stderr=subprocess.DEVNULL if quiet else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBoards:
    """TVM's RPC tracker on a free loopback port and emulated boards registered with it (for
    the tests and the benchmarks); ``close()`` kills the boards, the sessions they forked and
    the tracker."""

    def __init__(self):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
             str(self.port), "--port-end", str(self.port + 1), "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]

    def add(self, key: str, threads: int | None = None, timeout: float = 300.0) -> None:
        from edgec.runtime.remote import boards

        want = boards(self.address, key) + 1 if self._tracker_up() else 1
        self.procs.append(serve(self.address, key, threads=threads, quiet=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[-1].poll() is not None:
                raise RuntimeError("the emulated board exited")
            if self._tracker_up() and boards(self.address, key) >= want:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the emulated board did not register within {timeout} s")

    def _tracker_up(self) -> bool:
        from edgec.core.errors import EdgecError
        from edgec.runtime.remote import tracker_summary

        try:
            tracker_summary(self.address)
            return True
        except EdgecError:
            return False

    def close(self) -> None:
        """Kill the boards (and the session processes they forked) and the tracker."""
        try:
            import psutil
        except ImportError:
            psutil = None
        for p in reversed(self.procs):
            kids = []
            if psutil is not None:
                try:
                    kids = psutil.Process(p.pid).children(recursive=True)
                except psutil.Error:
                    pass
            p.kill()
            for k in kids:
                try:
                    k.kill()
                except psutil.Error:
                    pass
            p.wait()
        self.procs = []
