"""``edgec compile --max-drop``: the most compressed model within an accuracy budget.

The search space is a ladder of settings per compressing pass (mild -> aggressive): a prune
ratio, a lowrank MAC budget (``model_mac_ratio``), a sparse density budget (``model_density``),
quantize with the layers most sensitive to int8 kept in float (a quarter, a tenth, three, one,
none: ranked once by the pass's per-layer sensitivity). The per-layer split of a budget is
each pass's own allocator (lowrank and sparse spend a model budget where their per-layer error
curves say it is cheapest; prune keeps one ratio per channel group); the search allocates
budgets *across* passes:

1. **sensitivity**: each pass alone, its ladder from mild to aggressive, until the confidence
   bound on the drop exceeds the budget;
2. **allocation**: a greedy on the sensitivity curves (largest objective gain per point of
   predicted drop, drops assumed additive) proposes one level per pass, then a **verification**
   run of the combined pipeline on the validation data; over budget -> the pass with the worst
   gain per point steps back; within -> each pass tries one step more (greedy ascent);
3. the chosen configuration is compiled as ``--passes ... --set ...`` would (the report records
   the settings, so the same command without ``--max-drop`` reproduces the model).

Every candidate is scored on ``val.npz`` in onnxruntime against the original model: accuracy
with a ``labels`` array (drop = paired difference in points), else top-1 disagreement with the
original (classifier outputs ``[N, C]``). The budget must hold on data the search did not see,
so a candidate is accepted only when the *one-sided upper confidence bound* of its drop
(default 95 %: the paired difference's normal bound, or Wilson's bound for a disagreement rate)
is within ``--max-drop``; the margin is stated in the output and ``search.json``.

Objectives: ``macs`` -- Conv/Gemm/MatMul multiply-accumulates, counting only nonzero weights
(what the sparse kernels execute; equal to the report's MACs without zeros); ``size`` -- the
bytes of the rewritten ``model.onnx``; ``latency`` -- the candidate compiled for the target and
timed (:class:`LatencyProbe`: median of repeated runs in a fresh process here, as ``edgec
bench`` times, or on a board over ``--rpc``). A build and a timing cost seconds to a minute, so
under ``latency`` only candidates whose drop bound is within the budget are compiled and timed
(the others can never be chosen; they stay in ``search.json`` with ``latency_ms: null`` and
off the frontier); the original model is compiled too, its latency the ratio's base. The greedy
works on measured times, so what the target runs faster (int8 where it has integer kernels,
low-rank pairs where they beat the dense layer) wins, not what has fewer MACs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.errors import EdgecError
from edgec.core.stats import model_stats

OBJECTIVES = ("macs", "size", "latency")
SEARCHABLE = ("prune", "lowrank", "sparse", "quantize")

# Ladders, mild -> aggressive. Every entry is a full ``--set`` dictionary for its pass; the
# calibration sizes are part of it so the recorded settings reproduce the model exactly.
_LR = {"calib_samples": "256", "calib_rows": "2048"}
_SP = {"calib_samples": "256", "calib_rows": "4096"}
LADDERS: dict[str, list[dict[str, str]]] = {
    "prune": [{"ratio": str(r)} for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)],
    "lowrank": [{"model_mac_ratio": str(r), **_LR}
                for r in (0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)],
    "sparse": [{"model_density": str(d), **_SP}
               for d in (0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.06, 0.04)],
    "quantize": [{}],   # preceded by exclusion levels: Evaluator.ladder
}
# quantize's milder levels keep the layers most sensitive to int8 in float: the top quarter,
# tenth, three, one of them (ranked once per search by the pass's own per-layer sensitivity)
QUANT_FLOAT_SHARES = (0.25, 0.1)
QUANT_FLOAT_COUNTS = (3, 1)
QUANT_SENSITIVITY_ROWS = 256


# ------------------------------------------------------------------------ validation data

def load_val(model: onnx.ModelProto, data: dict[str, np.ndarray]
             ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Check ``val.npz`` against the model before any search: one array per input, same rows,
    finite; optional integer ``labels`` of shape [N]."""
    from edgec.driver.compiler import validate_calib

    labels = data.get("labels")
    try:
        feeds = validate_calib(model, {k: v for k, v in data.items() if k != "labels"})
    except EdgecError as e:
        raise EdgecError("--val: " + str(e).replace("calibration", "validation")) from None
    n = next(iter(feeds.values())).shape[0]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != n:
            raise EdgecError(f"--val: labels has shape {list(labels.shape)}, expected [{n}] "
                             "(one class index per row)")
        if not np.issubdtype(labels.dtype, np.integer):
            if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
                    and np.all(labels == np.round(labels))):
                raise EdgecError(f"--val: labels must be class indices (integers), got dtype "
                                 f"{labels.dtype}")
            labels = labels.astype(np.int64)
    if n < 20:
        raise EdgecError(f"--val: {n} rows are too few to bound a drop in points (give >= 20, "
                         "better >= 1000)")
    return feeds, labels


