"""Render README.md's results section from the newest JSON in bench/results/.

    python -m bench.readme            # rewrite the section between the markers
    python -m bench.readme --check    # exit 1 when README.md is not what this would write

The section lies between `<!-- results:begin -->` and `<!-- results:end -->`; nothing in it
is typed by hand. It shows the newest GPU run (latest environment.date over the committed
JSON files with device_type cuda), then the newest CPU run: our C++ kernels against eager
CPU PyTorch.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from .report import num

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def newest(results_dir: str = RESULTS, gpu: bool = True) -> tuple[str, dict] | None:
    """The newest committed run on a GPU (gpu=True) or on a CPU."""
    runs = []
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        with open(path) as f:
            data = json.load(f)
        env = data.get("environment", {})
        if (env.get("device_type") == "cuda") == gpu:
            runs.append((env.get("date", ""), path, data))
    if not runs:
        return None
    _, path, data = max(runs, key=lambda r: r[:2])
    return path, data


def render_all(results_dir: str = RESULTS) -> str:
    """The whole section: the newest GPU run, then the newest CPU run."""
    gpu, cpu = newest(results_dir, gpu=True), newest(results_dir, gpu=False)
    if not gpu and not cpu:
        return "No results committed yet.\n"
    parts = [render(*gpu) if gpu else
             "No GPU run committed yet: GPU numbers need `bench/gpu_check.sh` on a GPU.\n"]
    if cpu:
        parts.append(render(*cpu))
    return "\n".join(parts)


def render(path: str, data: dict) -> str:
    env, args = data["environment"], data["args"]
    rel = os.path.relpath(path, ROOT)
    where = env["device"] + (f" ({env['sm_count']} SMs)" if env.get("sm_count") else
                             f" ({env.get('cpu_threads')} threads)")
    lines = [f"From `{rel}`: {where}, torch {env['torch']}, {args['dtype']} {args['layout']}, "
             f"commit {str(env.get('git_commit'))[:10]}, {env['date'][:10]}. "
             "Time-weighted totals over the network's layers (count x median); speedup over "
             "eager PyTorch (conv, BN, activation as torchvision runs them).", ""]
    if env["device_type"] != "cuda":
        lines[0] = "CPU: " + lines[0]
        lines += ["Our C++ kernels against eager CPU PyTorch (oneDNN conv, BN, activation); "
                  "wall time, so rows move by about 10% between runs on a shared machine.", ""]
    totals = [t for t in data["totals"] if t["op"] != "all"]
    if totals:
        lines += ["| batch | net | op | mode | provider | ms | speedup |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for t in totals:
            lines.append(f"| {t.get('batch', args.get('batch'))} | {t.get('net', 'v2')} | "
                         f"{t['op']} | {t['mode']} | {t['provider']} | "
                         f"{num(t['stats']['median'], 4)} | "
                         f"{'-' if t['speedup'] is None else format(t['speedup'], '.2f') + 'x'} |")
        lines.append("")
    models = [m for m in data.get("models", []) if m["status"] == "ok" and
              (m.get("op", "model") == "model" or m["layer"].startswith("TOTAL"))]
    if models:
        lines += ["| model | batch | mode | provider | ms | img/s | peak MB | speedup |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m in models:
            what = m["layer"] if m.get("op", "model") == "model" else f"blocks {m['layer']}"
            lines.append(f"| {what} | {m['batch']} | {m['mode']} | {m['provider']} | "
                         f"{num(m['stats']['median'], 4)} | {num(m['images_per_s'], 4)} | "
                         f"{num(m['peak_mb'], 4)} | "
                         f"{'-' if m['speedup'] is None else format(m['speedup'], '.2f') + 'x'} |")
        lines.append("")
    lines += _not_run(data)
    return "\n".join(lines).rstrip() + "\n"


def _not_run(data) -> list[str]:
    """One entry per skipped provider: its reason, or, where the layer rows and the
    model rows skipped it for different reasons, both, named."""
    reasons: dict[str, dict[str, None]] = {}
    for where, rows in (("layers", data["rows"]), ("models", data.get("models", []))):
        for r in rows:
            if r["status"] == "skipped":
                reasons.setdefault(r["provider"], {})[f"{where}: {r['reason']}"] = None
    if not reasons:
        return []
    entries = []
    for provider in sorted(reasons):
        whys = list(reasons[provider])
        plain = {why.split(": ", 1)[1] for why in whys}
        entries.append(f"{provider} ({next(iter(plain)) if len(plain) == 1 else '; '.join(whys)})")
    return ["Not run: " + "; ".join(entries) + "."]


def updated(readme: str, section: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{section}{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check that README.md is current")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    section = render_all(args.results)
    with open(args.readme) as f:
        text = f.read()
    new = updated(text, section)
    if args.check:
        if new != text:
            print(f"{args.readme}: results section is stale; run python -m bench.readme",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
    print(f"{args.readme}: results from " + (", ".join(
        os.path.relpath(f[0], ROOT) for f in (newest(args.results, g) for g in (True, False))
        if f) or "nothing"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
