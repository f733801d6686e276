"""The benchmark's pieces: layer table, byte counts, checking, table, CLI. Never timings."""
import copy
import json
import os
import subprocess
import sys

import torch
from torch import nn

from bench import cli, core, dw, report
from bench.shapes import DWLayer, mobilenet_v2_dw_layers

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


def test_layer_geometry_and_bytes():
    lay = DWLayer(144, 56, 56, 2)
    assert lay.out_hw == (28, 28) and DWLayer(960, 7, 7, 1).out_hw == (7, 7)
    assert lay.name == "144@56x56 s2"
    # x: 4*144*56*56 halves = 3,612,672 B; y: 4*144*28*28 halves = 903,168 B
    assert dw.layer_bytes(lay, 4, torch.float16, "infer") == 3_612_672 + 903_168
    assert dw.layer_bytes(lay, 4, torch.float16, "train") == 2 * (3_612_672 + 903_168)
    assert dw.layer_bytes(lay, 4, torch.float32, "infer") == 2 * (3_612_672 + 903_168)


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


class _Off(nn.Module):
    """Eager, 5% off: a provider the check must reject."""

    def __init__(self, template):
        super().__init__()
        self.inner = copy.deepcopy(template)

    def forward(self, x):
        return self.inner(x) * 1.05


def _raises(template):
    raise RuntimeError("no kernel\nfor this")


def test_wrong_provider_is_failed_and_not_timed():
    cfg = cli.Config(torch.device("cpu"), torch.float32, torch.channels_last, batch=2,
                     repeats=1, warmup=0, backend="cpu")
    providers = {"eager": copy.deepcopy, "off": _Off, "broken": _raises, "absent": _raises}
    rows = cli.bench_case(DWLayer(8, 9, 9, 2), "train", cfg, {"absent": "not built"},
                          providers=providers)
    by = {r["provider"]: r for r in rows}
    assert by["eager"]["status"] == "ok" and by["eager"]["stats"]["n"] == 1
    assert by["off"]["status"] == "FAILED" and by["off"]["stats"] is None
    assert "y: err" in by["off"]["reason"] and "dx: err" in by["off"]["reason"]
    assert by["broken"]["status"] == "error" and by["broken"]["reason"] == \
        "RuntimeError: no kernel"
    assert by["absent"]["status"] == "skipped" and by["absent"]["reason"] == "not built"


def _row(layer, count, mode, provider, ms, status="ok"):
    return {"layer": layer, "count": count, "mode": mode, "provider": provider,
            "status": status, "reason": None if status == "ok" else "why", "bytes": 1_000_000,
            "stats": {"median": ms} if status == "ok" else None,
            "copy": {"bytes": 1_000_000, "stats": {"median": 0.0005}, "gbps": 2000.0}}


def test_totals_and_table():
    rows = [_row("a", 1, "infer", "eager", 0.002), _row("a", 1, "infer", "ours", 0.001),
            _row("b", 3, "infer", "eager", 0.004), _row("b", 3, "infer", "ours", 0.002),
            _row("a", 1, "train", "eager", 0.010), _row("a", 1, "train", "ours", 0.005),
            _row("b", 3, "train", "eager", 0.020), _row("b", 3, "train", "ours", 0, "FAILED")]
    report.finish(rows)
    assert rows[1]["gbps"] == 1000.0 and rows[1]["pct_copy"] == 50.0 and rows[1]["speedup"] == 2
    tot = {(t["mode"], t["provider"]): t for t in report.totals(rows)}
    # infer: ours 0.001 + 3 * 0.002 ms for 4 MB; eager 0.002 + 3 * 0.004
    assert abs(tot["infer", "ours"]["stats"]["median"] - 0.007) < 1e-12
    assert abs(tot["infer", "ours"]["speedup"] - 2.0) < 1e-9
    assert abs(tot["infer", "ours"]["gbps"] - 4e6 / 0.007 / 1e6) < 1e-6
    assert tot["infer", "ours"]["layer"] == "TOTAL" and tot["infer", "ours"]["count"] == 4
    # train: layer b failed for ours, so both totals cover layer a only, and say so
    assert tot["train", "ours"]["layer"] == "TOTAL 1/2" and tot["train", "eager"]["count"] == 1

    table = report.render(rows, list(tot.values()), show_copy=True)
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "n", "mode", "provider", "ms", "GB/s", "%copy",
                                "speedup", "status"]
    assert set(lines[1]) == {"-"}
    assert lines[3].split() == ["a", "1", "infer", "ours", "0.001000", "1000", "50", "2.00x"]
    assert lines[6].split() == ["TOTAL", "4", "infer", "eager", "0.01400", "286", "14", "1.00x"]
    assert lines[7].split()[:4] == ["TOTAL", "4", "infer", "ours"]
    assert lines[11].split() == ["b", "3", "train", "ours", "-", "-", "-", "-", "FAILED"]
    assert [ln.split()[0] for ln in lines[12:]] == ["TOTAL", "TOTAL"]
    assert len({len(ln) for ln in lines[:2]}) == 1  # header as wide as the rule
    assert "%copy" not in report.render(rows, [], show_copy=False)


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
    assert "[8/8]" in res.stderr

    data = json.loads(out.read_text())
    assert set(data) == {"schema", "environment", "args", "rows", "totals"}
    env = data["environment"]
    for key in ("device", "sm_count", "torch", "cuda", "cudnn", "triton", "git_commit", "date",
                "backends"):
        assert key in env
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    args = data["args"]
    assert (args["dtype"], args["batch"], args["layout"], args["repeats"]) == \
        ("fp32", 2, "channels_last", 2)
    assert len(data["rows"]) == len(cli.QUICK) * 2 * 2
    for row in data["rows"]:
        assert row["status"] == "ok", row
        assert row["provider"] in ("eager", "ours") and row["mode"] in ("infer", "train")
        assert set(row["stats"]) == {"median", "p20", "p80", "min", "n"}
        assert row["stats"]["n"] == 2
        assert row["stats"]["min"] <= row["stats"]["p20"] <= row["stats"]["median"] \
            <= row["stats"]["p80"]
        assert row["bytes"] == dw.layer_bytes(
            DWLayer(row["c"], row["h"], row["w"], row["stride"]), 2, torch.float32, row["mode"])
        assert row["gbps"] > 0 and row["speedup"] > 0 and row["pct_copy"] is None
        assert set(row["errors"]) == set(dw.OUTPUTS[row["mode"]])
    assert {(t["mode"], t["provider"], t["layer"]) for t in data["totals"]} == \
        {(m, p, "TOTAL") for m in ("infer", "train") for p in ("eager", "ours")}