# ------------------------------------------------------------------------ scoring

def upper_bound_drop(ref_ok: np.ndarray, new_ok: np.ndarray, z: float) -> tuple[float, float]:
    """Paired accuracy drop (points) and its one-sided upper bound at normal quantile ``z``."""
    d = ref_ok.astype(np.float64) - new_ok.astype(np.float64)
    n = len(d)
    mean = float(d.mean())
    var = float(np.mean(d * d) - mean * mean)
    # never below the bound a single discordant pair more would give (tiny samples, zero var)
    se = math.sqrt(max(var, 1.0 / n) / n)
    return 100 * mean, 100 * (mean + z * se)


def wilson_upper(k: int, n: int, z: float) -> float:
    """Wilson score upper bound of a rate k/n (in points)."""
    p = k / n
    den = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre + half) / den


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(confidence)


def effective_macs(model: onnx.ModelProto) -> int:
    """Conv/Gemm/MatMul MACs counting only nonzero constant weights (float, or integer behind
    a DequantizeLinear)."""
    from edgec.core.graph import value_shapes
    from edgec.core.stats import node_macs

    shapes = value_shapes(model)
    inits = {t.name: t for t in model.graph.initializer}
    # a quantized weight reaches its layer through DequantizeLinear: count its integer zeros
    # (zero points are 0 for int8 weights, so a zero weight stays an exact zero)
    dq = {n.output[0]: n.input[0] for n in model.graph.node
          if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    total = 0
    for node in model.graph.node:
        m = node_macs(node, shapes)
        if not m:
            continue
        w = node.input[1] if len(node.input) > 1 else ""
        w = dq.get(w, w)
        if node.op_type in ("Conv", "Gemm", "MatMul") and w in inits:
            a = numpy_helper.to_array(inits[w])
            if a.size:
                m = m * np.count_nonzero(a) / a.size
        total += m
    return int(total)


@dataclass
class Candidate:
    levels: dict[str, int]                 # pass -> ladder index (-1: off)
    settings: dict[str, dict[str, str]]
    objective: float
    drop: float                            # estimate on val, points
    bound: float                           # upper confidence bound, points
    accuracy: float | None
    agreement: float
    macs: int
    macs_effective: int
    size: int
    seconds: float
    phase: str
    ok: bool = False
    error: str | None = None
    latency_ms: float | None = None        # objective latency: compiled and timed

    def to_json(self) -> dict:
        # strict JSON: an unmeasured or failed candidate's infinities are nulls
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in self.__dict__.items()}


