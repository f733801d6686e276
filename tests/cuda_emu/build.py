"""Builds the ops' CUDA sources as host C++ (see emu.h) into a Python module whose
dw_fwd / dw_bwd / pw_fwd / pw_bwd are the CUDA implementations (csrc/cuda/*_cuda.cpp)
running on CPU tensors. For tests: the CUDA kernels' index math, bounds, barriers and
reductions checked where no GPU is.

load(sanitize=True) builds a second module, instrumented with AddressSanitizer and
UndefinedBehaviorSanitizer: every access of an emulated kernel past a tensor's or a
shared-memory buffer's end, and every misaligned vector access (a fault on a GPU:
16-byte loads need 16-byte addresses), ends the process with a report. The ASan
runtime must be the process's first library: run Python with
LD_PRELOAD=`sanitizer_preload()` (test_cuda_emu_sanitized.py does)."""
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
# the depthwise op's CUDA implementation and what it calls
# the CUDA implementations of both ops (*_cuda.cpp) and every kernel they launch: the
# pointwise eval kernel on tensor cores (pw_fused.cu) with shadow/mma.h's WMMA; the
# GEMMs of the other pointwise paths are cuBLAS's (at::mm on the CPU tensors here)
UNITS = ["host.cpp", "cuda/dw_conv_cuda.cpp", "cuda/pw_conv_cuda.cpp", "cuda/dw_conv.cu",
         "cuda/dw_vec.cu", "cuda/dw_tile.cu", "cuda/bn_fold.cu", "cuda/pw_conv.cu",
         "cuda/pw_fused.cu"]

_NAME = r"[A-Za-z_][\w:]*(?:\s*<(?:[^<>;]|<(?:[^<>;]|<[^<>;]*>)*>)*>)?"
_LAUNCH = re.compile(rf"({_NAME})\s*<<<(.*?)>>>", re.S)
_DYN_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?((?:\w+\s+)*?\w+)\s+(\w+)\[\];")
_STATIC_SMEM = re.compile(r"__shared__\s+(\w+)\s+([^;]+);")
_DECLARATOR = re.compile(r"(\w+)((?:\[[^\]]+\])+)")
_REGISTER = re.compile(r"TORCH_LIBRARY_IMPL\(mobilenet_ext, CUDA, m\) \{.*?\n\}", re.S)
_IMPL = re.compile(r'm\.impl\("(\w+)", &(\w+)\);')
_MODULE = """#include <torch/extension.h>
namespace mbx {{
{decls}
}}
// cuBLAS's fp16/bf16 GEMMs with an fp32 output (host.cpp's pw_conv_gemm), which ATen
// has on CUDA only: the same products in fp32 on the CPU
static at::Tensor mm_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType dt) {{
  return at::mm(a.to(dt), b.to(dt));
}}
static at::Tensor bmm_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType dt) {{
  return at::bmm(a.to(dt), b.to(dt));
}}
TORCH_LIBRARY_IMPL(aten, CPU, m) {{
  m.impl("mm.dtype", mm_dtype);
  m.impl("bmm.dtype", bmm_dtype);
}}
// The sanitizers' own check: one emulated thread reads past the end of a float64
// tensor ("oob") or loads 16 bytes from an address 8 bytes into it ("misaligned").
#include "cuda/emu.h"
cudaError_t emu::last_error_extern() {{ return ::emu::get_last_error(); }}
static double probe(const std::string& kind, const at::Tensor& t) {{
  const double* p = t.const_data_ptr<double>();
  const int64_t n = t.numel();
  double r = 0.0;
  ::emu::launch("probe", dim3(1), dim3(1)).run([&] {{
    if (kind == "oob") r = p[n];
    else r = double(reinterpret_cast<const uint4*>(p + 1)->x);
  }});
  return r;
}}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{
{calls}
  m.def("probe", &probe);
}}
"""


