"""``edgec zoo NAME OUT.onnx``: a model of the seeded zoo, exported to ONNX."""

from __future__ import annotations

from edgec.core.errors import EdgecError, one_line


def add_parser(sub) -> None:
    z = sub.add_parser("zoo", help="export a model of the seeded zoo to ONNX")
    z.add_argument("name")
    z.add_argument("output", metavar="OUT.onnx")
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--batch", type=int, default=1, help="0: dynamic batch axis")
    z.set_defaults(fn=run)


def run(a) -> int:
    from edgec.models import zoo

    if a.name not in zoo.names():
        raise EdgecError(f"unknown zoo model '{a.name}' (known: {', '.join(zoo.names())})")
    try:
        path = zoo.export(a.name, a.output, seed=a.seed, batch=a.batch or None)
    except ImportError as e:
        raise EdgecError(one_line(e, None)) from None
    print(f"wrote {a.name} (seed {a.seed}, batch {a.batch or 'dynamic'}) to {path}")
    return 0
