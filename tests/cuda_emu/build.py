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
import subprocess
import sys

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
#ifdef EMU_PROFILE
// profile.h's hooks: the calls -fsanitize=kernel-address puts before every access of
// the instrumented units (not themselves instrumented; what they call runs with the
// logging off)
__attribute__((no_sanitize_address)) static void hook(void* pc, void* p, uint32_t n, bool store) {{
  if (!::emu::prof::g_on) return;
  ::emu::prof::g_on = false;
  ::emu::prof_access(pc, p, n, store);
  ::emu::prof::g_on = true;
}}
#define EMU_HOOK(n)                                                                       \
  extern "C" __attribute__((no_sanitize_address)) void __asan_load##n##_noabort(void* p) {{  \
    hook(__builtin_return_address(0), p, n, false);                                       \
  }}                                                                                      \
  extern "C" __attribute__((no_sanitize_address)) void __asan_store##n##_noabort(void* p) {{ \
    hook(__builtin_return_address(0), p, n, true);                                        \
  }}
EMU_HOOK(1)
EMU_HOOK(2)
EMU_HOOK(4)
EMU_HOOK(8)
EMU_HOOK(16)
extern "C" __attribute__((no_sanitize_address)) void __asan_loadN_noabort(void* p, size_t n) {{
  hook(__builtin_return_address(0), p, uint32_t(n), false);
}}
extern "C" __attribute__((no_sanitize_address)) void __asan_storeN_noabort(void* p, size_t n) {{
  hook(__builtin_return_address(0), p, uint32_t(n), true);
}}
extern "C" void __asan_handle_no_return() {{}}
extern "C" void __asan_before_dynamic_init(const char*) {{}}
extern "C" void __asan_after_dynamic_init() {{}}

// {{kernel: {{"shared_load"|"shared_store"|"global_load"|"global_store": {{access bytes:
//   (requests, wavefronts or sectors, ideal, bytes)}}}}}}, and the totals cleared
static pybind11::dict profile_take() {{
  pybind11::dict out;
  const char* names[2][2] = {{{{"global_load", "global_store"}}, {{"shared_load", "shared_store"}}}};
  for (const auto& kv : ::emu::prof::g_totals) {{
    pybind11::dict k;
    for (int sh = 0; sh < 2; ++sh)
      for (int st = 0; st < 2; ++st) {{
        pybind11::dict by_size;  // access size in bytes (0: other sizes) -> counts
        for (int z = 0; z < 6; ++z) {{
          const auto& c = kv.second.c[sh][st][z];
          if (c.requests)
            by_size[pybind11::int_(z < 5 ? 1 << z : 0)] =
                pybind11::make_tuple(c.requests, c.units, c.ideal, c.bytes);
        }}
        k[names[sh][st]] = by_size;
      }}
    out[pybind11::str(kv.first)] = k;
  }}
  ::emu::prof::g_totals.clear();
  for (const auto& kv : ::emu::prof::g_by_pc) {{
    const auto& c = kv.second;
    std::fprintf(stderr, "emu pc %s 0x%lx %s %s %uB req %lu units %lu ideal %lu\\n",
                 std::get<0>(kv.first).c_str(), (unsigned long)std::get<1>(kv.first),
                 std::get<2>(kv.first) ? "shared" : "global", std::get<3>(kv.first) ? "store" : "load",
                 std::get<4>(kv.first), (unsigned long)c.requests, (unsigned long)c.units,
                 (unsigned long)c.ideal);
  }}
  ::emu::prof::g_by_pc.clear();
  return out;
}}

