"""Run passes in order, name the pass that broke or drifted, collect the reports.

Presets are data: a name -> the ordered pass list. ``--passes`` replaces the preset's list,
``--set pass.key=value`` configures any pass in it.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field

import numpy as np
import onnx

from edgec.core.errors import EdgecError, PassDriftError
from edgec.core.importer import name_nodes, random_feeds
from edgec.passes import PassContext, PassReport, get_pass, make_config, run_pass

# Normalization passes run first in every preset: they make the graph what later passes and
# the backend expect (constants folded, no identities, BN folded, no dead nodes).
NORMALIZE = ["fold-constants", "split-variadic", "eliminate-identity", "fold-bn", "cleanup"]

PRESETS: dict[str, list[str]] = {
    "default": NORMALIZE,
    "none": [],
}


def resolve_passes(preset: str | None, passes: list[str] | None) -> list[str]:
    """The pass list: the preset's (default: ``default``); ``--passes`` replaces it, after the
    normalization passes -- unless the preset is ``none``, which runs exactly ``--passes``."""
    if preset is not None and preset not in PRESETS:
        raise EdgecError(f"unknown preset '{preset}' (known: {', '.join(sorted(PRESETS))})")
    if passes is not None:
        head = [] if preset == "none" else NORMALIZE
        names = head + [p for p in passes if p and p not in head]
    else:
        names = list(PRESETS[preset or "default"])
    for n in names:
        get_pass(n)  # raises for unknown names
    return names


def parse_sets(sets: list[str] | None, pass_names: list[str]) -> dict[str, dict[str, str]]:
    """``["lowrank.energy=0.9", ...]`` -> ``{"lowrank": {"energy": "0.9"}}``."""
    out: dict[str, dict[str, str]] = {}
    for s in sets or []:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise EdgecError(f"bad --set '{s}': expected PASS.KEY=VALUE")
        lhs, value = s.split("=", 1)
        pname, key = lhs.rsplit(".", 1)
        get_pass(pname)
        if pname not in pass_names:
            raise EdgecError(f"--set {lhs}: pass '{pname}' is not in this pipeline "
                             f"({', '.join(pass_names) or 'no passes'})")
        out.setdefault(pname, {})[key] = value
    return out


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    reports: list[PassReport] = field(default_factory=list)
    verification: list[dict] = field(default_factory=list)


class Pipeline:
    """An ordered list of configured passes.

    With ``verify=True`` every pass's output model is run in onnxruntime on the verification
    feeds (the first calibration rows, else seeded random inputs) and compared with the
    previous model's outputs against the pass's declared tolerance; the first pass that
    drifts raises :class:`PassDriftError` naming it.
    """

    def __init__(self, passes: list[str], sets: dict[str, dict[str, str]] | None = None,
                 verify: bool = False, calib: dict[str, np.ndarray] | None = None,
                 verify_rows: int = 8, seed: int = 0, target=None):
        sets = sets or {}
        self.steps = [(name, make_config(name, sets.get(name))) for name in passes]
        self.verify = verify
        self.ctx = PassContext(calib=calib, seed=seed, target=target)
        self.verify_rows = verify_rows

    def _verify_feeds(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        if self.ctx.calib:
            return {k: v[: self.verify_rows] for k, v in self.ctx.calib.items()}
        return random_feeds(model, seed=self.ctx.seed)

    def run(self, model: onnx.ModelProto) -> PipelineResult:
        names = [n.name for n in model.graph.node]
        if "" in names or len(set(names)) != len(names):
            # passes report and rewrite per node name: name a copy (the input stays as is)
            model = copy.deepcopy(model)
            name_nodes(model)
        result = PipelineResult(model)
        feeds = ref = None
        if self.verify:
            from edgec.runtime import OrtSession, run_batched

            from edgec.passes._calib import fixed_batch

            feeds = self._verify_feeds(model)
            batch = fixed_batch(model)  # a model with a fixed batch is fed chunks of it
            ref = run_batched(OrtSession(model), feeds, batch)
        for name, config in self.steps:
            new, report = run_pass(name, result.model, config, self.ctx)
            result.reports.append(report)
            if self.verify and report.modified:
                from edgec.runtime import OrtSession, run_batched
                from edgec.runtime.compare import output_stats

                tol = get_pass(name).tolerance
                try:
                    got = run_batched(OrtSession(new), feeds, batch)
                except EdgecError as e:
                    raise PassDriftError(name, f"its output model does not run: {e}") from None
                entry = {"pass": name, "tolerance": tol.to_json(), "outputs": {}}
                for oname, r, g in zip(_names(new), ref, got):
                    st = output_stats(r, g)
                    entry["outputs"][oname] = st
                    ok = (np.allclose(g, r, rtol=tol.rtol, atol=tol.atol)
                          or st["cosine"] >= tol.min_cosine) and np.isfinite(st["max_abs"])
                    if not ok:
                        raise PassDriftError(name, f"output '{oname}' max_abs={st['max_abs']:.3g}"
                                             f", cosine={st['cosine']:.6f} (tolerance rtol="
                                             f"{tol.rtol}, atol={tol.atol}, min_cosine="
                                             f"{tol.min_cosine})")
                result.verification.append(entry)
                ref = got
            result.model = new
        return result


def _names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]
