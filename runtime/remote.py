"""Run an artifact on a board through TVM's RPC tracker (numpy + TVM only, like the rest of
:mod:`edgec.runtime`).

The board runs TVM's own server, ``python -m tvm.exec.rpc_server --tracker HOST:9190 --key
rpi4`` (or ``edgec board --emulate``); beside the compiler runs ``python -m
tvm.exec.rpc_tracker --port 9190``. :class:`RemoteSession` asks the tracker for a board of
that key, uploads ``model.so`` (after checking it against the manifest, as :class:`Session`
does), and runs it there with the same ``run(output_names, feeds)`` interface; ``timer``
uses TVM's time evaluator on the board.
"""

from __future__ import annotations

import os

from edgec.core.errors import EdgecError, one_line

from . import LIBRARY, _VmRunner

DESCRIBE = "edgec.board.describe"
DEFAULT_SESSION_TIMEOUT = 1800


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a tracker."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgecError(f"--rpc takes the tracker's HOST:PORT (e.g. 127.0.0.1:9190), not "
                         f"{address!r}")
    return host, int(port)


def tracker_summary(address: str) -> dict:
    """The tracker's summary (its server list and queue per key)."""
    from tvm import rpc

    host, port = parse_address(address)
    try:
        return rpc.connect_tracker(host, port).summary()
    except Exception as e:  # noqa: BLE001 - the FFI raises a plain RuntimeError/TVMError
        raise EdgecError(f"cannot reach the RPC tracker at {host}:{port} ({one_line(e, 120)}); "
                         "start one with `python -m tvm.exec.rpc_tracker --port "
                         f"{port}`") from None


def boards(address: str, key: str) -> int:
    """How many boards the tracker has registered under ``key`` (busy or free)."""
    return sum(1 for s in tracker_summary(address).get("server_info", [])
               if str(s.get("key", "")) == f"server:{key}")


def connect(address: str, key: str, session_timeout: float = DEFAULT_SESSION_TIMEOUT,
            priority: int = 1):
    """An RPC session on a board of ``key`` (waits while all of them are busy)."""
    from tvm import rpc

    if not key:
        raise EdgecError("--rpc needs --key: the key the board registered under")
    summary = tracker_summary(address)
    known = {str(s.get("key", "")).split(":", 1)[-1] for s in summary.get("server_info", [])}
    if key not in known:
        have = ", ".join(sorted(k for k in known if k)) or "none"
        raise EdgecError(f"no board is registered under key '{key}' at the tracker {address} "
                         f"(keys there: {have}); on the board run `python -m "
                         f"tvm.exec.rpc_server --tracker {address} --key {key}` or here "
                         f"`edgec board --emulate --tracker {address} --key {key}`")
    host, port = parse_address(address)
    try:
        return rpc.connect_tracker(host, port).request(key, priority=priority,
                                                       session_timeout=session_timeout)
    except Exception as e:  # noqa: BLE001
        raise EdgecError(f"cannot open a session on a '{key}' board via {address}: "
                         f"{one_line(e, 200)}") from None


def describe(remote) -> str | None:
    """What the board says it is (an emulated board says so), or ``None``."""
    try:
        return str(remote.get_function(DESCRIBE)())
    except Exception:  # noqa: BLE001 - a real board's plain TVM server has no such function
        return None


class RemoteSession(_VmRunner):
    """Run a compiled artifact on a board of ``key`` registered with the tracker ``rpc``."""

    def __init__(self, artifact: str | os.PathLike, rpc: str, key: str,
                 session_timeout: float = DEFAULT_SESSION_TIMEOUT):
        import tvm

        self._tvm = tvm
        self._read(artifact)
        if self.manifest["device"] != "cpu":
            raise EdgecError(f"artifact {self.path} is for a {self.manifest['device']} device; "
                             "RPC runs CPU artifacts (arm64, rpi4, rpi5, x86)")
        lib_path = self._library()
        self.address, self.key = rpc, key
        self.remote = connect(rpc, key, session_timeout)
        self.board = describe(self.remote)
        self.device = self.remote.cpu()
        try:
            self.remote.upload(str(lib_path))
            lib = self.remote.load_module(LIBRARY)
        except Exception as e:  # noqa: BLE001
            raise EdgecError(f"the '{key}' board cannot load {lib_path} (compiled for "
                             f"{self.manifest.get('host_arch') or 'this host'}): "
                             f"{one_line(e, None, last=True)}") from None
        self._load_vm(lib, f"{lib_path} (on the '{key}' board)")

    @property
    def where(self) -> str:
        """A label for results: the board and whether it is an emulator."""
        return f"'{self.key}' board via {self.address}" + (f" [{self.board}]" if self.board
                                                           else "")
