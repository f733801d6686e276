"""The emulated CUDA kernels (test_cuda_emu.py) once more, built with AddressSanitizer
and UndefinedBehaviorSanitizer (tests/cuda_emu/build.py, sanitize=True): a read or
write of a kernel past the end of a tensor or of its shared memory, and a vector
access at an address its width does not divide (a fault on a GPU), end the run with a
report, even where the value read is never used and so no comparison with the
reference could see it.

The instrumented module needs the ASan runtime loaded first, so the tests run in
subprocesses started with LD_PRELOAD: two probes first (the sanitizers are on and
report), then a subset of test_cuda_emu.py (SUBSET: the depthwise and pointwise
kernels in training, where every stage runs, in fp32 and fp16, whose vector widths
give different tile layouts, one thread order; the odd shapes, the misaligned tensors
and the tensor-core eval kernel). Found on its first run: nothing; a tile staging
bound moved one row past the image (`hi <= Hin`), which no comparison sees (that row's
taps are skipped), is a heap-buffer-overflow report here."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = ROOT / "tests" / "cuda_emu" / "build.py"
sys.path.insert(0, str(BUILD.parent))
import build as emu_build  # noqa: E402


# what the instrumented run covers (pytest -k over test_cuda_emu.py)
SUBSET = ("(depthwise_kernels and True-forward and (float32 or -float16-)) or "
          "(pointwise and (-float32-True- or -float16-True-)) or odd_shapes or misaligned or "
          "fused")


@pytest.fixture(scope="module")
def sanitized_env(tmp_path_factory):
    if emu_build.missing():
        pytest.skip(emu_build.missing())
    try:
        asan = emu_build.sanitizer_preload()
    except RuntimeError as e:
        pytest.skip(f"cannot build the instrumented emulator here: {e}")
    cxx = os.environ.get("CXX", "c++")
    libstdcxx = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    logs = tmp_path_factory.mktemp("sanitizers")
    # libstdc++ preloaded too: ASan then finds the real __cxa_throw for libraries that
    # throw C++ exceptions during import (Triton's, which torch imports)
    env = dict(os.environ, MBX_EMU_SANITIZE="1",
               LD_PRELOAD=":".join([asan] + ([os.path.realpath(libstdcxx)]
                                             if os.path.isabs(libstdcxx) else [])),
               ASAN_OPTIONS=f"detect_leaks=0:log_path={logs}/asan",
               UBSAN_OPTIONS=f"print_stacktrace=1:log_path={logs}/ubsan",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    build = subprocess.run([sys.executable, str(BUILD), "--sanitize"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return env, logs


def _reports(logs) -> str:
    """What the sanitizers wrote (their reports go to files: pytest's capture of fd 2
    would lose a report written just before the process ends)."""
    text = "".join(p.read_text() for p in sorted(logs.iterdir()))
    for p in logs.iterdir():
        p.unlink()
    # ASan's notice about ucontext (emu.h announces every switch) is not a report
    return "\n".join(line for line in text.splitlines()
                     if "doesn't fully support makecontext/swapcontext" not in line)


@pytest.mark.parametrize("kind, report", [
    ("oob", "AddressSanitizer: heap-buffer-overflow"),
    ("misaligned", "misaligned address"),
])
def test_sanitizers_report(sanitized_env, kind, report):
    """An emulated thread reading one element past a tensor, or 16 bytes from an
    address 8 bytes into it, ends the process with the sanitizer's report."""
    env, logs = sanitized_env
    code = ("import sys, torch; sys.path.insert(0, 'tests/cuda_emu'); import build; "
            f"build.load().probe('{kind}', torch.zeros(5, dtype=torch.float64))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    reports = _reports(logs)
    assert run.returncode != 0, f"the {kind} probe ran to its end:\n{run.stderr[-2000:]}"
    assert report in reports + run.stderr, reports + run.stderr[-2000:]


def test_emulated_kernels_under_sanitizers(sanitized_env):
    env, logs = sanitized_env
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SUBSET,
         str(ROOT / "tests" / "test_cuda_emu.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    reports = _reports(logs)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and not reports, \
        f"{summary}\n{reports[-6000:]}\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 120 and "skipped" not in summary, summary
