"""bench/sass.py, the static SASS counts of the CUDA kernels (no GPU needed: nvcc and
nvdisasm only), and the claims the tile kernels' comments make from them."""
import subprocess
import textwrap
from pathlib import Path

import pytest

from bench import sass

ROOT = Path(__file__).resolve().parent.parent


def _tools():
    try:
        for tool in ("nvcc", "nvdisasm"):
            sass.find_tool(tool)
    except FileNotFoundError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_tools() is not None, reason=f"no CUDA tools: {_tools()}")

TOY = textwrap.dedent("""\
    __device__ __forceinline__ float clamp(float v) {
      return fminf(fmaxf(v, -2.f), 3.f);  // two FMNMX (a 0..1 clamp would fuse: FFMA.SAT)
    }

    __global__ void axpy_loop(float* y, const float* x, float a, int n) {
      for (int i = threadIdx.x; i < n; i += blockDim.x)
        y[i] = clamp(fmaf(a, x[i], y[i]));
    }

    __global__ void four_fma(float* y, float a) {
      float v = y[threadIdx.x];
    #pragma unroll
      for (int k = 0; k < 4; ++k) v = fmaf(v, a, 1.f);
      y[threadIdx.x] = v;
    }
    """)


def test_toy_kernels(tmp_path):
    """Known code: the loop kernel has one backward branch whose body holds its global
    loads and stores and is attributed to both source functions; the unrolled one has no
    loop and exactly four FFMAs; registers come from ptxas; names are demangled."""
    src = tmp_path / "toy.cu"
    src.write_text(TOY)
    res = sass.analyze(src, "90")
    names = {sass.short_name(n): n for n in res}
    assert set(names) == {"axpy_loop", "four_fma"}, list(res)
    loop = res[names["axpy_loop"]]
    assert len(loop["loops"]) == 1
    body = loop["loops"][0]
    assert body["classes"].get("global mem", 0) >= 3  # x[i], y[i] loads; y[i] store
    assert body["classes"].get("fp32", 0) >= 3  # FFMA and the clamp's FMNMX
    funcs = " ".join(body["functions"])
    assert "toy.cu:axpy_loop" in funcs and "toy.cu:clamp" in funcs
    assert loop["registers"] > 0 and loop["spill_stores"] == 0
    fma = res[names["four_fma"]]
    assert fma["loops"] == [] and fma["opcodes"].get("FFMA") == 4
    text = sass.render(res)
    assert "axpy_loop" in text and "instructions per iteration" in text


def test_cli_errors(tmp_path, capsys):
    src = tmp_path / "toy.cu"
    src.write_text(TOY)
    with pytest.raises(SystemExit):
        sass.main([str(tmp_path / "missing.cu")])
    assert "source: no file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sass.main([str(src), "--kernel", "no_such_kernel"])
    assert "kernel: none of" in capsys.readouterr().err


def test_compare_table():
    """compare(): 'before -> after' only where a number moved; kernels on one side
    only are named as new or gone."""
    def row(regs, spill, n, loop):
        return {"registers": regs, "spill_stores": spill, "spill_loads": 0,
                "instructions": n, "loops": [{"instructions": loop}] if loop else []}
    before = {"void a<float>(int)": row(40, 0, 100, 10), "void gone(int)": row(8, 0, 5, 0)}
    after = {"void a<float>(int)": row(48, 16, 100, 8), "void b(int)": row(8, 0, 5, 0)}
    lines = sass.compare(before, after).splitlines()
    assert "| a<float> | 40 -> 48 | 0 -> 16 | 100 | 10 -> 8 |" in lines
    assert "| gone | gone | | | |" in lines and "| b | new | | | |" in lines


def test_cli_base(capsys):
    """--base HEAD compares the working tree's source with the committed one: for a file
    this change does not touch (pw_fused.cu), every number is unchanged. An unknown
    revision is a clear error."""
    src = str(ROOT / "csrc" / "cuda" / "pw_fused.cu")
    if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", src]).returncode:
        pytest.skip("pw_fused.cu differs from HEAD in this checkout")
    assert sass.main([src, "--base", "HEAD"]) == 0
    table = capsys.readouterr().out
    assert "pw_fused_kernel<__half>" in table and "->" not in table
    with pytest.raises(SystemExit):
        sass.main([src, "--base", "no-such-revision"])
    assert "base: git archive no-such-revision" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dw_tile():
    """dw_tile.cu's fp16 K = 3 kernels (nvcc compiles the whole file: ~80 s here)."""
    return sass.analyze(ROOT / "csrc" / "cuda" / "dw_tile.cu", "90", ["<__half, 3, "])


def _kernel(res, prefix):
    hits = [r for n, r in res.items() if sass.short_name(n) == prefix]
    assert len(hits) == 1, (prefix, list(res))
    return hits[0]


def test_dw_tile_claims(dw_tile):
    """What dw_tile.cu's comments say of its fp16 K = 3 code (ptxas sm_90): the eval
    apply kernel fits its 80-register cap without spills, the conv's kernel rows are a
    loop (kRollRows) of one row's six LDS.128 and 96 FFMA, and a staged copy costs at
    most 33 instructions (46 when each recomputed its 64-bit address)."""
    apply_ = _kernel(dw_tile, "dw_tile_apply_kernel<__half, 3, 1, false>")
    assert apply_["registers"] <= 80
    assert apply_["spill_stores"] == apply_["spill_loads"] == 0
    stage = [lp for lp in apply_["loops"] if any("stage_tile" in f for f in lp["functions"])]
    rows = [lp for lp in apply_["loops"] if any("strip_fma" in f for f in lp["functions"])]
    assert len(stage) == 1 and stage[0]["instructions"] <= 33, stage
    assert len(rows) == 1 and rows[0]["classes"]["fp32"] >= 96, rows
    stats = _kernel(dw_tile, "dw_tile_stats_kernel<__half, 3, 1>")
    assert stats["spill_stores"] == 0
