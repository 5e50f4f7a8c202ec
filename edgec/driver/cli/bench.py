"""``edgec bench MODEL.onnx ARTIFACT``: latency of onnxruntime and the artifact, same run."""

from __future__ import annotations

from ._args import add_board_args, add_model_and_artifact, add_threads, board_of, write_json


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="latency of onnxruntime vs the artifact, same run")
    add_model_and_artifact(b)
    add_threads(b)
    add_board_args(b)
    b.add_argument("--repeat", type=int, default=20)
    b.add_argument("--profile", action="store_true",
                   help="also each fused function's time, share, GFLOP/s and kernel, beside "
                   "onnxruntime's per-node profile")
    b.add_argument("--top", type=int, default=15, help="profile rows shown (default 15)")
    b.add_argument("--peer-cpu", metavar="FAMILY",
                   help="run onnxruntime as on that x86 CPU family (e.g. haswell: AVX-512, "
                   "VNNI and AMX hidden from it, as for an artifact built with -mcpu haswell); "
                   "needs CPUID faulting (Linux, flag cpuid_fault)")
    b.add_argument("--json", metavar="FILE")
    b.set_defaults(fn=run)


def run(a) -> int:
    from edgec.driver.bench import bench, format_bench

    res = bench(a.model, a.artifact, threads=a.threads, repeat=a.repeat, board=board_of(a),
                profile=a.profile, peer_cpu=a.peer_cpu)
    print(format_bench(res))
    if res.get("profile"):
        from edgec.driver.profile import format_profile

        print(format_profile(res["profile"], a.top))
    write_json(a.json, res)
    return 0
