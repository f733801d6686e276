"""Builds mobilenet_ext._C: C++ CPU kernels always, CUDA kernels when a CUDA
toolkit and a CUDA build of torch are present (no GPU needed to build).

Environment switches:
  MOBILENET_EXT_CUDA=auto|1|0   build CUDA kernels when possible (default) / always / never
  TORCH_CUDA_ARCH_LIST          e.g. "9.0"; default: the visible GPUs, else "8.0;9.0+PTX"
  MAX_JOBS                      parallel compile jobs (ninja)
  CUDA_HOME                     toolkit root; otherwise derived from `nvcc` on PATH, which
                                may be a wrapper script that execs the real compiler
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_from_nvcc():
    """Root of the CUDA toolkit whose nvcc runs when `nvcc` is called.

    `nvcc` on PATH may be a shell wrapper (`exec /opt/cuda-X/bin/nvcc "$@"`), so
    torch's guess (dirname of dirname of the PATH entry) would be wrong.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        m = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if m:
            real = os.path.realpath(m.group(1).decode())
    root = os.path.dirname(os.path.dirname(real))
    return root if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) else None


def _cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isdir(os.environ[var]):
            return os.environ[var]
    found = _toolkit_from_nvcc()
    if found is None and os.path.isdir("/usr/local/cuda/include"):
        found = "/usr/local/cuda"
    return found


MODE = os.environ.get("MOBILENET_EXT_CUDA", "auto").lower()
if MODE not in ("auto", "1", "0"):
    sys.exit(f"MOBILENET_EXT_CUDA must be auto, 1 or 0, got {MODE!r}")
cuda_home = _cuda_home() if MODE != "0" else None
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = MODE != "0" and cuda_home is not None and torch.version.cuda is not None
if MODE == "1" and not with_cuda:
    why = "no CUDA toolkit found (set CUDA_HOME)" if cuda_home is None else (
        f"torch {torch.__version__} is a CPU-only build")
    sys.exit(f"MOBILENET_EXT_CUDA=1 but the CUDA kernels cannot be built: {why}")
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    print("mobilenet_ext: no GPU visible, building for TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX "
          "(set it to your GPU's compute capability to build faster)")

csrc = os.path.join(ROOT, "csrc")
sources = [os.path.relpath(p, ROOT) for p in
           sorted(glob.glob(f"{csrc}/*.cpp")) + sorted(glob.glob(f"{csrc}/cpu/*.cpp"))]
cxx_flags = ["-O3"]  # the C++ standard is the one torch requires (added by cpp_extension)


def _openmp_flags():
    """at::parallel_for is a header template: under torch's OpenMP backend its
    `#pragma omp parallel` is compiled into this extension, and without the flag
    every CPU kernel runs on one thread. Not linked against an OpenMP runtime: the
    GOMP symbols bind to the one torch already loaded (a second runtime would
    ignore torch.set_num_threads)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    if sys.platform == "win32":
        return ["/openmp"]
    if not _compiler_is_gcc():
        # clang's -fopenmp calls the LLVM runtime (__kmpc_*), which torch's libgomp lacks
        print("mobilenet_ext: not GCC, so no OpenMP: the CPU kernels run on one thread "
              "(build with GCC for parallel CPU kernels)")
        return []
    return ["-fopenmp"]


def _compiler_is_gcc():
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        out = subprocess.run(shlex.split(cxx) + ["--version"], capture_output=True, text=True,
                             timeout=60).stdout.lower()
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out and ("gcc" in out or "free software foundation" in out)


cxx_flags += _openmp_flags()
if with_cuda:
    sources += [os.path.relpath(p, ROOT) for p in
                sorted(glob.glob(f"{csrc}/cuda/*.cpp")) + sorted(glob.glob(f"{csrc}/cuda/*.cu"))]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                  f"--threads={os.environ.get('NVCC_THREADS', '1')}"]
    ext = CUDAExtension(
        "mobilenet_ext._C", sources, include_dirs=[csrc],
        extra_compile_args={"cxx": cxx_flags + ["-DMBX_WITH_CUDA"], "nvcc": nvcc_flags},
        py_limited_api=False)
else:
    ext = CppExtension("mobilenet_ext._C", sources, include_dirs=[csrc],
                       extra_compile_args={"cxx": cxx_flags})

print(f"mobilenet_ext: building {'C++ CPU + CUDA' if with_cuda else 'C++ CPU only'} kernels"
      + (f" (CUDA_HOME={cuda_home}, arch {os.environ.get('TORCH_CUDA_ARCH_LIST')})"
         if with_cuda else ""))

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
