"""The benchmark's pieces: layer table, byte counts, checking, table, CLI. Never timings."""
import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from bench import cli, core, dw, problem, pw, report
from bench import model as bench_model
from bench import providers as bench_providers
from bench.shapes import DWLayer, PWLayer, mobilenet_v2_dw_layers, mobilenet_v2_pw_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# MobileNetV2 (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
# (6,160,3,2) (6,320,1,1) after the stem (32 ch, 112x112): the depthwise conv runs on in*t
# channels, the first block of a stage with the stage's stride.  (C, H, stride, count):
MOBILENET_V2_DW = [
    (32, 112, 1, 1),   # 16 x1
    (96, 112, 2, 1),   # 24 block 1: 16*6
    (144, 56, 1, 1),   # 24 block 2: 24*6
    (144, 56, 2, 1),   # 32 block 1
    (192, 28, 1, 2),   # 32 blocks 2-3
    (192, 28, 2, 1),   # 64 block 1
    (384, 14, 1, 4),   # 64 blocks 2-4 and 96 block 1 (stride 1)
    (576, 14, 1, 2),   # 96 blocks 2-3
    (576, 14, 2, 1),   # 160 block 1
    (960, 7, 1, 3),    # 160 blocks 2-3 and 320
]


def test_shape_table_matches_mobilenet_v2():
    layers = mobilenet_v2_dw_layers()
    assert [(lay.c, lay.h, lay.stride, lay.count) for lay in layers] == MOBILENET_V2_DW
    assert all(lay.w == lay.h and lay.k == 3 and lay.padding == 1 for lay in layers)
    assert sum(lay.count for lay in layers) == 17


# The 1x1 convs of the same blocks. A block (in -> out, stride s, expansion t) runs
# expand in -> in*t at its input size (none when t == 1), the depthwise conv, then project
# in*t -> out at the output size, with the residual when s == 1 and in == out; after the
# blocks, the last conv 320 -> 1280 at 7x7 (ReLU6). (kind, Cin, Cout, H, residual, count):
MOBILENET_V2_PW = [
    ("project", 32, 16, 112, False, 1),   # 16: t=1, 32 -> 16
    ("expand", 16, 96, 112, False, 1),    # 24 block 1 (s2)
    ("project", 96, 24, 56, False, 1),
    ("expand", 24, 144, 56, False, 2),    # 24 block 2 and 32 block 1
    ("project", 144, 24, 56, True, 1),    # 24 block 2: s1, 24 == 24
    ("project", 144, 32, 28, False, 1),   # 32 block 1 (s2)
    ("expand", 32, 192, 28, False, 3),    # 32 blocks 2-3 and 64 block 1
    ("project", 192, 32, 28, True, 2),    # 32 blocks 2-3
    ("project", 192, 64, 14, False, 1),   # 64 block 1 (s2)
    ("expand", 64, 384, 14, False, 4),    # 64 blocks 2-4 and 96 block 1
    ("project", 384, 64, 14, True, 3),    # 64 blocks 2-4
    ("project", 384, 96, 14, False, 1),   # 96 block 1: s1 but 64 != 96
    ("expand", 96, 576, 14, False, 3),    # 96 blocks 2-3 and 160 block 1
    ("project", 576, 96, 14, True, 2),    # 96 blocks 2-3
    ("project", 576, 160, 7, False, 1),   # 160 block 1 (s2)
    ("expand", 160, 960, 7, False, 3),    # 160 blocks 2-3 and 320
    ("project", 960, 160, 7, True, 2),    # 160 blocks 2-3
    ("project", 960, 320, 7, False, 1),   # 320: s1 but 160 != 320
    ("last", 320, 1280, 7, False, 1),
]