class LatencyProbe:
    """Compiles a candidate model for the target and times it: here, in a fresh process (the
    ``edgec bench`` worker: warm-up, then the median of ``repeat`` runs), or on a board
    registered with a TVM RPC tracker (``board = {"rpc", "key"}``, TVM's time evaluator);
    ``rounds`` such timings (fresh processes), the fastest round's median counts."""

    def __init__(self, opts, board: dict | None = None, threads: int | None = None,
                 repeat: int = 15, warmup: int = 3, rounds: int = 2):
        import dataclasses

        from edgec.runtime import default_threads

        self.opts = dataclasses.replace(
            opts, passes=[], preset="none", sets=[], input_shapes={}, calib=None, verify=False,
            build=True, tune_trials=None, tune_minutes=None, progress=False, extra_files={},
            report_extra={})
        self.board, self.repeat, self.warmup, self.rounds = board, repeat, warmup, rounds
        self.threads = threads or default_threads()
        self.seconds = 0.0                  # spent compiling and timing
        self.count = 0

    def __call__(self, model: onnx.ModelProto) -> float:
        """Milliseconds per run of ``model`` compiled for the target (batch as in the model)."""
        import tempfile
        from pathlib import Path

        from edgec.core.importer import random_feeds
        from edgec.driver.bench import time_artifact
        from edgec.driver.compiler import compile_model

        t0 = time.perf_counter()
        feeds = random_feeds(model, seed=0)
        with tempfile.TemporaryDirectory(prefix="edgec-latency-") as tmp:
            src, art = Path(tmp) / "candidate.onnx", Path(tmp) / "artifact"
            onnx.save_model(model, str(src))
            compile_model(src, art, self.opts)
            medians = [float(np.median(time_artifact(art, feeds, self.threads, self.repeat,
                                                     self.warmup, self.board)))
                       for _ in range(self.rounds)]
        self.seconds += time.perf_counter() - t0
        self.count += 1
        # the faster round: a burst of load from elsewhere (threads of another process on
        # these cores stall every parallel region) slows one round, not the model
        return min(medians) * 1e3

    def summary(self) -> dict:
        """Where and how the candidates were timed, for ``search.json`` and the report."""
        b = self.board
        return {"where": f"board '{b['key']}' at {b['rpc']}" if b else "this machine",
                "threads": self.threads, "builds": self.count,
                "seconds": round(self.seconds, 1)}


