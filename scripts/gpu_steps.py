"""How scripts/gpu_check.py runs its steps: each in its own process group with its own timeout, never past the
overall budget, its output copied to stdout and $OUT/gpu-check.log with timestamps, and $OUT's result files
(gpu-results.json, gpu-results.md) rewritten after every step, so a run cut off still leaves what it measured.
Imports only the standard library, like every gpu_*.py module when loaded: the check runs before the wheels are in.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_report import collect, render_markdown

ROOT = Path(__file__).resolve().parents[1]


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
