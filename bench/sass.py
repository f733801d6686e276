"""What a CUDA source compiles to, without a GPU: each kernel's registers, spills and
SASS instructions (nvcc -cubin for one architecture, disassembled with line info),
by instruction class, by source function and by loop.

    python -m bench.sass csrc/cuda/dw_tile.cu --kernel "dw_tile_apply_kernel<__half, 3, 1, false>"
    python -m bench.sass csrc/cuda/pw_fused.cu --arch 90 --json out.json
    python -m bench.sass csrc/cuda/dw_tile.cu --kernel "<__half, 3, 1" --base HEAD

The counts are static: a straight-line (fully unrolled) region runs each of its
instructions once per thread, a loop's body once per iteration, and code behind a
branch only when the branch is taken (the activations' switch, edge cases), so
compare the region a change touches, before and after. A kernel-work aid, as
bench.profile is: a prediction written from these counts is checked by `python -m
bench` on a GPU. Needs nvcc and nvdisasm (the CUDA toolkit's, or the copy Triton
ships), and c++filt for the kernel names."""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# SASS opcode (before the first '.') -> class, in the order the report prints them
CLASSES = {
    "fp32": "FFMA FADD FMUL FMNMX FSEL FSETP FSET FCHK MUFU FRND FSWZADD",
    "fp16/convert": "HADD2 HFMA2 HMUL2 HMNMX2 HSETP2 HSET2 F2F F2FP F2I I2F I2FP F2IP",
    "tensor core": "HMMA IMMA DMMA HGMMA",
    "fp64": "DFMA DADD DMUL DSETP DMNMX",
    "int/address": "IADD3 IMAD IMAD.WIDE LEA LEA.HI SHF LOP3 ISETP SEL IABS IMNMX POPC FLO "
                   "PRMT BMSK BREV SGXT IDP IADD IMUL IMNMX VIADD VIMNMX PLOP3 P2R R2P",
    "move": "MOV CS2R SHFL",
    "shared mem": "LDS STS LDSM ATOMS",
    "global mem": "LDG STG LDGSTS RED ATOMG ATOM LD ST",
    "local mem (spill)": "LDL STL",
    "constant": "LDC ULDC",
    "uniform": "UMOV ULEA UIADD3 UIMAD USHF ULOP3 UISETP USEL UFLO UPOPC UPRMT S2UR R2UR "
               "UBMSK ULOP UP2UR",
    "special reg": "S2R CS2R.32",
    "control": "BRA BSSY BSYNC BAR EXIT CALL RET WARPSYNC DEPBAR LDGDEPBAR NOP YIELD "
               "BREAK JMP JMX BPT KILL MEMBAR ERRBAR CCTL",
}
_CLASS_OF = {op: c for c, ops in CLASSES.items() for op in ops.split()}


def op_class(opcode: str) -> str:
    """The class of a SASS opcode ('FFMA', 'HADD2.F32', 'LDS.128', ...)."""
    base = opcode.split(".")[0]
    return _CLASS_OF.get(base, "other")


def toolkit_roots() -> list:
    """CUDA toolkit roots, most trusted first: CUDA_HOME / CUDA_PATH, then the root of
    the toolkit `nvcc` on PATH runs (its --dryrun prints TOP=<root>/bin/..; also when
    `nvcc` is a wrapper script). tests/cuda_emu/build.py finds the headers with it."""
    roots = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if shutil.which("nvcc"):
        with tempfile.TemporaryDirectory() as d:
            cu = os.path.join(d, "probe.cu")
            open(cu, "w").close()
            out = subprocess.run(["nvcc", "--dryrun", "-c", cu, "-o", cu + ".o"],
                                 capture_output=True, text=True, timeout=120)
        roots += re.findall(r"^#\$ TOP=(\S+)", out.stdout + out.stderr, re.M)
    return roots


def find_tool(name: str) -> str:
    """A CUDA binary tool: in a toolkit root's bin (toolkit_roots), on PATH, or Triton's
    copy (which ships nvdisasm where a toolkit may lack it)."""
    cands = [Path(root) / "bin" / name for root in toolkit_roots()]
    if shutil.which(name):
        cands.append(Path(shutil.which(name)))
    try:
        import triton
        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError(f"{name} not found (a toolkit's bin, PATH, triton)")


def compile_cubin(src: Path, arch: str, out: Path, defines=()) -> str:
    """nvcc -cubin with the extension's flags (setup.py) and -Xptxas -v; returns
    ptxas's report."""
    cmd = [find_tool("nvcc"), "-cubin", f"-arch=sm_{arch}", "-O3", "-lineinfo",
           "--expt-relaxed-constexpr", "-std=c++17", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'csrc' / 'cuda'}", "-Xptxas", "-v", str(src), "-o", str(out)]
    cmd += [f"-D{d}" for d in defines]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
    return r.stderr + r.stdout