class Evaluator:
    """Runs a configuration's passes on the normalized model and scores it on val data."""

    def __init__(self, model, calib, feeds, labels, objective, order, confidence, target=None,
                 latency: LatencyProbe | None = None, max_drop: float = math.inf):
        from edgec.passes._calib import fixed_batch
        from edgec.runtime import OrtSession, run_batched

        if objective == "latency" and latency is None:
            raise EdgecError("objective latency needs a LatencyProbe (the target to time on)")
        self.model, self.calib, self.feeds, self.labels = model, calib, feeds, labels
        self.objective, self.order, self.target = objective, order, target
        self.latency, self.max_drop = latency, max_drop
        self.z = _z(confidence)
        self.batch = fixed_batch(model)
        ref = run_batched(OrtSession(model), feeds, self.batch)[0]
        if ref.ndim != 2 or ref.shape[1] < 2:
            raise EdgecError(f"--max-drop scores class scores [N, C] in the first output; it "
                             f"has shape {list(ref.shape)} (regression outputs are not yet "
                             "supported by the search)")
        self.ref_top1 = ref.argmax(1)
        self.ref_ok = self.ref_top1 == labels if labels is not None else None
        self.base_accuracy = float(self.ref_ok.mean()) if labels is not None else None
        self.base = self.measure(model)
        if latency is not None:
            self.base["latency_ms"] = latency(model)  # the dense fp32 model, compiled
        self.history: list[Candidate] = []
        self.cache: dict[tuple, Candidate] = {}
        self._quant_ladder: list[dict[str, str]] | None = None
        self.quant_ranking: list[dict] | None = None   # computed on quantize's first use

    def measure(self, m) -> dict:
        return {"macs": model_stats(m).macs, "macs_effective": effective_macs(m),
                "size": len(m.SerializeToString())}

    def ladder(self, p: str) -> list[dict[str, str]]:
        """Pass ``p``'s settings, mild -> aggressive. ``quantize``: every Conv/Gemm/MatMul in
        int8 is the last level; before it, levels that keep the layers most sensitive to int8
        in float (``exclude``), fewer at each step."""
        if p != "quantize":
            return LADDERS[p]
        if self._quant_ladder is None:
            self._quant_ladder = [{}]
            ranked = self.quantize_ranking()
            n = len(ranked)
            ks = sorted({k for k in [math.ceil(f * n) for f in QUANT_FLOAT_SHARES]
                         + list(QUANT_FLOAT_COUNTS) if 1 <= k < n}, reverse=True)
            names = [r["node"] for r in ranked]
            if not any("," in x for x in names):  # (a name with a comma cannot be --set)
                self._quant_ladder = [{"exclude": ",".join(names[:k])} for k in ks] + [{}]
        return self._quant_ladder

    def quantize_ranking(self) -> list[dict]:
        """The quantized layers by the output error each one causes when it alone is int8
        (the quantize pass's ``sensitivity``, on the first calibration rows), worst first."""
        from edgec.driver.pipeline import Pipeline

        if self.quant_ranking is None:
            self.quant_ranking = []
            try:
                r = Pipeline(["quantize"], {"quantize": {
                    "sensitivity": "true", "sensitivity_rows": str(QUANT_SENSITIVITY_ROWS)}},
                    calib=self.calib, target=self.target).run(self.model).reports[-1]
                self.quant_ranking = [{"node": x["node"], "output_error": x["output_error"]}
                                    for x in (r.details or {}).get("sensitivity", [])]
            except EdgecError:
                pass  # the plain quantize level reports why when it runs
        return self.quant_ranking

    def settings(self, levels: dict[str, int]) -> dict[str, dict[str, str]]:
        return {p: dict(self.ladder(p)[i]) for p, i in levels.items() if i >= 0}

    def evaluate(self, levels: dict[str, int], phase: str) -> Candidate:
        from edgec.driver.pipeline import Pipeline
        from edgec.runtime import OrtSession, run_batched

        key = tuple(sorted((p, i) for p, i in levels.items() if i >= 0))
        if key in self.cache:  # the same configuration is never run twice
            return self.cache[key]
        t0 = time.perf_counter()
        sets = self.settings(levels)
        names = [p for p in self.order if p in sets]
        try:
            m = Pipeline(names, sets, calib=self.calib, target=self.target).run(self.model).model
            out = run_batched(OrtSession(m), self.feeds, self.batch)[0]
        except EdgecError as e:
            c = Candidate(dict(levels), sets, math.inf, math.inf, math.inf, None, 0.0, 0, 0, 0,
                          time.perf_counter() - t0, phase, False, str(e))
            self.history.append(c)
            self.cache[key] = c
            return c
        top1 = out.argmax(1)
        agree = float(np.mean(top1 == self.ref_top1))
        if self.labels is not None:
            new_ok = top1 == self.labels
            drop, bound = upper_bound_drop(self.ref_ok, new_ok, self.z)
            acc = float(new_ok.mean())
        else:
            k = int(np.sum(top1 != self.ref_top1))
            drop, bound, acc = 100 * k / len(top1), wilson_upper(k, len(top1), self.z), None
        st = self.measure(m)
        ms = None
        if self.objective == "latency":
            # only a candidate that may be chosen is worth a build and a timing
            ms = self.latency(m) if bound <= self.max_drop else None
            obj = ms if ms is not None else math.inf
        else:
            obj = st["macs_effective"] if self.objective == "macs" else st["size"]
        c = Candidate(dict(levels), sets, float(obj), drop, bound, acc, agree, st["macs"],
                      st["macs_effective"], st["size"], time.perf_counter() - t0, phase,
                      latency_ms=ms)
        self.history.append(c)
        self.cache[key] = c
        return c


# ------------------------------------------------------------------------ the search

