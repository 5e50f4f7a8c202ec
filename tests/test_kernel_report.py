"""The report's kernel section: multiply-accumulates per fused function, and the functions
with them that got only a fallback schedule, flagged with their share (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import onnx

from conftest import compile_to, conv_bn_model
from edgec.targets.records import BuildRecord


def test_fallbacks_from_the_record():
    r = BuildRecord(kernels={"a": "conv2d-packed", "b": "generic", "c": "reduce", "d": "generic"},
                    unscheduled={"e": "no schedule"},
                    macs={"a": 600, "b": 100, "c": 200, "d": 0, "e": 100})
    assert r.fallbacks() == {"b": {"kernel": "generic", "macs": 100},
                             "c": {"kernel": "reduce", "macs": 200},
                             "e": {"kernel": "unscheduled", "macs": 100}}
    k = r.kernel_summary()
    assert k["macs_executed"] == 1000 and abs(k["fallback_mac_share"] - 0.4) < 1e-12


def test_mac_count_matches_the_model_statistics(tmp_path):
    """The stem kernel computes the 12-pixel rows as 16 (two 8-lane vectors) and the 16
    channels in whole tiles of its rows (a window row's 3 taps written out count 3
    products per update); the dense kernel computes the classifier's 10 outputs in whole
    vectors (the padding lanes of its packed weight, 16 inputs each): executed = the
    model's MACs plus both paddings."""
    from edgec.targets.cpu.kernels.dense import pack_dense
    from edgec.targets.cpu.kernels.stem_conv import stem_tile

    report = compile_to(conv_bn_model(k=16), tmp_path / "art", target_options={"mcpu": "haswell"})
    k = report["kernels"]
    assert k["counts"].get("conv2d-stem") == 1, k
    owp, _, rows = stem_tile(8, (1, 3, 12, 12), (16, 3, 3, 3), (1, 1), (1,) * 4, (1, 1))
    chans = -(-16 // rows) * rows
    padded = pack_dense(np.zeros((16, 10), np.float32), 8).shape
    assert k["macs_executed"] == report["after"]["macs"] + 16 * (padded[0] * padded[2] - 10) \
        + (chans * owp - 16 * 12) * 12 * 27
    assert k["fallbacks"] == {} and k["fallback_mac_share"] == 0.0


def test_a_convolution_on_the_fallback_is_flagged(tmp_path, monkeypatch, capsys):
    """With every kernel rule removed, the convolution and the Gemm fall to the generic
    schedule: the report and the compile summary say so, with their share of the MACs."""
    from edgec.driver.cli import main
    from edgec.targets.cpu import rules
    from edgec.targets.cpu.kernels import generic

    monkeypatch.setattr(rules, "RULES", [generic.RULE])
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art"),
                 "--no-tuning-db"]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "100.0 % of the MACs got no kernel" in out, out
    k = json.loads((tmp_path / "art" / "report.json").read_text())["kernels"]
    assert len(k["fallbacks"]) == 2 and k["fallback_mac_share"] == 1.0


def test_bench_profile_shares_sum_to_the_total(tmp_path):
    """``edgec bench --profile``: every fused function of the report timed, shares summing
    to one on both sides, GFLOP/s from the recorded multiply-accumulates."""
    from edgec.driver.bench import bench
    from edgec.driver.profile import format_profile
    from edgec.targets.cpu.kernels.stem_conv import stem_tile
    from test_cpu_kernels import host_lanes

    onnx.save(conv_bn_model(k=16), tmp_path / "m.onnx")
    compile_to(tmp_path / "m.onnx", tmp_path / "art")
    res = bench(tmp_path / "m.onnx", tmp_path / "art", repeat=3, rounds=1, peak=False,
                profile=True)
    out = format_profile(res["profile"])
    assert "edgec per fused function" in out and "onnxruntime per node" in out, out
    prof = res["profile"]
    report = json.loads((tmp_path / "art" / "report.json").read_text())["kernels"]
    rows = {r["function"]: r for r in prof["edgec"]["functions"]}
    # every function timed is one the report names (reshape-like ones run as VM builtins)
    assert set(rows) - {"vm builtins"} <= set(report["functions"]) | set(report["unscheduled"])
    assert {n for n in report["functions"] if "conv2d" in n or "matmul" in n} <= set(rows)
    for side, key in (("edgec", "functions"), ("onnxruntime", "nodes")):
        assert abs(sum(r["share"] for r in prof[side][key]) - 1.0) < 1e-9
        assert abs(sum(r["ms"] for r in prof[side][key]) - prof[side]["total_ms"]) < 1e-6
    conv = next(r for n, r in rows.items() if "conv2d" in n)
    owp, _, rows = stem_tile(host_lanes(), (1, 3, 12, 12), (16, 3, 3, 3), (1, 1), (1,) * 4,
                             (1, 1))
    # rows padded to whole vectors, channels to whole tiles
    assert conv["macs"] == -(-16 // rows) * rows * 12 * owp * 27 and conv["gflops"] > 0
    assert {r["op"] for r in prof["onnxruntime"]["nodes"]} & {"Conv", "FusedConv"}
