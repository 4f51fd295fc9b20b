"""The core of scripts/gpu_check.sh: one prepared GPU check of finetune, results written after every step.

    OUT=/path/to/results bash scripts/gpu_check.sh     # on the GPU machine (OUT defaults to ./gpu-check-out)
    bash scripts/gpu_check.sh --dry-run                # the same steps at tiny shapes on the CPU (CI runs this)

Steps, each in its own process with its own timeout, one's failure never stopping the next, all within one
overall budget (FINETUNE_GPU_CHECK_BUDGET seconds, default 420 on a GPU):
  install  the wheels of .gpu-wheels/ (scripts/gpu_wheels.sh) into a private folder with `pip install --no-index
           --no-deps --target` (or by unpacking them, where pip is missing), put on PYTHONPATH after the checkout
           and before the system's site-packages; skipped when the interpreter already has trl, bitsandbytes and
           datasets;
  env      versions, the card, a bitsandbytes NF4 round trip and a bf16 matmul rate on the device;
  tests    `pytest -m gpu tests/test_gpu.py`;
  bench    `scripts/bench_gpu.py --compare` at Qwen2.5-VL-7B shape on ChartQA-sized rows, LoRA and QLoRA: cookbook vs
           finetune's best, each lever on/off, a profile (scripts/bench_compare.py; it builds the random checkpoint,
           kept for the next step);
  recipe   `scripts/bench_gpu.py --recipe-memory recipes/qwen2_5-vl-7b-qlora.yaml`.
$OUT receives gpu-results.json, gpu-results.md and gpu-check.log, rewritten after every step so that a run cut
off still leaves what it measured. This file uses the standard library only: it runs before the wheels are in.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("trl", "bitsandbytes", "datasets")  # what finetune imports that the GPU machine lacks
RECIPE = "recipes/qwen2_5-vl-7b-qlora.yaml"
CHECKPOINT_GIB = 20  # the random Qwen2.5-VL-7B checkpoint is 16.6 GB in bf16


@dataclass
class Step:
    name: str
    title: str
    command: list[str]
    timeout: int  # seconds
    env: dict[str, str] = field(default_factory=dict)
    results: Path | None = None  # the JSON file the step writes


class Check:
    """Runs the steps, logs with timestamps, and keeps $OUT's result files current."""

    def __init__(self, out: Path, work: Path, dry_run: bool, budget: float):
        self.out, self.work, self.dry_run = out, work, dry_run
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.log_file = (out / "gpu-check.log").open("a", encoding="utf-8")
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.results: dict = {"check": {"dry_run": dry_run, "started": started, "budget_s": budget,
                                        "python": sys.executable, "host": platform.node()},
                              "steps": {}}

    def log(self, message: str) -> None:
        line = f"[gpu_check {now()} +{time.monotonic() - self.start:5.1f}s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["check"]["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_atomic(self.out / "gpu-results.json", json.dumps(self.results, indent=2, default=str))
        write_atomic(self.out / "gpu-results.md", render_markdown(self.results))

    def run(self, step: Step, env: dict[str, str]) -> None:
        """One step: its own process group, its own timeout (never past the overall budget), output to the log."""
        timeout = min(step.timeout, self.remaining() - 5)
        record = {"title": step.title, "timeout_s": round(timeout)}
        self.results["steps"][step.name] = record
        if timeout < 10:
            record["status"] = "skipped: out of time"
            self.log(f"step {step.name}: skipped, {self.remaining():.0f} s left of the budget")
            self.save()
            return
        self.log(f"step {step.name}: {step.title} (timeout {timeout:.0f} s)")
        self.log("  $ " + " ".join(step.command))
        started = time.monotonic()
        rc = run_logged(step.command, {**env, **step.env}, timeout, self.log_file)
        record["seconds"] = round(time.monotonic() - started, 1)
        record["rc"] = rc
        record["status"] = "timed out" if rc is None else "passed" if rc == 0 else "failed"
        if step.results is not None and (step.results.is_file() or (self.work / "tests.json").is_file()):
            self.results[step.name] = collect(step.name, step.results, self.work)
        self.log(f"step {step.name}: {record['status']} in {record['seconds']} s")
        self.save()