@dataclass
class SearchResult:
    chosen: Candidate
    history: list[Candidate]
    frontier: list[Candidate]
    base: dict
    base_accuracy: float | None
    confidence: float
    stopped: str
    seconds: float
    sensitivity: dict = field(default_factory=dict)

    def to_json(self, max_drop: float, objective: str, metric: str) -> dict:
        return {"max_drop": max_drop, "objective": objective, "metric": metric,
                "confidence": self.confidence,
                "margin": f"a candidate is accepted when the one-sided {100 * self.confidence:.0f}"
                          f" % upper confidence bound of its drop is <= {max_drop} points",
                "base": self.base, "base_accuracy": self.base_accuracy,
                "stopped": self.stopped, "seconds": round(self.seconds, 1),
                "chosen": self.chosen.to_json(),
                "evaluated": [c.to_json() for c in self.history],
                "frontier": [c.to_json() for c in self.frontier],
                "sensitivity": self.sensitivity}


def frontier(cands: list[Candidate]) -> list[Candidate]:
    """Non-dominated candidates (lower objective, lower drop), by objective (a candidate
    whose objective was not measured -- latency over budget -- is on no frontier)."""
    ok = [c for c in cands if c.error is None and math.isfinite(c.objective)]
    out = []
    for c in sorted(ok, key=lambda c: (c.objective, c.drop)):
        if not out or c.drop < out[-1].drop:
            out.append(c)
    return out