# The inline PTX the kernels use (whitespace-normalised template) -> the emulator's
# call, {0}, {1}, ... the asm's input operands in order. Any other asm fails the build.
_ASM = {
    "cp.async.cg.shared.global [%0], [%1], 16;": "::emu::cp_async({0}, {1}, 16)",
    "cp.async.cg.shared.global [%0], [%1], 16, %2;": "::emu::cp_async({0}, {1}, {2})",
    "cp.async.commit_group;": "::emu::cp_async_commit()",
    "cp.async.wait_group %0;": "::emu::cp_async_wait({0})",
    "cp.async.wait_group 0;": "::emu::cp_async_wait(0)",
}
_ASM_STMT = re.compile(r'asm\s+volatile\s*\(\s*"((?:[^"\\]|\\.)*)"(.*?)\)\s*;', re.S)
_OPERAND = re.compile(r'"[^"]*"\s*\(')


def _balanced(text: str, i: int) -> int:
    """The index just past the parenthesised expression that starts at text[i] == "("."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    raise AssertionError("unbalanced parentheses")


def _rewrite_asm(path: pathlib.Path, text: str) -> str:
    def one(m) -> str:
        template = " ".join(m.group(1).replace("\\n", " ").split())
        assert template in _ASM, f"{path}: inline PTX the emulator lacks: {template!r}"
        parts = m.group(2).split(":")
        inputs = parts[2] if len(parts) > 2 else ""
        args = []
        for op in _OPERAND.finditer(inputs):
            end = _balanced(inputs, op.end() - 1)
            args.append(inputs[op.end():end - 1].strip())
        return _ASM[template].format(*args) + ";"

    return _ASM_STMT.sub(one, text)


def _rewrite_launches(text: str) -> tuple[str, int]:
    """`name<<<cfg>>>(args)` -> `::emu::launch("name", cfg).run([=] { name(args); })`:
    a lambda, so that the kernel's template arguments are deduced from args as nvcc
    deduces them."""
    out, pos, n = [], 0, 0
    for m in _LAUNCH.finditer(text):
        if m.start() < pos:
            continue
        i = m.end()
        while text[i].isspace():
            i += 1
        assert text[i] == "(", "a launch without arguments"
        depth, j = 0, i
        while True:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            if depth == 0:
                break
            j += 1
        name, cfg, args = m.group(1), m.group(2), text[i:j + 1]
        key = " ".join(name.split()).replace('"', "")
        out.append(text[pos:m.start()])
        out.append(f'::emu::launch("{key}", {cfg}).run([=] {{ {name}{args}; }})')
        pos, n = j + 1, n + 1
    out.append(text[pos:])
    return "".join(out), n


def _static_smem(path: pathlib.Path, text: str) -> str:
    """Every `__shared__ T a[n], b[m];` -> references to the block's poisoned arrays
    (emu::shared), each keyed by its file and its place there."""
    count = iter(range(1 << 30))

    def one(m) -> str:
        out = []
        for name, dims in _DECLARATOR.findall(m.group(2)):
            bounds = "".join(f"[({d[1:-1]})]" for d in re.findall(r"\[[^\]]+\]", dims))
            key = f"{path.name}:{next(count)}"
            out.append(f'auto& {name} = ::emu::shared<{m.group(1)}{bounds}>("{key}");')
        assert out, m.group(0)
        return " ".join(out)

    return _STATIC_SMEM.sub(one, text)


def transform(path: pathlib.Path, text: str) -> str:
    if path.suffix in (".cu", ".cuh") or path.name == "launch.h":
        text, n = _rewrite_launches(text)
        assert "<<<" not in text, f"{path}: a launch the rewrite missed"
        text = _rewrite_asm(path, text)
        assert "asm" not in re.sub(r"//.*", "", text).split(), f"{path}: asm the rewrite missed"
        text = _DYN_SMEM.sub(r"\1* \2 = ::emu::dyn_smem<\1>();", text)
        assert "extern __shared__" not in text, f"{path}: dynamic shared memory not rewritten"
        text = _static_smem(path, text)
        assert "__shared__" not in text, f"{path}: shared memory not rewritten"
        text = f'#include "emu.h"\n' + text if n or path.suffix == ".cu" else text
    if path.name.endswith("_cuda.cpp"):  # its CUDA registration -> pybind11 functions
        blocks = _REGISTER.findall(text)
        assert len(blocks) == 1, f"{path}: the CUDA registration block not found"
        body = "\n".join(f'  m.def("{op}", &{fn});' for op, fn in _IMPL.findall(blocks[0]))
        text = "#include <torch/extension.h>\n" + _REGISTER.sub(
            f"void emu_bind_{path.stem}(pybind11::module_& m) {{\n{body}\n}}", text)
    return text


def _unit_name(rel: pathlib.Path) -> pathlib.Path:
    """Where a source goes in the build tree: a .cu unit as x_cu.cpp (compiled as C++)."""
    return rel.with_name(rel.stem + "_cu.cpp") if rel.suffix == ".cu" else rel


def _write(dst: pathlib.Path, text: str):
    if not dst.exists() or dst.read_text() != text:  # unchanged files keep their mtime
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text)


SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize=vptr",
            "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def sanitizer_preload() -> str:
    """The ASan runtime of the compiler that builds the module (for LD_PRELOAD)."""
    cxx = os.environ.get("CXX", "c++")
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True,
                          text=True, timeout=60).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"{cxx} has no AddressSanitizer runtime (libasan.so)")
    return os.path.realpath(path)


def load(verbose=False, sanitize=None):
    """The emulator module; sanitize (default: env MBX_EMU_SANITIZE=1) builds the
    instrumented one, in its own directory."""
    from torch.utils import cpp_extension
    if sanitize is None:
        sanitize = os.environ.get("MBX_EMU_SANITIZE") == "1"
    out = ROOT / "build" / ("cuda_emu_sanitized" if sanitize else "cuda_emu")
    if sanitize:  # the compilers need no sanitizer runtime (under ASan's, they run slower)
        os.environ.pop("LD_PRELOAD", None)
    src = out / "src"
    for p in CSRC.rglob("*"):
        if p.suffix in (".h", ".cuh") or p.relative_to(CSRC).as_posix() in UNITS:
            _write(src / _unit_name(p.relative_to(CSRC)), transform(p, p.read_text()))
    _write(src / "cuda" / "emu.h", (HERE / "emu.h").read_text())
    binds = [pathlib.Path(u).stem for u in UNITS if u.endswith("_cuda.cpp")]
    _write(src / "emu_module.cpp", _MODULE.format(
        decls="\n".join(f"void emu_bind_{b}(pybind11::module_& m);" for b in binds),
        calls="\n".join(f"  mbx::emu_bind_{b}(m);" for b in binds)))
    sources = [str(src / "emu_module.cpp")]
    sources += [str(src / _unit_name(pathlib.Path(u))) for u in UNITS]
    flags = ["-O1" if sanitize else "-O2", "-fno-strict-aliasing", "-ffp-contract=off",
             "-DMBX_WITH_CUDA", "-Wno-unused-function", "-Wno-attributes"]
    cuda_include = _cuda_include()
    return cpp_extension.load(
        name="mbx_cuda_emu_sanitized" if sanitize else "mbx_cuda_emu", sources=sources,
        build_directory=str(_mkdir(out / "obj")),
        extra_include_paths=[str(HERE / "shadow"), str(src), cuda_include],
        extra_cflags=flags + (SANITIZE if sanitize else []),
        extra_ldflags=SANITIZE if sanitize else [], with_cuda=False, verbose=verbose)


def _mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def _cuda_include():
    """The CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h): from CUDA_HOME, or
    where `nvcc` on PATH says its toolkit is (its --dryrun prints TOP=<root>/bin/..,
    also when `nvcc` is a wrapper script)."""
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if shutil.which("nvcc"):
        with tempfile.TemporaryDirectory() as d:
            cu = os.path.join(d, "probe.cu")
            open(cu, "w").close()
            out = subprocess.run(["nvcc", "--dryrun", "-c", cu, "-o", cu + ".o"],
                                 capture_output=True, text=True, timeout=120)
        roots += re.findall(r"^#\$ TOP=(\S+)", out.stdout + out.stderr, re.M)
    for root in roots:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.realpath(os.path.join(root, "include"))
    raise RuntimeError("no CUDA toolkit headers (cuda_runtime.h): set CUDA_HOME")


if __name__ == "__main__":
    import sys
    print(load(verbose=True, sanitize="--sanitize" in sys.argv or None))
