"""The install step of scripts/gpu_check.py: the wheels of .gpu-wheels/ (scripts/gpu_wheels.sh) into a private
folder, put on PYTHONPATH after the checkout and before the system's site-packages. `pip install --no-index
--no-deps --target`, or unpacking them where pip is missing or fails; skipped when the interpreter already has
every package of NEEDED. Standard library only: it runs before the wheels are in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

from gpu_steps import ROOT, Check, run_logged

NEEDED = ("trl", "bitsandbytes", "datasets")  # what finetune imports that the GPU machine lacks


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
