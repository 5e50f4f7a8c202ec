"""``edgec passes``: the registered passes, their options, and the presets."""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("passes", help="list passes and presets").set_defaults(fn=run)


def run(a) -> int:
    import dataclasses

    from edgec.driver.pipeline import PRESETS
    from edgec.passes import list_passes

    for info in list_passes():
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(info.config_cls))
        calib = " [needs --calib]" if info.needs_calib else ""
        print(f"{info.name:<20} {info.summary}{calib}")
        if fields:
            print(f"{'':<20}   options: {fields}")
    print("\npresets:")
    for name, passes in sorted(PRESETS.items()):
        print(f"  {name:<18} {', '.join(passes) or '(no passes)'}")
    return 0
