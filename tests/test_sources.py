"""The C++/CUDA sources stay C++17: torch 2.11 (the GPU machine's, and any user's older
torch) builds extensions with -std=c++17, torch 2.14 (CI's) with c++20, so CI's own build
cannot catch a C++20-only construct (std::popcount broke the 2.11 build once)."""
import pathlib
import re

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CXX20 = [r"#include\s*<(bit|span|concepts|ranges|numbers|format|compare|source_location)>",
         r"\bstd::(popcount|bit_cast|countl_zero|countr_zero|has_single_bit|span|ranges)\b",
         r"\b(consteval|constinit|co_await|co_yield|co_return)\b", r"<=>",
         r"\brequires\s*[({]", r"\[[^\]]*\]\s*<\s*(typename|class|int)\b"]


def test_no_cxx20_only_constructs():
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh"})
    assert files, "no sources found"
    hits = [f"{p.relative_to(CSRC)}:{i}: {line.strip()}"
            for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if any(re.search(r, line.split("//")[0]) for r in CXX20)]
    assert not hits, "C++20-only constructs (torch 2.11 builds as C++17):\n" + "\n".join(hits)
