"""``edgec targets``: the registered targets."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("targets", help="list targets").set_defaults(fn=run)


def run(a) -> int:
    from edgec.targets import list_targets

    for spec in list_targets():
        tc = f" (links with {spec.cross_compiler})" if spec.cross_compiler else ""
        print(f"{spec.name:<12} {spec.family:<5} {spec.description}{tc}")
    return 0