def test_pw_shape_table_matches_mobilenet_v2():
    layers = mobilenet_v2_pw_layers()
    assert [(lay.kind, lay.cin, lay.cout, lay.h, lay.residual, lay.count)
            for lay in layers] == MOBILENET_V2_PW
    assert all(lay.w == lay.h for lay in layers)
    assert {lay.act for lay in layers if lay.kind == "project"} == {"identity"}
    assert {lay.act for lay in layers if lay.kind != "project"} == {"relu6"}
    count = {kind: sum(lay.count for lay in layers if lay.kind == kind)
             for kind in ("expand", "project", "last")}
    assert count == {"expand": 16, "project": 17, "last": 1}
    assert sum(lay.count for lay in layers if lay.residual) == 10
    assert layers[4].name == "project 144->24@56x56 +res"
    assert layers[1].name == "expand 16->96@112x112"


def test_layer_geometry_and_bytes():
    lay = DWLayer(144, 56, 56, 2)
    assert lay.out_hw == (28, 28) and DWLayer(960, 7, 7, 1).out_hw == (7, 7)
    assert lay.name == "144@56x56 s2"
    # x: 4*144*56*56 halves = 3,612,672 B; y: 4*144*28*28 halves = 903,168 B
    assert problem.layer_bytes(lay, 4, torch.float16, "infer") == 3_612_672 + 903_168
    assert problem.layer_bytes(lay, 4, torch.float16, "train") == 2 * (3_612_672 + 903_168)
    assert problem.layer_bytes(lay, 4, torch.float32, "infer") == 2 * (3_612_672 + 903_168)
    # 4*144*28*28 outputs, 9 multiply-adds each; training 3x (forward, dx, dweight)
    assert problem.layer_flops(lay, 4, "infer") == 2 * 4_064_256
    assert problem.layer_flops(lay, 4, "train") == 6 * 4_064_256


def test_pw_bytes_and_flops():
    lay = PWLayer("project", 144, 24, 56, 56, "identity", residual=True)
    # x: 4*144*56*56 halves = 3,612,672 B; y and the residual: 4*24*56*56 halves = 602,112 B
    assert problem.layer_bytes(lay, 4, torch.float16, "infer") == 3_612_672 + 2 * 602_112
    assert problem.layer_bytes(lay, 4, torch.float16, "train") == \
        2 * (3_612_672 + 2 * 602_112)
    # 4*56*56 pixels x 144*24 multiply-adds = 43,352,064
    assert problem.layer_flops(lay, 4, "infer") == 2 * 43_352_064
    assert problem.layer_flops(lay, 4, "train") == 6 * 43_352_064
    # flop/B = 2*Cin*Cout / ((Cin + 2*Cout) * 2 B) = 18
    assert problem.layer_flops(lay, 4, "infer") / \
        problem.layer_bytes(lay, 4, torch.float16, "infer") == 18.0
    expand = PWLayer("expand", 16, 96, 112, 112, "relu6")
    # x: 2*16*112*112 floats = 1,605,632 B; y: 2*96*112*112 floats = 9,633,792 B
    assert problem.layer_bytes(expand, 2, torch.float32, "infer") == 1_605_632 + 9_633_792
    assert problem.output_names(lay, "train") == (
        "y", "dx", "dresidual", "dweight", "dbn_weight", "dbn_bias", "running_mean",
        "running_var")
    assert problem.output_names(expand, "train")[:3] == ("y", "dx", "dweight")
    assert problem.output_names(expand, "infer") == ("y",)


def test_compare_against_truth():
    ref = {"y": torch.tensor([1.0, -2.0, 4.0, 2.0], dtype=torch.float64)}  # norm 5
    close = {"y": torch.tensor([1.0, -2.0, 4.001, 2.0])}
    far = {"y": torch.tensor([1.0, -2.0, 4.5, 2.0])}
    errs, why = core.compare(close, ref, torch.float32, {"y": 2.0}, base=close)
    assert why is None and abs(errs["y"] - 0.001 / 5) < 1e-6
    # 2e-4 is over the fp32 floor (1e-4): without eager's error to lean on it fails
    assert core.compare(close, ref, torch.float32, {"y": 2.0})[1] is not None
    errs, why = core.compare(far, ref, torch.float32, {"y": 2.0}, base=close)
    assert abs(errs["y"] - 0.1) < 1e-6
    assert why == "y: err 1.00e-01 > 4.00e-04 (eager 2.00e-04), max elementwise 1.25e-01"
    # within 2x of eager's own error: passes
    assert core.compare(far, ref, torch.float32, {"y": 2.0}, base=far)[1] is None
    nan = {"y": torch.tensor([1.0, float("nan"), 4.0, 2.0])}
    errs, why = core.compare(nan, ref, torch.float32, {"y": 2.0}, base=nan)
    assert why is not None and errs["y"] is None
    assert "shape" in core.compare({"y": torch.zeros(2)}, ref, torch.float32, {"y": 2.0})[1]


