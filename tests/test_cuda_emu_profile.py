"""The memory-access counts of the emulated CUDA kernels (tests/cuda_emu/profile.h,
memprofile.py): first the counter itself on access patterns whose wavefronts and
sectors are known, then the layout claims of the never-run shared-memory tile kernels
(csrc/cuda/dw_tile.cu's header): conflict-free 16-byte shared loads at every channel
grouping and the fewest sectors for the stores of y."""
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cuda_emu"))
import build as emu_build  # noqa: E402
import memprofile  # noqa: E402


@pytest.fixture(scope="module")
def prof():
    if emu_build.missing():
        pytest.skip(emu_build.missing())
    return memprofile.module()


@pytest.fixture(autouse=True)
def knobs(monkeypatch):
    for k in emu_build.KNOBS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MBX_EMU_TRACE", "1")


# (bytes per lane, shared stride, global stride) -> (shared wavefronts, their ideal,
# global sectors, their ideal) of one warp's load
PATTERNS = [
    ((4, 4, 4), (1, 1, 4, 4)),        # consecutive words: one wavefront, 128 B = 4 sectors
    ((4, 8, 32), (2, 1, 32, 4)),      # every other word: lanes l, l+16 share a bank; a
                                      # sector per lane
    ((4, 128, 0), (32, 1, 1, 1)),     # 32 words of one bank; one address for every lane
    ((4, 0, 4), (1, 1, 4, 4)),        # one shared word for every lane: a broadcast
    ((16, 16, 16), (4, 4, 16, 16)),   # 16-byte vectors: 4 phases of 8 lanes
    ((16, 32, 16), (8, 4, 16, 16)),   # every other 16-byte unit: 2 wavefronts a phase
]


@pytest.mark.parametrize("pattern, expect", PATTERNS, ids=lambda v: "-".join(map(str, v)))
def test_counts_of_known_patterns(prof, pattern, expect):
    nbytes, shared_stride, global_stride = pattern
    t = torch.zeros(4096, dtype=torch.uint8)
    prof.profile_take()
    prof.profile_probe(t, nbytes, shared_stride, global_stride)
    k = prof.profile_take()["profile_probe"]
    assert k["shared_load"][nbytes] == (1, expect[0], expect[1], 32 * nbytes), k
    assert k["global_load"][nbytes][:3] == (1, expect[2], expect[3]), k
    assert not any(k[kind] for kind in ("shared_store", "global_store")), k


# (C, H) of fp16 K=3 stride-1 layers at padding 0 whose output width the tile width
# divides, and the channel groups per block pick_tile takes there (so every lane runs
# every tap and the requests pair lanes as a GPU does); grid = tile rows x channel blocks
TILES = [(32, 66, 2, 16), (144, 34, 4, 20), (128, 18, 8, 4), (256, 10, 16, 2)]


@pytest.mark.parametrize("c, h, cg, grid", TILES, ids=lambda v: str(v))
def test_tile_apply_layout(prof, capfd, monkeypatch, c, h, cg, grid):
    """The tile's skew (CG 2, 4) or its channel groups (CG 8, 16) spread each warp's
    LDS.128 of a strip column over all bank quads: as few wavefronts as the bytes
    allow; the 16-byte stores of y (CG groups of adjacent channels per pixel) take as
    few sectors as their bytes."""
    monkeypatch.setenv("MOBILENET_EXT_DW_TILE", "1")
    capfd.readouterr()
    profile = memprofile.run_dw(prof, c, h, 3, 1, pad=0)
    trace = capfd.readouterr().err
    assert f"dw_tile_apply_kernel<T, K, S, kDc> grid ({grid},1,1)" in trace, trace  # CG
    k = profile["dw_tile_apply_kernel<T, K, S, kDc>"]
    req, units, ideal, nbytes = k["shared_load"][16]
    assert req > 0 and units == ideal, k["shared_load"]
    req, units, ideal, nbytes = k["global_store"][16]
    assert nbytes == c * (h - 2) ** 2 * 2 and units == ideal, k["global_store"]
