"""Derived numbers, per-mode totals, the on-screen table and the JSON record."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess

import torch

import mobilenet_ext

BASELINE = "eager"


def finish(rows: list[dict]) -> None:
    """Fill gbps, tflops, pct_copy and speedup (over eager on the same op, layer and mode) in
    place."""
    base = {(r["op"], r["layer"], r["mode"]): r["stats"]["median"] for r in rows
            if r["provider"] == BASELINE and r["stats"]}
    for r in rows:
        ms = r["stats"]["median"] if r["stats"] else None
        copy = r.get("copy")
        r["gbps"] = r["bytes"] / ms / 1e6 if ms else None
        r["tflops"] = r["flops"] / ms / 1e9 if ms else None
        r["pct_copy"] = 100 * r["gbps"] / copy["gbps"] if ms and copy else None
        b = base.get((r["op"], r["layer"], r["mode"]))
        r["speedup"] = b / ms if ms and b else None


def totals(rows: list[dict]) -> list[dict]:
    """Per network (MobileNetV2, V1: label "TOTAL v1"), op, mode and provider: the network's
    time, sum of count x median, over the layers where every provider that ran is ok (the
    label says so when some layer is left out). With several ops, also their sum (op "all")
    per mode and provider."""
    ops = list(dict.fromkeys(r["op"] for r in rows))
    groups = [(op, {op}) for op in ops] + ([("all", set(ops))] if len(ops) > 1 else [])
    out = []
    for net in dict.fromkeys(r.get("net", "v2") for r in rows):
        of_net = [r for r in rows if r.get("net", "v2") == net]
        for name, members in groups:
            for mode in dict.fromkeys(r["mode"] for r in of_net if r["op"] in members):
                rs = [r for r in of_net if r["mode"] == mode and r["op"] in members]
                for t in _total(name, mode, rs):
                    t["net"] = net
                    if net != "v2":
                        t["layer"] = f"{t['layer']} {net}"
                    out.append(t)
    finish(out)
    return out


def _total(op: str, mode: str, rs: list[dict]) -> list[dict]:
    layers = list(dict.fromkeys((r["op"], r["layer"]) for r in rs))
    ran = {r["provider"] for r in rs if r["status"] != "skipped"}
    ok = [lay for lay in layers if all(r["status"] == "ok" for r in rs
                                       if (r["op"], r["layer"]) == lay and r["provider"] in ran)]
    if not ok:
        return []
    label = "TOTAL" if len(ok) == len(layers) else f"TOTAL {len(ok)}/{len(layers)}"
    out = []
    for prov in dict.fromkeys(r["provider"] for r in rs if r["provider"] in ran):
        sel = [r for r in rs if r["provider"] == prov and (r["op"], r["layer"]) in ok]
        ms = sum(r["count"] * r["stats"]["median"] for r in sel)
        nbytes = sum(r["count"] * r["bytes"] for r in sel)
        flops = sum(r["count"] * r["flops"] for r in sel)
        copied = [r["copy"] for r in sel if r.get("copy")]
        copy = None
        if len(copied) == len(sel):
            copy_ms = sum(r["count"] * c["stats"]["median"] for r, c in zip(sel, copied))
            copy_bytes = sum(r["count"] * c["bytes"] for r, c in zip(sel, copied))
            copy = {"bytes": copy_bytes, "stats": {"median": copy_ms},
                    "gbps": copy_bytes / copy_ms / 1e6}
        out.append({"op": op, "layer": label, "count": sum(r["count"] for r in sel),
                    "mode": mode, "provider": prov, "status": "ok", "reason": None,
                    "bytes": nbytes, "flops": flops, "intensity": flops / nbytes,
                    "stats": {"median": ms}, "copy": copy,
                    "layers": [f"{o} {lay}" for o, lay in ok]})
    return out


def num(v: float | None, digits: int) -> str:
    """v with `digits` significant digits and no exponent ("-" for None)."""
    if v is None:
        return "-"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))) if v else 0)}f}"


def render(rows: list[dict], total_rows: list[dict], show_copy: bool) -> str:
    """A compact table, grouped by op and mode, each group closed by its TOTAL rows; the
    totals over all ops (when there are several) come last. flop/B is the layer's
    arithmetic intensity (flops over the minimal bytes)."""
    head = ["op", "layer", "n", "mode", "provider", "flop/B", "ms", "GB/s"] + \
        (["%copy"] if show_copy else []) + ["speedup", "status"]
    body = []
    for op, mode in dict.fromkeys((r["op"], r["mode"]) for r in rows + total_rows):
        for r in [r for r in rows if (r["op"], r["mode"]) == (op, mode)] + \
                [t for t in total_rows if (t["op"], t["mode"]) == (op, mode)]:
            ms = r["stats"]["median"] if r["stats"] else None
            cells = [r["op"], r["layer"], str(r["count"]), r["mode"], r["provider"],
                     num(r["intensity"], 2), num(ms, 4), num(r["gbps"], 3)]
            cells += [num(r["pct_copy"], 2)] if show_copy else []
            cells += ["-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                      r["status"] if r["status"] != "ok" else ""]
            body.append(cells)
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    left = {0, 1, 3, 4, len(head) - 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(head))
    return "\n".join([line(head), rule] + [line(c) for c in body])


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device": _cpu_name(), "sm_count": None, "l2_bytes": None, "capability": None,
        "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "triton": _version("triton"), "torchvision": _version("torchvision"),
        "mobilenet_ext": mobilenet_ext.__version__,
        "backends": {k: v._asdict() for k, v in mobilenet_ext.backends().items()},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, sm_count=p.multi_processor_count, l2_bytes=p.L2_cache_size,
                   capability=f"{p.major}.{p.minor}", memory_bytes=p.total_memory,
                   clocks_mhz=_clocks(device.index or 0))
    return env


def _clocks(index: int) -> dict | None:
    """Current and max SM / memory clocks from nvidia-smi, when it is there."""
    fields = ("clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem")
    try:
        res = subprocess.run(["nvidia-smi", f"--id={index}", "--format=csv,noheader,nounits",
                              "--query-gpu=" + ",".join(fields)],
                             capture_output=True, text=True, timeout=10)
        values = [float(v) for v in res.stdout.strip().split(",")]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return dict(zip(fields, values)) if len(values) == len(fields) else None


def write_json(path: str, env: dict, args: dict, rows: list[dict], total_rows: list[dict],
               model_rows: list[dict] | None = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"schema": 3, "environment": env, "args": args, "rows": rows,
                   "totals": total_rows, "models": model_rows or []}, f, indent=1)
        f.write("\n")


def plot(path: str, rows: list[dict], model_rows: list[dict]) -> str:
    """A PNG with one panel per (op, mode, batch): speedup over eager per layer and
    provider (bars), and, when the copy baseline was measured (GPU), % of copy bandwidth
    (markers, right axis); the whole-model speedups in a last panel. Returns what it did."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot"
    groups = list(dict.fromkeys((r["op"], r["mode"], r["batch"]) for r in rows))
    panels = groups + ([("model", None, None)] if model_rows else [])
    if not panels:
        return f"--plot {path}: nothing to plot"
    every = list(dict.fromkeys(r["provider"] for r in rows + model_rows))
    color = {p: f"C{i % 10}" for i, p in enumerate(every)}  # one colour per provider
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, (op, mode, batch) in zip(axes[:, 0], panels):
        sel = [r for r in (model_rows if op == "model" else rows)
               if op == "model" or (r["op"], r["mode"], r["batch"]) == (op, mode, batch)]
        labels = list(dict.fromkeys(
            f"{r['layer']} {r['mode']} b{r['batch']}" if op == "model" else r["layer"]
            for r in sel))
        provs = [p for p in dict.fromkeys(r["provider"] for r in sel)
                 if any(x["provider"] == p and x.get("speedup") for x in sel)]
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            xs, ys, pct = [], [], []
            for j, lab in enumerate(labels):
                for r in sel:
                    key = f"{r['layer']} {r['mode']} b{r['batch']}" if op == "model" \
                        else r["layer"]
                    if r["provider"] == p and key == lab and r.get("speedup"):
                        xs.append(j + i * width)
                        ys.append(r["speedup"])
                        pct.append(r.get("pct_copy"))
            ax.bar(xs, ys, width, label=p, color=color[p])
            if any(v is not None for v in pct):
                ax2 = ax.twinx() if not hasattr(ax, "_pct") else ax._pct
                ax._pct = ax2
                ax2.plot(xs, [v if v is not None else float("nan") for v in pct], "k.")
                ax2.set_ylabel("% of copy bandwidth (dots)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speedup over eager")
        ax.set_title("whole model" if op == "model" else f"{op} {mode} batch {batch}")
        ax.legend(fontsize=7, ncol=len(provs))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