def test_reference_runs_in_full_fp32_without_autotuning():
    def flags():
        return (torch.backends.cudnn.conv.fp32_precision,
                torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.benchmark)

    torch.backends.cudnn.benchmark = True  # as the benchmark runs eager on a GPU
    try:
        before = flags()
        with core.for_reference():
            assert flags() == ("ieee", "ieee", False)
        assert flags() == before
    finally:
        torch.backends.cudnn.benchmark = False


class _Off(nn.Module):
    """Eager, 5% off: a provider the check must reject."""

    def __init__(self, template, parts=None, ctx=None):
        super().__init__()
        self.inner = copy.deepcopy(template)

    def forward(self, *inputs):
        return self.inner(*inputs) * 1.05


def _raises(template, parts, ctx):
    raise RuntimeError("no kernel\nfor this")


def test_wrong_provider_is_failed_and_not_timed():
    cfg = cli.Config(torch.device("cpu"), torch.float32, torch.channels_last, batch=2,
                     repeats=1, warmup=0, backend="cpu")
    providers = {"eager": bench_providers.eager, "off": _Off, "broken": _raises,
                 "absent": _raises}
    rows = cli.bench_case(dw.OP, DWLayer(8, 9, 9, 2), "train", cfg, {"absent": "not built"},
                          providers=providers)
    by = {r["provider"]: r for r in rows}
    assert by["eager"]["status"] == "ok" and by["eager"]["stats"]["n"] == 1
    assert by["off"]["status"] == "FAILED" and by["off"]["stats"] is None
    assert "y: err" in by["off"]["reason"] and "dx: err" in by["off"]["reason"]
    assert by["broken"]["status"] == "error" and by["broken"]["reason"] == \
        "RuntimeError: no kernel"
    assert by["absent"]["status"] == "skipped" and by["absent"]["reason"] == "not built"


def _cpu_cfg():
    return cli.Config(torch.device("cpu"), torch.float32, torch.channels_last, batch=2,
                      repeats=1, warmup=0, backend="cpu")


def test_pw_providers_checked_with_residual():
    """Eager and ours agree on a projection with residual (every gradient, the residual's
    included) and on an expansion (ReLU6); a provider 5% off fails on dresidual too."""
    proj = PWLayer("project", 24, 8, 5, 5, "identity", residual=True)
    providers = {name: pw.OP.providers[name] for name in ("eager", "ours")}
    providers["off"] = _Off
    rows = cli.bench_case(pw.OP, proj, "train", _cpu_cfg(), {}, providers=providers)
    by = {r["provider"]: r for r in rows}
    assert by["eager"]["status"] == "ok" and by["ours"]["status"] == "ok", rows
    assert set(by["ours"]["errors"]) == set(problem.output_names(proj, "train"))
    assert by["ours"]["errors"]["dresidual"] < 1e-6
    assert by["off"]["status"] == "FAILED" and "dresidual: err" in by["off"]["reason"]
    assert by["ours"]["flops"] == 6 * 2 * 25 * 24 * 8 and by["ours"]["residual"] is True
    assert by["ours"]["kind"] == "project" and by["ours"]["cin"] == 24
    template = pw.OP.template(proj, torch.float32, torch.channels_last, torch.device("cpu"))
    assert isinstance(template.act, nn.Identity) and pw.Fused(template).act == "identity"

    expand = PWLayer("expand", 8, 24, 5, 5, "relu6")
    rows = cli.bench_case(pw.OP, expand, "infer", _cpu_cfg(), {})
    assert [(r["provider"], r["status"]) for r in rows] == \
        [("eager", "ok"), ("folded", "ok"), ("ours", "ok")], rows
    template = pw.OP.template(expand, torch.float32, torch.channels_last, torch.device("cpu"))
    assert isinstance(template.act, nn.ReLU6) and pw.Fused(template).act == "relu6"


