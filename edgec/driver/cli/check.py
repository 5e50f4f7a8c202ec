"""``edgec check MODEL.onnx ARTIFACT --data VAL.npz``: accuracy regression against
onnxruntime; exits 1 when a threshold fails."""

from __future__ import annotations

from ._args import add_board_args, add_model_and_artifact, add_threads, board_of, write_json


def add_parser(sub) -> None:
    k = sub.add_parser("check", help="accuracy regression against onnxruntime")
    add_model_and_artifact(k)
    k.add_argument("--data", required=True, metavar="VAL.npz",
                   help="one array per model input name, optional 'labels'")
    k.add_argument("--max-drop", type=float, help="max accuracy drop in points (needs labels)")
    k.add_argument("--min-cosine", type=float, default=0.99,
                   help="min cosine similarity of each output vs the original (default 0.99)")
    k.add_argument("--atol", type=float, help="also require allclose(atol, rtol)")
    k.add_argument("--rtol", type=float, default=0.0)
    k.add_argument("--min-top1", type=float, help="min top-1 agreement with the original")
    k.add_argument("--limit", type=int, help="use the first N samples")
    k.add_argument("--output", metavar="NAME",
                   help="the class-score output for top-1 and accuracy (default: the first)")
    add_threads(k)
    add_board_args(k)
    k.add_argument("--json", metavar="FILE", help="write the results as JSON")
    k.set_defaults(fn=run)


def run(a) -> int:
    from edgec.driver.check import check, format_table

    res = check(a.model, a.artifact, a.data, max_drop=a.max_drop, min_cosine=a.min_cosine,
                atol=a.atol, rtol=a.rtol, min_top1=a.min_top1, limit=a.limit,
                threads=a.threads, output=a.output, board=board_of(a))
    print(format_table(res))
    write_json(a.json, res)
    return 0 if res["ok"] else 1