def now() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_logged(command: list[str], env: dict[str, str], timeout: float, log) -> int | None:
    """Run `command`, copying its output to stdout and the log; the return code, or None when it timed out."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write("    " + line)
            log.write("    " + line)
        sys.stdout.flush()
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
        stop(proc)
    reader.join(timeout=10)
    return rc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group (pytest and its children), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- install ------------------------------------------------------------------------------------------------------


def missing(python: str, env: dict[str, str]) -> list[str]:
    """Which of NEEDED this interpreter cannot find (without importing anything)."""
    code = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    out = subprocess.run([python, "-c", code, *NEEDED], env=env, capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def install(check: Check, python: str, wheels: Path, site: Path, env: dict[str, str]) -> dict:
    """The carried wheels into `site`: pip if it is there and works, else by unpacking them (they are zip files)."""
    lacking = missing(python, env)
    info: dict = {"missing_before": lacking, "site": str(site)}
    if not lacking:
        info["status"] = "skipped: the interpreter has " + ", ".join(NEEDED)
        return info
    files = sorted(wheels.glob("*.whl"))
    info["wheels"] = {f.name: round(f.stat().st_size / 2**20, 2) for f in files}
    if not files:
        info["status"] = f"failed: {', '.join(lacking)} missing and no wheels in {wheels} (run scripts/gpu_wheels.sh)"
        return info
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    command = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet",
               "--disable-pip-version-check", "--target", str(site), *map(str, files)]
    check.log("  $ " + " ".join(command[:-len(files)]) + f" <{len(files)} wheels>")
    rc = run_logged(command, env, 120, check.log_file)
    if rc == 0:
        info["method"] = "pip --target"
    else:
        check.log(f"  pip failed (rc {rc}); unpacking the wheels instead")
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        for wheel in files:
            unpack(wheel, site)
        info["method"] = "unpacked"
    info["missing_after"] = missing(python, {**env, "PYTHONPATH": path_with(site, env)})
    info["status"] = "passed" if not info["missing_after"] else "failed: still missing " + ", ".join(
        info["missing_after"])
    return info


def unpack(wheel: Path, site: Path) -> None:
    """What pip does for a wheel that only holds modules: its files land in site (`*.data/{purelib,platlib}` too)."""
    with zipfile.ZipFile(wheel) as z:
        for member in z.infolist():
            parts = member.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts and headers: not needed to import
                parts = parts[2:]
            target = site.joinpath(*parts)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(member))


def path_with(site: Path, env: dict[str, str]) -> str:
    """The checkout first (its finetune/ and tests/), then the wheels, then whatever PYTHONPATH held."""
    return os.pathsep.join(p for p in (str(ROOT), str(site), env.get("PYTHONPATH", "")) if p)


# --- the steps ----------------------------------------------------------------------------------------------------


def steps(python: str, work: Path, dry_run: bool, checkpoints: Path) -> list[Step]:
    bench = [python, "scripts/bench_gpu.py"]
    if dry_run:  # tiny shapes on the CPU; the recipe's 2048 tokens shrunk so the CPU does it in seconds
        compare = ["--preset", "tiny", "--samples", "24", "--max-pixels", str(112 * 112), "--pack-length", "512",
                   "--sweep-steps", "2"]
        recipe = ["--preset", "tiny", "--max-length", "1024"]
    else:  # 128 ChartQA rows of 351-1,311 tokens: cookbook 32 steps of 4 rows, finetune 37 packs of 2560 tokens
        compare = ["--checkpoint-dir", str(checkpoints), "--deadline-s", "270"]
        recipe = ["--checkpoint-dir", str(checkpoints)]
    # Timeouts bound a hang, the overall budget bounds the sum. Expected on an H100/H200: env 16 s, tests 35 s,
    # bench ~290 s (build and save 16.6 GB; per mode two full epochs of ~100k real tokens, a sweep of 4-6 levers at 6
    # steps, QLoRA's load), recipe 30 s. On 2 CPU cores: 6, 15, 20, 10 s. The bench writes its JSON after every
    # measurement: cut off, it still leaves what it measured.
    return [
        Step("env", "versions, device, bitsandbytes NF4 round trip, bf16 matmul rate",
             [python, "scripts/gpu_check.py", "--probe", str(work / "env.json")], 60, results=work / "env.json"),
        Step("tests", "pytest -m gpu tests/test_gpu.py",
             [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
              f"--junitxml={work / 'tests.xml'}"], 120 if dry_run else 90,
             env={"FINETUNE_GPU_RESULTS": str(work / "tests.json")}, results=work / "tests.xml"),
        Step("bench", "cookbook vs finetune at Qwen2.5-VL-7B shape on ChartQA rows, LoRA and QLoRA, levers, profile",
             [*bench, "--models", "qwen2_5_vl_7b", "--modes", "qlora", "lora", "--compare", *compare,
              "--json", str(work / "bench.json")], 120 if dry_run else 300, results=work / "bench.json"),
        Step("recipe", f"peak memory of {RECIPE} at its max_length",
             [*bench, "--recipe-memory", RECIPE, *recipe, "--json", str(work / "recipe.json")],
             120 if dry_run else 90, results=work / "recipe.json"),
    ]


def step_env(work: Path, site: Path, dry_run: bool) -> dict[str, str]:
    """Offline, quiet, caches in the work folder; the dry run hides any GPU."""
    cache = os.environ.get("FINETUNE_CACHE") or str(work / "cache")  # CI's pytest passes its zoo cache down
    env = {**os.environ, "PYTHONPATH": path_with(site, dict(os.environ)), "FINETUNE_CACHE": cache,
           "FINETUNE_TEST_CACHE": cache, "HF_HOME": str(work / "hf"), "HF_DATASETS_CACHE": str(work / "datasets"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
           "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", FINETUNE_GPU_CHECK="cpu")
    return env


def checkpoint_dir(work: Path) -> Path:
    """Where the 16.6 GB random checkpoint goes: RAM-backed /dev/shm when it has room (no disk round trip)."""
    for base in (Path("/dev/shm"), work):
        try:
            if shutil.disk_usage(base).free >= CHECKPOINT_GIB * 2**30:
                return base / f"finetune-gpu-check-{os.getpid()}"
        except OSError:
            continue
    return work / "checkpoints"


# --- collecting what the steps wrote ------------------------------------------------------------------------------


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


# --- env probe (run as its own step, with the wheels on the path) -------------------------------------------------


def probe(path: Path) -> int:
    """Versions and the device; on a GPU also a bitsandbytes NF4 round trip and the bf16 matmul rate."""
    import importlib
    import importlib.metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers",
                 "huggingface_hub", "pyarrow", "fsspec", "numpy", "pandas", "PIL"):
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "?")
            print(f"{name} {versions[name]} from {Path(module.__file__).parent}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every import problem, keep probing
            versions[name] = f"import failed: {type(e).__name__}: {e}"
            print(f"{name}: {versions[name]}", flush=True)
    cuda = torch.cuda.is_available()
    info = {"versions": {"python": platform.python_version(), **versions}, "cuda": cuda,
            "torch_cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    device = "cuda" if cuda else "cpu"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip()
    try:
        import bitsandbytes.functional as F

        weight = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
        packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        error = (F.dequantize_4bit(packed, state) - weight).abs().mean() / weight.abs().mean()
        info["bnb_nf4"] = f"relative error {float(error):.3f} on {packed.device.type}"
    except Exception as e:  # noqa: BLE001
        info["bnb_nf4"] = f"failed: {type(e).__name__}: {e}"
    try:  # the packed-attention kernel finetune uses on CUDA, and its signature (it changed between releases)
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        info["varlen_attn"] = str(inspect.signature(varlen_attn))
    except Exception as e:  # noqa: BLE001
        info["varlen_attn"] = f"unavailable: {type(e).__name__}: {e}"
    try:
        import liger_kernel.transformers  # noqa: F401 - needs Triton
        info["liger_kernel"] = importlib.metadata.version("liger-kernel")
    except Exception as e:  # noqa: BLE001
        info["liger_kernel"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    if cuda:  # the MFU denominator, measured here rather than taken from a datasheet
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        info["matmul_tflops"] = round(20 * 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    print(json.dumps(info, indent=2), flush=True)
    path.write_text(json.dumps(info, indent=2))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no CUDA")
    p.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"), help="folder of wheels to install if needed")
    p.add_argument("--probe", metavar="JSON", help=argparse.SUPPRESS)  # internal: the env step
    args = p.parse_args()
    if args.probe:
        return probe(Path(args.probe))

    out = Path(os.environ.get("OUT") or ROOT / "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("FINETUNE_GPU_WORK") or tempfile.mkdtemp(prefix="finetune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("FINETUNE_GPU_CHECK_BUDGET") or (300 if args.dry_run else 420))
    check = Check(out, work, args.dry_run, budget)
    site = work / "site"
    checkpoints = checkpoint_dir(work)
    check.log(f"{'DRY RUN: ' if args.dry_run else ''}python {sys.executable} ({platform.python_version()}), "
              f"results in {out}, work in {work}, checkpoint in {checkpoints}")
    try:
        started = time.monotonic()
        check.results["install"] = install(check, sys.executable, Path(args.wheels), site, dict(os.environ))
        check.results["install"]["seconds"] = round(time.monotonic() - started, 1)
        check.log(f"install: {check.results['install']['status']}")
        check.save()
        env = step_env(work, site, args.dry_run)
        for step in steps(sys.executable, work, args.dry_run, checkpoints):
            check.run(step, env)
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)  # 16 GB, possibly in RAM
        if not os.environ.get("FINETUNE_GPU_WORK"):
            shutil.rmtree(work, ignore_errors=True)
        check.save()
    check.log("done; results: " + ", ".join(f"{n} {s.get('status')}" for n, s in check.results["steps"].items()))
    print(render_markdown(check.results), flush=True)
    return 0 if all(s.get("status") == "passed" for s in check.results["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