def _row(layer, count, mode, provider, ms, status="ok", op="dw"):
    return {"op": op, "layer": layer, "count": count, "mode": mode, "provider": provider,
            "status": status, "reason": None if status == "ok" else "why", "bytes": 1_000_000,
            "flops": 4_000_000, "intensity": 4.0,
            "stats": {"median": ms} if status == "ok" else None,
            "copy": {"bytes": 1_000_000, "stats": {"median": 0.0005}, "gbps": 2000.0}}


def test_totals_and_table():
    rows = [_row("a", 1, "infer", "eager", 0.002), _row("a", 1, "infer", "ours", 0.001),
            _row("b", 3, "infer", "eager", 0.004), _row("b", 3, "infer", "ours", 0.002),
            _row("a", 1, "train", "eager", 0.010), _row("a", 1, "train", "ours", 0.005),
            _row("b", 3, "train", "eager", 0.020), _row("b", 3, "train", "ours", 0, "FAILED"),
            # a pw layer named like a dw one: speedups and totals keep the ops apart
            _row("a", 2, "infer", "eager", 0.003, op="pw"),
            _row("a", 2, "infer", "ours", 0.006, op="pw")]
    report.finish(rows)
    assert rows[1]["gbps"] == 1000.0 and rows[1]["pct_copy"] == 50.0 and rows[1]["speedup"] == 2
    assert rows[1]["tflops"] == 4.0 and rows[9]["speedup"] == 0.5
    tot = {(t["op"], t["mode"], t["provider"]): t for t in report.totals(rows)}
    # infer: ours 0.001 + 3 * 0.002 ms for 4 MB; eager 0.002 + 3 * 0.004
    assert abs(tot["dw", "infer", "ours"]["stats"]["median"] - 0.007) < 1e-12
    assert abs(tot["dw", "infer", "ours"]["speedup"] - 2.0) < 1e-9
    assert abs(tot["dw", "infer", "ours"]["gbps"] - 4e6 / 0.007 / 1e6) < 1e-6
    assert tot["dw", "infer", "ours"]["intensity"] == 4.0
    assert tot["dw", "infer", "ours"]["layer"] == "TOTAL"
    assert tot["dw", "infer", "ours"]["count"] == 4
    # train: layer b failed for ours, so both totals cover layer a only, and say so
    assert tot["dw", "train", "ours"]["layer"] == "TOTAL 1/2"
    assert tot["dw", "train", "eager"]["count"] == 1
    # all ops: dw's 0.007 + pw's 2 * 0.006 ms over 4 + 2 layers; train has no pw rows
    assert abs(tot["all", "infer", "ours"]["stats"]["median"] - 0.019) < 1e-12
    assert tot["all", "infer", "ours"]["count"] == 6
    assert tot["all", "infer", "ours"]["layers"] == ["dw a", "dw b", "pw a"]
    assert tot["all", "train", "ours"]["layer"] == "TOTAL 1/2"

    table = report.render(rows, list(tot.values()), show_copy=True)
    lines = table.splitlines()
    assert lines[0].split() == ["op", "layer", "n", "mode", "provider", "flop/B", "ms", "GB/s",
                                "%copy", "speedup", "status"]
    assert set(lines[1]) == {"-"}
    assert lines[3].split() == ["dw", "a", "1", "infer", "ours", "4.0", "0.001000", "1000",
                                "50", "2.00x"]
    assert lines[6].split() == ["dw", "TOTAL", "4", "infer", "eager", "4.0", "0.01400", "286",
                                "14", "1.00x"]
    assert lines[7].split()[:5] == ["dw", "TOTAL", "4", "infer", "ours"]
    assert lines[11].split() == ["dw", "b", "3", "train", "ours", "4.0", "-", "-", "-", "-",
                                 "FAILED"]
    assert [ln.split()[:2] for ln in lines[12:14]] == [["dw", "TOTAL"]] * 2
    assert [ln.split()[:2] for ln in lines[14:18]] == [["pw", "a"]] * 2 + [["pw", "TOTAL"]] * 2
    assert [ln.split()[:4] for ln in lines[18:]] == \
        [["all", "TOTAL", "6", "infer"]] * 2 + [["all", "TOTAL", "1/2", "1"]] * 2
    assert len({len(ln) for ln in lines[:2]}) == 1  # header as wide as the rule
    assert "%copy" not in report.render(rows, [], show_copy=False)


