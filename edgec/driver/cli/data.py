"""``edgec data DATASET OUT.npz``: a labeled .npz from a locally installed dataset."""

from __future__ import annotations

from edgec.core.errors import EdgecError, one_line


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="write a labeled .npz from a locally installed dataset")
    d.add_argument("dataset", help="fashion-mnist (Debian package dataset-fashion-mnist)")
    d.add_argument("output", metavar="OUT.npz")
    d.add_argument("--n", type=int, help="first N samples (default: all)")
    d.add_argument("--split", default="test", choices=["test", "train"])
    d.set_defaults(fn=run)


def run(a) -> int:
    from edgec.models import fashion_mnist

    if a.dataset != "fashion-mnist":
        raise EdgecError(f"unknown dataset '{a.dataset}' (known: fashion-mnist)")
    try:
        path = fashion_mnist.write_npz(a.output, n=a.n, split=a.split)
    except FileNotFoundError as e:
        raise EdgecError(one_line(e, None)) from None
    print(f"wrote {a.n or 'all'} {a.split} samples of {a.dataset} to {path}")
    return 0