class _Progress:
    def __init__(self, enabled: bool, seconds: float):
        self.enabled, self.seconds, self.t0 = enabled, seconds, time.perf_counter()

    def __call__(self, c: Candidate, best: Candidate | None) -> None:
        if not self.enabled:
            return
        import sys

        el = time.perf_counter() - self.t0
        frac = min(el / self.seconds, 1.0) if self.seconds else 0
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        what = ",".join(f"{p}{i}" for p, i in c.levels.items() if i >= 0) or "original"
        b = f"best {best.objective:.4g}" if best else "best -"
        sys.stderr.write(f"\r  search [{bar}] {el:5.0f}s  {c.phase:<11} {what:<34} drop<="
                         f"{c.bound:5.2f}  {b}   ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            import sys

            sys.stderr.write("\n")


def search(ev: Evaluator, passes: list[str], max_drop: float, minutes: float,
           progress: bool = False) -> SearchResult:
    """Sensitivity, then greedy allocation with verification runs; the time budget or Ctrl-C
    ends it with the best configuration found so far."""
    t0 = time.perf_counter()
    deadline = t0 + 60 * minutes
    off = {p: -1 for p in passes}
    base_key = {"macs": "macs_effective", "size": "size", "latency": "latency_ms"}[ev.objective]
    origin = Candidate(dict(off), {}, float(ev.base[base_key]), 0.0, 0.0,
                       ev.base_accuracy, 1.0, ev.base["macs"], ev.base["macs_effective"],
                       ev.base["size"], 0.0, "original", True,
                       latency_ms=ev.base.get("latency_ms"))
    best = origin
    bar = _Progress(progress, 60 * minutes)
    sens: dict[str, list[Candidate]] = {p: [] for p in passes}
    stopped = "finished"

    def accept(c: Candidate) -> bool:
        nonlocal best
        c.ok = c.error is None and c.bound <= max_drop
        if c.ok and (c.objective, c.bound) < (best.objective, best.bound):
            best = c
        bar(c, best)
        return c.ok

    def out_of_time() -> bool:
        return time.perf_counter() > deadline

    try:
        # 1. sensitivity: each pass alone, mild -> aggressive, until over budget
        for p in passes:
            for i in range(len(ev.ladder(p))):
                if out_of_time():
                    raise TimeoutError
                c = ev.evaluate({**off, p: i}, "sensitivity")
                sens[p].append(c)
                if not accept(c):
                    break
        # 2. allocation: per pass, the levels within budget alone; greedy by gain per point
        usable = {p: [c for c in sens[p] if c.ok] for p in passes}
        base_obj = origin.objective

        sec = "macs_effective" if ev.objective == "size" else "size"
        floor = 1e-6 if ev.objective == "latency" else 1.0

        def gain(c):  # log objective reduction (objectives compose multiplicatively); the
            # other objective breaks ties (quantize: no MACs saved, 4x smaller)
            return math.log(base_obj / max(c.objective, floor)) + \
                0.05 * math.log(ev.base[sec] / max(getattr(c, sec), 1))

        levels = dict(off)
        spent = 0.0
        while True:
            options = []
            for p in passes:
                nxt = levels[p] + 1
                if nxt < len(usable[p]):
                    cur = usable[p][levels[p]] if levels[p] >= 0 else None
                    dg = gain(usable[p][nxt]) - (gain(cur) if cur else 0.0)
                    dd = max(usable[p][nxt].drop, 0.0) - (max(cur.drop, 0.0) if cur else 0.0)
                    options.append((dg / max(dd, 0.05), p, dd))
            options = [o for o in options if o[0] > 0 and spent + max(o[2], 0) <= 0.7 * max_drop]
            if not options:
                break
            _, p, dd = max(options)
            levels[p] += 1
            spent += max(dd, 0)
        # verification: step back until the combination holds, then greedy ascent
        tried: set[tuple] = set()

        def key(lv):
            return tuple(sorted(lv.items()))

        while any(i >= 0 for i in levels.values()):
            if out_of_time():
                raise TimeoutError
            tried.add(key(levels))
            c = ev.evaluate(levels, "verify")
            if accept(c):
                break
            # over budget: back off the pass whose last step gave least gain per point
            worst, wp = None, None
            for p in passes:
                i = levels[p]
                if i < 0:
                    continue
                prev = gain(usable[p][i - 1]) if i > 0 else 0.0
                r = (gain(usable[p][i]) - prev) / max(usable[p][i].drop, 0.05)
                if worst is None or r < worst:
                    worst, wp = r, p
            levels[wp] -= 1
        improved = True
        while improved:
            improved = False
            cur = dict(levels)
            for p in passes:
                if out_of_time():
                    raise TimeoutError
                if cur[p] + 1 >= len(ev.ladder(p)):
                    continue
                trial = {**cur, p: cur[p] + 1}
                if key(trial) in tried:
                    continue
                tried.add(key(trial))
                c = ev.evaluate(trial, "ascent")
                if accept(c) and c is best:
                    levels, improved = trial, True
                    break
    except TimeoutError:
        stopped = f"time budget ({minutes:g} min) reached"
    except KeyboardInterrupt:
        stopped = "interrupted (Ctrl-C)"
    finally:
        bar.close()
    hist = [origin] + ev.history
    sensitivity = {p: [c.to_json() for c in v] for p, v in sens.items()}
    if ev.quant_ranking:
        sensitivity["quantize_layers"] = ev.quant_ranking
    return SearchResult(best, hist, frontier(hist), ev.base, ev.base_accuracy,
                        0.0, stopped, time.perf_counter() - t0, sensitivity)


# ------------------------------------------------------------------------ the plot

def tradeoff_png(result: SearchResult, objective: str, max_drop: float) -> bytes | None:
    """Drop against the objective: every configuration, the frontier, the chosen one."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    base = result.history[0].objective or 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [c for c in result.history if c.error is None and math.isfinite(c.objective)]
    ax.scatter([c.objective / base for c in ok], [c.drop for c in ok], s=14, c="0.6",
               label="evaluated (estimate on val)")
    fr = result.frontier
    ax.plot([c.objective / base for c in fr], [c.drop for c in fr], "-o", ms=4, c="C0",
            label="frontier")
    ch = result.chosen
    ax.errorbar([ch.objective / base], [ch.drop], yerr=[[0], [ch.bound - ch.drop]], fmt="*",
                ms=14, c="C3", label="chosen (bar: upper bound)")
    ax.axhline(max_drop, ls="--", c="C3", lw=1, label=f"--max-drop {max_drop}")
    ax.set_xscale("log")
    ax.set_xlabel(f"{objective} / original")
    ax.set_ylabel("drop on validation data (points)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------ the compile

def run_search(model_path, out_dir, opts, val: dict[str, np.ndarray], max_drop: float,
               objective: str = "macs", minutes: float = 10.0, confidence: float = 0.95,
               search_passes: list[str] | None = None, board: dict | None = None) -> dict:
    """Search, then compile the chosen configuration into ``out_dir``; returns the report
    (with ``report["search"]``); ``OUT/search.json`` and ``OUT/plots/tradeoff.png``."""
    import dataclasses
    import json

    from edgec.core.importer import load_model, normalize
    from edgec.driver import compiler
    from edgec.driver.pipeline import NORMALIZE, Pipeline

    if objective not in OBJECTIVES:
        raise EdgecError(f"--objective: '{objective}' is not one of {', '.join(OBJECTIVES)}")
    if board is not None and objective != "latency":
        raise EdgecError("--rpc in a search times candidates on the board: it goes with "
                         "--objective latency")
    if objective == "latency":
        from edgec.targets import get_target

        if not opts.build:
            raise EdgecError("--objective latency compiles and times every candidate: it "
                             "cannot go with --no-build")
        spec = get_target(opts.target)
        if board is None and not spec.runs_on_host():
            raise EdgecError(f"--objective latency times the candidates on the target, and "
                             f"{spec.name} does not run on this machine: give the board with "
                             "--rpc HOST:PORT --key KEY, or search --objective macs")
    if not (0.0 <= max_drop <= 100.0):
        raise EdgecError(f"--max-drop must be within [0, 100] points, got {max_drop}")
    if minutes <= 0:
        raise EdgecError("--search-minutes must be > 0")
    if opts.calib is None:
        raise EdgecError("--max-drop needs --calib FILE.npz (the passes fit on it) and --val "
                         "FILE.npz (the search scores on it; keep the two apart)")
    passes = search_passes or [p for p in SEARCHABLE]
    bad = [p for p in passes if p not in SEARCHABLE]
    if bad:
        raise EdgecError(f"--max-drop searches over {', '.join(SEARCHABLE)}; cannot search "
                         f"{', '.join(bad)} (run it with --passes/--set without --max-drop)")
    source = load_model(model_path)
    model, _ = normalize(source, opts.input_shapes)
    calib = compiler.validate_calib(model, opts.calib)
    feeds, labels = load_val(model, val)
    if any(np.array_equal(calib[k][: len(feeds[k])], feeds[k][: len(calib[k])])
           for k in feeds):
        raise EdgecError("--val holds the same rows as --calib: the budget must be checked on "
                         "data the passes did not fit on (give a separate validation file)")
    model = Pipeline(NORMALIZE).run(model).model
    # the passes see what ``edgec compile`` gives them (it holds out the last rows for its
    # estimated-drop line): the chosen model and the recorded command give the same model
    calib = compiler.split_calib(calib)[0]
    order = [p for p in SEARCHABLE if p in passes]
    probe = LatencyProbe(opts, board) if objective == "latency" else None
    ev = Evaluator(model, calib, feeds, labels, objective, order, confidence,
                   compiler.target_info(opts), latency=probe, max_drop=max_drop)
    res = search(ev, order, max_drop, minutes, opts.progress)
    res.confidence = confidence
    metric = "accuracy (labels)" if labels is not None else "top-1 disagreement with the original"
    js = res.to_json(max_drop, objective, metric)
    chosen = res.chosen
    names = [p for p in order if p in chosen.settings]
    sets = [f"{p}.{k}={v}" for p, kv in chosen.settings.items() for k, v in kv.items()]
    js["reproduce"] = {"passes": names, "sets": sets}
    if probe is not None:
        js["timed"] = probe.summary()
    extra = {"search.json": (json.dumps(js, indent=1) + "\n").encode()}
    png = tradeoff_png(res, objective, max_drop)
    if png:
        extra["plots/tradeoff.png"] = png
    summary = {k: js[k] for k in ("max_drop", "objective", "metric", "confidence", "margin",
                                  "base", "base_accuracy", "stopped", "seconds", "reproduce")}
    summary["chosen"] = chosen.to_json()
    summary["evaluated"] = len(res.history) - 1
    if probe is not None:
        summary["timed"] = js["timed"]
    copts = dataclasses.replace(opts, passes=names, preset=None, sets=sets, extra_files=extra,
                                report_extra={"search": summary})
    return compiler.compile_model(model_path, out_dir, copts)