LAYER_TYPES = {"dw": DWLayer, "pw": PWLayer}


def test_cli_defaults():
    assert cli.parse_args([]).op == "all" and cli.parse_args(["--op", "pw"]).op == "pw"
    assert sum(map(dw.OP.quick, dw.OP.layers())) == 1
    assert sum(map(pw.OP.quick, pw.OP.layers())) == 1


def test_cli_cpu_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--batch", "2",
         "--repeats", "2", "--warmup", "0", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TOTAL" in res.stdout and "GPU numbers need a GPU" in res.stdout
    # 1 dw layer x 7 providers + 1 pw layer x 6 (no native) x 2 modes; on a CPU triton,
    # compile and compile-max are listed as skipped with the reason, folded skips training
    # + one block and the whole model: 5 providers x 2 modes each (eager, ours run; the
    # others skipped)
    assert "[46/46]" in res.stderr
    assert "skipped triton: on a CPU Triton only interprets" in res.stdout

    data = json.loads(out.read_text())
    assert set(data) == {"schema", "environment", "args", "rows", "totals", "models"}
    blocks = [r for r in data["models"] if r["op"] == "block"]
    assert {r["layer"] for r in blocks} == {"block 24->24 t6 s1@56x56 +res", "TOTAL"}
    totals = {(r["provider"], r["mode"]): r for r in blocks if r["layer"] == "TOTAL"}
    assert set(totals) == {(p, m) for p in ("eager", "ours") for m in ("infer", "train")}
    models = {(r["provider"], r["mode"]): r for r in data["models"] if r["op"] == "model"}
    assert set(models) == {(p, m) for p in bench_model.ORDER for m in ("infer", "train")}
    for (name, mode), r in models.items():
        assert r["status"] == ("ok" if name in ("eager", "ours") else "skipped"), r
        if r["status"] == "ok":
            assert r["batch"] == 2 and r["error"] < 1e-3 and r["speedup"] > 0
            assert abs(r["images_per_s"] - 2e3 / r["stats"]["median"]) < 1e-6
    env = data["environment"]
    for key in ("device", "sm_count", "torch", "cuda", "cudnn", "triton", "git_commit", "date",
                "backends"):
        assert key in env
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    args = data["args"]
    assert (args["op"], args["dtype"], args["batch"], args["layout"], args["repeats"]) == \
        ("all", "fp32", 2, "channels_last", 2)
    assert len(data["rows"]) == 26
    assert {r["op"] for r in data["rows"]} == {"dw", "pw"}
    for row in data["rows"]:
        skip = row["provider"] in ("triton", "compile", "compile-max") or \
            (row["provider"], row["mode"]) == ("folded", "train")
        assert row["status"] == ("skipped" if skip else "ok"), row
        assert (row["reason"] is None) == (not skip), row
        assert row["mode"] in ("infer", "train")
        if skip:
            assert row["stats"] is None and row["errors"] is None
            continue
        assert set(row["stats"]) == {"median", "p20", "p80", "min", "n"}
        assert row["stats"]["n"] == 2
        assert row["stats"]["min"] <= row["stats"]["p20"] <= row["stats"]["median"] \
            <= row["stats"]["p80"]
        cls = LAYER_TYPES[row["op"]]
        layer = cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})
        assert row["layer"] == layer.name
        assert row["bytes"] == problem.layer_bytes(layer, 2, torch.float32, row["mode"])
        assert row["flops"] == problem.layer_flops(layer, 2, row["mode"])
        assert row["intensity"] == row["flops"] / row["bytes"]
        assert row["gbps"] > 0 and row["speedup"] > 0 and row["pct_copy"] is None
        assert set(row["errors"]) == set(problem.output_names(layer, row["mode"]))
    ran = {(o, m, p) for o in ("dw", "pw", "all") for m in ("infer", "train")
           for p in ("eager", "ours", "folded", "native")
           if not (p == "folded" and m == "train") and not (p == "native" and o == "pw")}
    assert {(t["op"], t["mode"], t["provider"], t["layer"]) for t in data["totals"]} == \
        {(o, m, p, "TOTAL") for o, m, p in ran}


