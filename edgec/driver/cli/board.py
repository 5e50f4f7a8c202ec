"""``edgec board``: boards registered with TVM's RPC tracker, and an emulated one.

    edgec board --install                                   # qemu + arm64 Python + TVM, once
    edgec board --emulate --tracker 127.0.0.1:9190 --key rpi4   # serve until stopped
    edgec board --list --tracker 127.0.0.1:9190             # the boards a tracker has
"""

from __future__ import annotations

from edgec.core.errors import EdgecError


def add_parser(sub) -> None:
    b = sub.add_parser("board", help="an emulated aarch64 board for TVM's RPC tracker; list "
                       "the boards a tracker has")
    what = b.add_mutually_exclusive_group(required=True)
    what.add_argument("--emulate", action="store_true",
                      help="serve an emulated aarch64 board (qemu user mode) to --tracker "
                      "under --key until stopped (installs it first if needed)")
    what.add_argument("--install", action="store_true",
                      help="install the emulated board (qemu, an arm64 Python, TVM wheels)")
    what.add_argument("--list", action="store_true", help="the boards registered at --tracker")
    b.add_argument("--tracker", metavar="HOST:PORT",
                   help="TVM RPC tracker (python -m tvm.exec.rpc_tracker --port 9190)")
    b.add_argument("--key", help="the key to register under (e.g. rpi4)")
    b.add_argument("--threads", type=int, help="TVM threads on the emulated board")
    b.set_defaults(fn=run)


def run(a) -> int:
    from edgec.driver import board
    from edgec.runtime.remote import parse_address, tracker_summary

    if a.install:
        board.install()
        return 0
    if not a.tracker:
        raise EdgecError("--tracker HOST:PORT is needed (start one with `python -m "
                         "tvm.exec.rpc_tracker --port 9190`)")
    parse_address(a.tracker)
    if a.list:
        summary = tracker_summary(a.tracker)
        queue = summary.get("queue_info", {})
        servers = summary.get("server_info", [])
        if not servers:
            print(f"no boards at {a.tracker}")
        for s in servers:
            key = str(s.get("key", "")).split(":", 1)[-1]
            q = queue.get(key, {})
            print(f"{key:<16} {':'.join(map(str, s.get('addr', [])))}  "
                  f"(key {key}: {q.get('free', 0)} free, {q.get('pending', 0)} waiting)")
        return 0
    if not a.key:
        raise EdgecError("--emulate needs --key: the key the board registers under (e.g. rpi4)")
    if board.missing_reason():
        board.install()
    proc = board.serve(a.tracker, a.key, threads=a.threads)
    print(f"emulated aarch64 board for key '{a.key}' at tracker {a.tracker} (pid {proc.pid}); "
          "Ctrl-C stops it", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