// profile.h's own check: one warp; lane l loads `bytes` (4 or 16) from shared memory
// at byte l * shared_stride and from t at byte l * global_stride
static void profile_probe(const at::Tensor& t, int64_t bytes, int64_t shared_stride,
                          int64_t global_stride) {{
  const auto* g = static_cast<const unsigned char*>(t.const_data_ptr());
  const size_t smem = size_t(32 * shared_stride + 16);
  TORCH_CHECK(t.nbytes() >= size_t(32 * global_stride + 16), "probe tensor too small");
  ::emu::launch("profile_probe", dim3(1), dim3(32), smem).run([=] {{
    const auto* s = ::emu::dyn_smem<unsigned char>();
    const unsigned l = threadIdx.x;
    if (bytes == 16) {{
      volatile uint4 a = *reinterpret_cast<const uint4*>(s + l * shared_stride);
      volatile uint4 b = *reinterpret_cast<const uint4*>(g + l * global_stride);
      (void)a;
      (void)b;
    }} else {{
      volatile float a = *reinterpret_cast<const float*>(s + l * shared_stride);
      volatile float b = *reinterpret_cast<const float*>(g + l * global_stride);
      (void)a;
      (void)b;
    }}
  }});
}}
#endif
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{
{calls}
  m.def("probe", &probe);
#ifdef EMU_PROFILE
  m.def("profile_take", &profile_take);
  m.def("profile_probe", &profile_probe);
#endif
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


# profile.h's build: a call before every access (GCC's kernel-ASan mode with hooks of
# our own), no shadow memory, no checks of globals or the stack
PROFILE = ["-DEMU_PROFILE", "-fsanitize=kernel-address", "-fno-tree-sra",
           "--param", "asan-instrumentation-with-call-threshold=0",
           "--param", "asan-globals=0", "--param", "asan-stack=0"]


def load(verbose=False, sanitize=None, profile=False):
    """The emulator module; sanitize (default: env MBX_EMU_SANITIZE=1) builds the
    instrumented one, profile the access-counting one (profile.h), each in its own
    directory."""
    from torch.utils import cpp_extension
    if sanitize is None:
        sanitize = os.environ.get("MBX_EMU_SANITIZE") == "1"
    assert not (sanitize and profile), "one instrumentation at a time"
    variant = "cuda_emu_sanitized" if sanitize else "cuda_emu_profile" if profile else "cuda_emu"
    out = ROOT / "build" / variant
    if sanitize:  # the compilers need no sanitizer runtime (under ASan's, they run slower)
        os.environ.pop("LD_PRELOAD", None)
    src = out / "src"
    for p in CSRC.rglob("*"):
        if p.suffix in (".h", ".cuh") or p.relative_to(CSRC).as_posix() in UNITS:
            _write(src / _unit_name(p.relative_to(CSRC)), transform(p, p.read_text()))
    for header in ("emu.h", "profile.h"):
        _write(src / "cuda" / header, (HERE / header).read_text())
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
        name="mbx_" + variant, sources=sources, build_directory=str(_mkdir(out / "obj")),
        extra_include_paths=[str(HERE / "shadow"), str(src), cuda_include],
        extra_cflags=flags + (SANITIZE if sanitize else []) + (PROFILE if profile else []),
        extra_ldflags=SANITIZE if sanitize else [], with_cuda=False, verbose=verbose)


# the environment switches the emulated kernels read (the tests start each from none)
KNOBS = ("MOBILENET_EXT_VEC", "MOBILENET_EXT_DW_TILE", "MOBILENET_EXT_DW_TILE_SPLIT",
         "MOBILENET_EXT_PW_FUSED", "MOBILENET_EXT_PW_SAVE", "MBX_EMU_SMS", "MBX_EMU_TRACE",
         "MBX_EMU_ORDER")


def missing() -> str | None:
    """Why the emulator cannot be built or run here, or None."""
    if sys.platform != "linux":
        return "the emulator's fibers are glibc's ucontext"
    try:
        _cuda_include()
    except RuntimeError as e:
        return f"no CUDA toolkit headers to compile the kernels with: {e}"
    return None


def _mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def _cuda_include():
    """The CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h): from CUDA_HOME, or
    where `nvcc` on PATH says its toolkit is (bench.sass.toolkit_roots)."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.sass import toolkit_roots
    finally:
        sys.path.pop(0)
    for root in toolkit_roots():
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.realpath(os.path.join(root, "include"))
    raise RuntimeError("no CUDA toolkit headers (cuda_runtime.h): set CUDA_HOME")


if __name__ == "__main__":
    print(load(verbose=True, sanitize="--sanitize" in sys.argv or None,
               profile="--profile" in sys.argv))