def test_provider_selection_and_list_argument():
    cpu = torch.device("cpu")
    sel = bench_providers.select(dw.OP.providers, None, cpu)
    assert list(sel) == list(bench_providers.ORDER)
    assert {name for name, why in sel.items() if why is None} == \
        {"eager", "folded", "native", "ours"}
    assert "interprets" in sel["triton"] and "--providers compile" in sel["compile"]
    # the pointwise op has no separate native kernel (a 1x1 conv is a GEMM either way)
    assert "native" not in bench_providers.select(pw.OP.providers, None, cpu)
    assert bench_providers.select(dw.OP.providers, ["ours", "eager"], cpu) == \
        {"eager": None, "ours": None}
    gpu = bench_providers.select(dw.OP.providers, None, torch.device("cuda"))
    assert gpu["compile"] is None and gpu["triton"] is None and "minutes" in gpu["compile-max"]
    assert cli.parse_args(["--providers", "eager, compile"]).providers == ["eager", "compile"]
    assert cli.parse_args(["--providers", "all"]).providers == \
        list(dict.fromkeys(bench_providers.ORDER + bench_model.ORDER))
    for bad in ("eager,cudnn", ","):
        with pytest.raises(SystemExit):
            cli.parse_args(["--providers", bad])


def test_folded_provider_matches_eager_in_eval_only():
    layer = PWLayer("project", 12, 20, 5, 5, "identity", residual=True)
    template = pw.OP.template(layer, torch.float32, torch.contiguous_format,
                              torch.device("cpu")).double().eval()
    ctx = bench_providers.ProviderContext(torch.device("cpu"), "infer", "cpu")
    folded = pw.OP.providers["folded"](template, pw.OP.parts(template), ctx)
    x, r = torch.randn(2, 12, 5, 5, dtype=torch.float64), torch.randn(2, 20, 5, 5,
                                                                     dtype=torch.float64)
    torch.testing.assert_close(folded(x, r), template(x, r))
    assert folded.conv.bias is not None and template.conv.bias is None
    with pytest.raises(bench_providers.Unavailable, match="inference"):
        pw.OP.providers["folded"](template, pw.OP.parts(template),
                                  dataclasses.replace(ctx, mode="train"))


def test_batch_list_argument():
    assert cli.parse_args(["--batch", "1,32,128"]).batches == [1, 32, 128]
    assert cli.parse_args(["--batch", "4"]).batches == [4]
    for bad in ("0", "1,x", "-2"):
        with pytest.raises(SystemExit):
            cli.parse_args(["--batch", bad])