def demangle(names):
    """Mangled -> readable names (c++filt; the mangled name where it is missing)."""
    names = list(names)
    tool = shutil.which("c++filt")
    if not tool or not names:
        return dict(zip(names, names))
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.split("\n")
    return {m: (d if d else m) for m, d in zip(names, out)}


def parse_ptxas(report: str) -> dict:
    """mangled kernel -> {'registers', 'spill_stores', 'spill_loads', 'stack'}."""
    res, entry, props = {}, None, None  # registers: of the entry being compiled;
    for line in report.splitlines():  # the frame line: of the function named last
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry = props = res.setdefault(m.group(1), {})
            continue
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            props = res.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                      r"spill loads", line)
        if m and props is not None:
            props.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                         spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and entry is not None:
            entry["registers"] = int(m.group(1))
    return res


_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def parse_disasm(text: str) -> dict:
    """nvdisasm -gi output -> mangled kernel -> list of instructions, each
    {'addr', 'op', 'text', 'chain': [(file, line), ...] innermost first, 'target'}."""
    kernels, cur, chain, fresh, labels = {}, None, [], True, {}
    pending_labels = []
    for line in text.splitlines():
        m = re.match(r"\s*\.text\.(\S+):$", line)  # a kernel's section starts
        if m:
            cur = kernels.setdefault(m.group(1), [])
            chain, fresh, pending_labels = [], True, []
            continue
        if cur is None:
            continue
        if "//##" in line:
            if fresh:  # the first line-info comment after an instruction: the full chain
                chain = [(f, int(n)) for f, n in _FILE_LINE.findall(line)]
                fresh = False
            continue
        lm = _LABEL.match(line.strip())
        if lm:
            pending_labels.append(lm.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            text_ = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            op = text_.split()[0] if text_ else "?"
            tgt = re.search(r"`\((\.L_x_\d+)\)", m.group(2))
            for lab in pending_labels:
                labels[lab] = addr
            pending_labels = []
            cur.append({"addr": addr, "op": op, "text": text_, "chain": chain,
                        "target": tgt.group(1) if tgt else None})
            fresh = True
    for ins in (i for k in kernels.values() for i in k):
        ins["target"] = labels.get(ins["target"]) if ins["target"] else None
    return {k: v for k, v in kernels.items() if v}


# a definition's first line: __device__/__global__ or common.h's MBX_HD, then the name
_QUALS = ("__device__", "__global__", "MBX_HD")
_FUNC = re.compile(r"(?:__device__|__global__|MBX_HD)[^;{]*?\b((?:operator\s*\(\s*\))|"
                   r"[A-Za-z_]\w*)\s*\(")


class SourceFunctions:
    """(file, line) -> the name of the __device__/__global__ function whose definition
    starts nearest above it: lambdas count as the function they are written in."""

    def __init__(self):
        self._starts = {}

    def _load(self, path: str) -> list:
        if path not in self._starts:
            starts = []
            try:
                lines = Path(path).read_text().splitlines()
            except OSError:
                lines = []
            for i, line in enumerate(lines):
                if not any(q in line for q in _QUALS) or line.lstrip().startswith("#"):
                    continue
                joined = re.sub(r"__launch_bounds__\s*\([^)]*\)", "",
                                " ".join(lines[i:i + 3]))
                m = _FUNC.search(joined)
                if m:
                    starts.append((i + 1, m.group(1).replace(" ", "")))
            self._starts[path] = starts
        return self._starts[path]

    def name(self, path: str, line: int) -> str:
        best = None
        for start, fn in self._load(path):
            if start <= line:
                best = fn
        return f"{Path(path).name}:{best or '?'}"


def loops(instrs: list) -> list:
    """Backward branches: (first address, branch address) of each loop (not the
    branch-to-itself that pads a kernel's end)."""
    return sorted((i["target"], i["addr"]) for i in instrs
                  if i["op"].startswith("BRA") and i["target"] is not None
                  and i["target"] < i["addr"])


def short_name(name: str) -> str:
    """'void ns::(anonymous namespace)::k<float, 3>(args)' -> 'k<float, 3>'."""
    name = name.replace("(anonymous namespace)::", "").split("(")[0]
    name = name[5:] if name.startswith("void ") else name
    head = name.split("<")[0]
    return name[head.rfind("::") + 2:] if "::" in head else name


def summarize(instrs: list, funcs: SourceFunctions) -> dict:
    by_class = collections.Counter(op_class(i["op"]) for i in instrs)
    by_func = collections.Counter(
        funcs.name(*i["chain"][0]) if i["chain"] else "?" for i in instrs)
    by_op = collections.Counter(i["op"].split(".")[0] for i in instrs)
    loop_rows = []
    for lo, hi in loops(instrs):
        body = [i for i in instrs if lo <= i["addr"] <= hi]
        loop_rows.append({
            "first": lo, "last": hi, "instructions": len(body),
            "classes": dict(collections.Counter(op_class(i["op"]) for i in body)),
            "functions": sorted({funcs.name(*i["chain"][0]) for i in body if i["chain"]}),
        })
    return {"instructions": len(instrs), "classes": dict(by_class),
            "functions": dict(by_func), "opcodes": dict(by_op), "loops": loop_rows}


def analyze(src: Path, arch: str = "90", kernels=(), defines=()) -> dict:
    """{readable kernel name: {registers, spills, instructions, classes, functions,
    opcodes, loops}} for the kernels of `src` whose readable name contains one of
    `kernels` (all when empty)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        res = parse_ptxas(compile_cubin(src, arch, cubin, defines))
        r = subprocess.run([find_tool("nvdisasm"), "-gi", "-c", str(cubin)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvdisasm failed: {r.stderr[-2000:]}")
    code = parse_disasm(r.stdout)
    names = demangle(code)
    funcs = SourceFunctions()
    out = {}
    for mangled, instrs in code.items():
        name = names[mangled]
        if kernels and not any(k in name for k in kernels):
            continue
        row = dict(res.get(mangled, {}))
        row.update(summarize(instrs, funcs))
        out[name] = row
    return out


def render(result: dict, top: int = 8) -> str:
    lines = []
    for name, r in result.items():
        spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        lines.append(f"{short_name(name)}\n  registers {r.get('registers', '?')}, spill bytes "
                     f"{spill}, {r['instructions']} instructions")
        cls = sorted(r["classes"].items(), key=lambda kv: -kv[1])
        lines.append("  classes: " + ", ".join(f"{c} {n}" for c, n in cls))
        fn = sorted(r["functions"].items(), key=lambda kv: -kv[1])[:top]
        lines.append("  by source function: " + ", ".join(f"{f} {n}" for f, n in fn))
        for lp in r["loops"]:
            lc = sorted(lp["classes"].items(), key=lambda kv: -kv[1])
            lines.append(f"  loop {lp['first']:#06x}-{lp['last']:#06x}: "
                         f"{lp['instructions']} instructions per iteration ("
                         + ", ".join(f"{c} {n}" for c, n in lc) + "); "
                         + ", ".join(lp["functions"][:4]))
    return "\n".join(lines)


def analyze_at(rev: str, source: Path, arch: str = "90", kernels=(), defines=()) -> dict:
    """analyze() of `source` as it is at git revision `rev`: the repository's csrc/
    tree at rev (git archive) in a temporary folder, so its headers are rev's too."""
    rel = Path(os.path.relpath(source.resolve(), ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        arch_ = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc"],
                               capture_output=True)
        if arch_.returncode != 0:
            raise ValueError(f"base: git archive {rev} csrc failed: "
                             f"{arch_.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=arch_.stdout, check=True)
        if not (Path(tmp) / rel).is_file():
            raise ValueError(f"base: {rel} does not exist at {rev}")
        return analyze(Path(tmp) / rel, arch, kernels, defines)


def _key_numbers(r: dict) -> tuple:
    spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
    longest = max((lp["instructions"] for lp in r["loops"]), default=0)
    return r.get("registers", "?"), spill, r["instructions"], longest


def compare(before: dict, after: dict) -> str:
    """A markdown table, kernel by kernel, of registers, spill bytes, instructions and
    the longest loop body, 'before -> after' where they differ; kernels only on one
    side are listed as such."""
    lines = ["| kernel | registers | spill bytes | instructions | longest loop body |",
             "| --- | --- | --- | --- | --- |"]
    for name in sorted(set(before) | set(after), key=short_name):
        if name not in before or name not in after:
            lines.append(f"| {short_name(name)} | "
                         f"{'new' if name not in before else 'gone'} | | | |")
            continue
        cells = [str(b) if b == a else f"{b} -> {a}"
                 for b, a in zip(_key_numbers(before[name]), _key_numbers(after[name]))]
        lines.append(f"| {short_name(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a .cu file (csrc/cuda/...)")
    p.add_argument("--kernel", action="append", default=[],
                   help="keep kernels whose readable name contains this (repeatable)")
    p.add_argument("--arch", default="90", help="SM architecture, e.g. 90 (default), 80")
    p.add_argument("-D", dest="defines", action="append", default=[],
                   help="a preprocessor definition passed to nvcc")
    p.add_argument("--top", type=int, default=8, help="source functions listed per kernel")
    p.add_argument("--json", type=Path, help="write the full counts here")
    p.add_argument("--base", metavar="REV",
                   help="compare with the source as it is at this git revision (e.g. HEAD): "
                        "a table of registers, spills, instructions, longest loop, "
                        "before -> after")
    a = p.parse_args(argv)
    if not a.source.is_file():
        p.error(f"source: no file {a.source}")
    result = analyze(a.source, a.arch, a.kernel, a.defines)
    if not result:
        p.error(f"kernel: none of {a.kernel} in {a.source}")
    if a.base:
        try:
            print(compare(analyze_at(a.base, a.source, a.arch, a.kernel, a.defines), result))
        except ValueError as e:
            p.error(str(e))
    else:
        print(render(result, a.top))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
