"""The results of scripts/gpu_check.py as a person reads them: each step's own results collected (its JSON, or
pytest's junit XML plus the figures the GPU tests recorded) and gpu-results.md rendered from gpu-results.json
(steps, GPU tests, the cookbook-vs-finetune benchmark with its probes, lever sweep and profile, the recipe's peak
memory next to what the recipe says). Standard library only: it runs before the wheels are in.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path


def collect(name: str, path: Path, work: Path) -> dict:
    """A step's own results: JSON as written, or pytest's junit XML plus the figures the tests recorded."""
    if name != "tests":
        data = json.loads(path.read_text()) if path.is_file() else {}
        return data.get("compare") or data.get("recipe_memory") or data
    figures_file = work / "tests.json"  # written test by test: there even when pytest was cut off
    figures = json.loads(figures_file.read_text()) if figures_file.is_file() else {}
    if not path.is_file():
        return {test: {"outcome": "cut off", "seconds": None, "message": None, "figures": f}
                for test, f in figures.items()}
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = case.get("name")
        outcome, message = "passed", None
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome, message = {"failure": "failed"}.get(kind, kind), (node.get("message") or "")[:300]
                break
        outcomes[test] = {"outcome": outcome, "seconds": round(float(case.get("time", 0)), 1),
                          "message": message, "figures": figures.get(test, {})}
    return outcomes


def render_markdown(r: dict) -> str:
    """gpu-results.md: what a person reads first; gpu-results.json has every figure."""
    env = r.get("env", {})
    head = f"# finetune GPU check: {env.get('device', '?')}, {r['check']['started']}"
    if r["check"]["dry_run"]:
        head += " (DRY RUN: tiny shapes on the CPU; figures prove the script, not the GPU)"
    lines = [head, ""]
    if env:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
                  f"bf16 matmul: {env.get('matmul_tflops', '-')} TFLOP/s measured; bitsandbytes NF4 round trip: "
                  f"{env.get('bnb_nf4', '-')}", ""]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} ({s['title']}) | {s.get('status', 'running')} | {s.get('seconds', '-')} |"
              for n, s in r["steps"].items()]
    lines += [f"\nTotal {r['check'].get('elapsed_s', '-')} s of a {r['check']['budget_s']:.0f} s budget.", ""]
    if "install" in r:
        lines += [f"Install: {r['install'].get('status')} ({r['install'].get('method', '-')})", ""]
    if r.get("tests"):
        lines += ["## GPU tests (pytest -m gpu)", "", "| test | outcome | s | figures |", "|---|---|---|---|"]
        for test, t in r["tests"].items():
            figs = ", ".join(f"{k} {short(v)}" for k, v in t["figures"].items())
            lines.append(f"| {test} | {t['outcome']} | {t['seconds']} | {figs or t['message'] or ''} |")
        lines.append("")
    lines += render_bench(r.get("bench"))
    mem = r.get("recipe")
    if mem and "max_length" in mem:
        lines += [f"## Peak memory of {mem['recipe']}", "",
                  f"batch {mem['batch']} x {mem['sample_tokens']['max']} tokens (max_length {mem['max_length']}), "
                  f"4-bit {mem['load_in_4bit']}, gradient checkpointing {mem['gradient_checkpointing']}, "
                  f"{mem['optim']}, {mem['steps']} steps in {mem['train_s']} s; losses {short(mem['losses'])}", "",
                  "| weights (GiB) | peak allocated (GiB) | peak reserved (GiB) | peak on the device (GB, ~nvidia-smi) "
                  "| the recipe says |", "|---|---|---|---|---|",
                  f"| {short(mem.get('weights_gib'))} | {short(mem.get('peak_mem_gib'))} | "
                  f"{short(mem.get('peak_reserved_gib'))} | {short(mem.get('peak_device_gb'))} | "
                  f"~{short(mem.get('claim_gb'))} GB |", ""]
    return "\n".join(lines) + "\n"


def render_bench(bench: dict | None) -> list[str]:
    """The benchmark's sections: headline, probes, lever sweep, profile (scripts/bench_compare.py)."""
    if not bench or not bench.get("runs"):
        return []
    rows = bench.get("row_tokens", {})
    lines = [f"## Cookbook vs finetune, {bench['model']} shape ({bench['preset']} preset), ChartQA rows", "",
             f"{bench['samples']} rows of {rows.get('min')}-{rows.get('max')} tokens (mean {rows.get('mean')}), one "
             f"epoch per side after one warm-up step; cookbook: TRL's collator, micro-batch {bench['batch']} padded "
             f"to its longest row; finetune: packs of {bench['pack_length']} tokens, one per step; gradient "
             f"checkpointing on both sides; images up to {bench['max_pixels']} pixels. MFU by "
             f"{bench.get('mfu_formula')} against {bench.get('matmul_tflops') or '-'} TFLOP/s (bf16 matmul measured "
             f"in this run). Collating before the clock: {bench.get('collate_s')} s. Random checkpoint: "
             f"{bench.get('checkpoint') or 'the zoo model'}.", "",
             "| mode | pipeline | steps | padding | non-padding tokens/s | samples/s | peak GPU mem (GiB) | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for x in bench["runs"]:
        lines.append(f"| {x['mode']} | {x['pipeline']} | {x['steps']} | {x['padding']:.2f} | {x['tokens_per_s']:.0f} "
                     f"| {x['samples_per_s']:.2f} | {short(x.get('peak_mem_gib'))} | {percent(x.get('mfu'))} |")
    for mode, ratio in bench.get("ratios", {}).items():
        lines.append(f"| {mode} | {ratio.get('best', 'finetune')} / cookbook | | | {ratio['tokens_per_s']}x | | "
                     f"{short(ratio.get('peak_mem'))}x | |")
    lines += ["", "Probes (a lever is timed only after it computes what it replaces): " + "; ".join(
        f"{name} {p.get('status') or ('passed' if p.get('ok') else 'failed')}" for name, p in
        bench.get("probes", {}).items()), ""]
    for mode, entries in bench.get("sweep", {}).items():
        base = next((e for e in entries if e.get("lever") == "finetune (best)" and "tokens_per_s" in e), None)
        lines += [f"### Levers, {mode} ({entries[0].get('steps', '-') if entries else '-'} steps each)", "",
                  "| setting | non-padding tokens/s | vs best | peak GPU mem (GiB) | MFU |", "|---|---|---|---|---|"]
        for e in entries:
            if "error" in e or "skipped" in e:
                lines.append(f"| {e['lever']} | {e.get('skipped') or 'failed: ' + e['error'][:120]} | | | |")
                continue
            vs = f"{e['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            lines.append(f"| {e['lever']} | {e['tokens_per_s']:.0f} | {vs} | {short(e.get('peak_mem_gib'))} | "
                         f"{percent(e.get('mfu'))} |")
        lines.append("")
    for mode, ops in (bench.get("profile") or {}).items():
        lines += [f"### Profile, finetune {mode} (3 steps, top operations by self time on the device)", "",
                  "| operation | calls | ms | share |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['calls']} | {o['ms']} | {o['share']:.1%} |" for o in ops]
        lines.append("")
    return lines


def percent(value) -> str:
    return f"{value:.1%}" if value is not None else "-"


def short(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(short(v) for v in value[:8]) + (" ..." if len(value) > 8 else "") + "]"
    return str(value)