def test_mobilenet_v1_tables_reproduce_the_paper():
    from bench.shapes import mobilenet_v1_dw_layers, mobilenet_v1_pw_layers
    dws, pws = mobilenet_v1_dw_layers(), mobilenet_v1_pw_layers()
    assert sum(lay.count for lay in dws) == sum(lay.count for lay in pws) == 13
    assert [(lay.c, lay.h, lay.stride, lay.count) for lay in dws] == [
        (32, 112, 1, 1), (64, 112, 2, 1), (128, 56, 1, 1), (128, 56, 2, 1), (256, 28, 1, 1),
        (256, 28, 2, 1), (512, 14, 1, 5), (512, 14, 2, 1), (1024, 7, 1, 1)]
    assert pws[-1] == PWLayer("pointwise", 1024, 1024, 7, 7, "relu6", net="v1")
    assert pws[6].count == 5 and pws[6].name == "v1 pointwise 512->512@14x14"
    # Table 1 of the paper: 569M mult-adds with the stem (3x3x3x32 at 112x112) and the
    # 1024 -> 1000 classifier; depthwise convs ~3% of them, 1x1 convs ~95%
    dw_macs = sum(lay.count * lay.macs(1) for lay in dws)
    pw_macs = sum(lay.count * lay.macs(1) for lay in pws)
    total = dw_macs + pw_macs + 3 * 32 * 9 * 112 * 112 + 1024 * 1000
    assert round(total / 1e6) == 569
    assert 0.94 < pw_macs / total < 0.96 and 0.02 < dw_macs / total < 0.04
    names = {lay.name for lay in dw.OP.layers()}
    assert "v1 512@14x14 s1" in names and "576@14x14 s1" in names


def test_mobilenet_v3_5x5_layers_for_the_aids():
    """The 5x5 depthwise layers of torchvision's mobilenet_v3_large (blocks 40 x3 at 56/28
    and 160 x3 at 14/7: the expansions 72, 120, 120, 672, 960, 960), which bench.sweep and
    bench.profile find by name, and only by an exact name."""
    from bench.profile import find_layers
    from bench.shapes import mobilenet_v3_dw_layers
    v3 = mobilenet_v3_dw_layers()
    assert [(lay.c, lay.h, lay.stride, lay.k, lay.padding, lay.count) for lay in v3] == [
        (72, 56, 2, 5, 2, 1), (120, 28, 1, 5, 2, 2), (672, 14, 2, 5, 2, 1), (960, 7, 1, 5, 2, 2)]
    assert v3[1].name == "v3 120@28x28 s1 k5" and v3[2].out_hw == (7, 7)
    assert find_layers("dw", "v3 120@28x28 s1 k5") == [v3[1]]
    assert find_layers("dw", "v1 512@14x14 s1")[0].net == "v1"
    assert find_layers("dw", "120@28x28 s1 k5") == [] and find_layers("pw", v3[1].name) == []
    assert [lay.net for lay in find_layers("dw", None)] == ["v2"] * len(MOBILENET_V2_DW)
    assert all(lay.k == 3 for lay in dw.OP.layers())  # the bench's own tables: no 5x5 rows
    # the aids build a 5x5 layer's modules as any other: ours matches the eager template
    template = dw.OP.template(v3[2], torch.float32, torch.channels_last, torch.device("cpu"))
    x = torch.randn(2, 672, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = template.eval()(x.clone())  # ReLU6 in place: on a copy
        torch.testing.assert_close(dw.Fused(template).eval()(x), want)
    assert want.shape == (2, 672, 7, 7)


def test_totals_per_network():
    rows = [_row("a", 2, "infer", "eager", 1.0), _row("a", 2, "infer", "ours", 0.5)]
    v1 = [dict(r, layer="v1 b", net="v1", count=1) for r in rows]
    report.finish(rows + v1)
    tot = {(t["layer"], t["provider"]): t["stats"]["median"] for t in report.totals(rows + v1)}
    assert tot == {("TOTAL", "eager"): 2.0, ("TOTAL", "ours"): 1.0,
                   ("TOTAL v1", "eager"): 1.0, ("TOTAL v1", "ours"): 0.5}


def test_readme_results_section_is_generated(tmp_path):
    """README's results come from the newest committed JSON, never by hand."""
    from bench import readme
    assert readme.main(["--check"]) == 0
    # a synthetic pair of runs: the GPU one wins over a newer CPU one
    env = {"device_type": "cpu", "device": "Some CPU", "sm_count": None, "cpu_threads": 2,
           "torch": "2.x", "git_commit": "abcdef123456", "date": "2026-11-29T00:00:00+00:00"}
    tot = dict(op="dw", mode="infer", provider="ours", batch=8, net="v2",
               stats={"median": 1.5}, speedup=1.25)
    cpu = {"environment": env, "args": {"dtype": "fp32", "layout": "channels_last"},
           "rows": [], "totals": [tot], "models": []}
    gpu = {"environment": dict(env, device_type="cuda", device="H100", sm_count=132,
                               date="2026-11-01T00:00:00+00:00"),
           "args": {"dtype": "fp16", "layout": "channels_last"}, "rows": [],
           "totals": [dict(tot, speedup=2.5)], "models": []}
    for name, data in (("cpu.json", cpu), ("gpu.json", gpu)):
        (tmp_path / name).write_text(json.dumps(data))
    path, data = readme.newest(str(tmp_path))
    assert path.endswith("gpu.json")
    assert readme.newest(str(tmp_path), gpu=False)[0].endswith("cpu.json")
    text = readme.render(path, data)
    assert "H100 (132 SMs)" in text and "| 8 | v2 | dw | infer | ours | 1.500 | 2.50x |" in text
    both = readme.render_all(str(tmp_path))
    assert both.index("H100 (132 SMs)") < both.index("CPU: From") and "2 threads" in both
    assert "| 8 | v2 | dw | infer | ours | 1.500 | 1.25x |" in both
    (tmp_path / "gpu.json").unlink()
    text = readme.render_all(str(tmp_path))
    assert "No GPU run committed yet" in text and "CPU: From" in text
    doc = tmp_path / "README.md"
    doc.write_text(f"a\n{readme.BEGIN}\nold\n{readme.END}\nb\n")
    assert readme.main(["--readme", str(doc), "--results", str(tmp_path), "--check"]) == 1
    assert readme.main(["--readme", str(doc), "--results", str(tmp_path)]) == 0
    assert readme.main(["--readme", str(doc), "--results", str(tmp_path), "--check"]) == 0
    assert doc.read_text().startswith("a\n") and doc.read_text().endswith(f"{readme.END}\nb\n")


def test_plot_writes_png_or_says_why(tmp_path):
    rows = [dict(_row("a", 1, "infer", p, ms), batch=8, speedup=s, pct_copy=c)
            for p, ms, s, c in (("eager", 1.0, 1.0, 40.0), ("ours", 0.5, 2.0, 80.0))]
    models = [{"layer": "mobilenet_v2 224px", "mode": "infer", "batch": 8, "provider": "ours",
               "speedup": 1.5}]
    out = tmp_path / "bench.png"
    msg = report.plot(str(out), rows, models)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in msg and not out.exists()
    else:
        assert msg == f"wrote {out}" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_table_matches_mobilenet_v2():
    blocks = bench_model.blocks()
    assert sum(count for *_, count in blocks) == 17
    labels = [label for label, *_ in blocks]
    assert labels[0] == "block 32->16 t1 s1@112x112"
    assert "block 24->24 t6 s1@56x56 +res" in labels and "block 160->320 t6 s1@7x7" in labels
    assert [shape for _, _, shape, _ in blocks][:2] == [(32, 112, 112), (16, 112, 112)]


def test_readme_not_run_line_names_each_provider_once():
    """A provider the layer and model rows skipped for different reasons is one entry
    with both reasons; the same reason twice is said once."""
    from bench import readme

    def row(provider, reason):
        return {"provider": provider, "status": "skipped", "reason": reason}

    data = {"rows": [row("compile", "slow"), row("folded", "eval only"), row("folded", "eval only"),
                     {"provider": "ours", "status": "ok", "reason": None}],
            "models": [row("compile", "not in the set"), row("folded", "eval only")]}
    assert readme._not_run(data) == [
        "Not run: compile (layers: slow; models: not in the set); folded (eval only)."]
    assert readme._not_run({"rows": [], "models": []}) == []
