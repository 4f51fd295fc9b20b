"""`finetune serve`: vLLM's OpenAI-compatible server on a run, started with the settings the run trained at.

    finetune serve runs/tiny-chartqa              # the merged export (made first if missing), port 8000
    finetune serve runs/tiny-chartqa --adapter    # base model + the LoRA adapter, every trained module kept
    finetune serve runs/tiny-chartqa --check 20   # held-out rows over HTTP vs `finetune predict`; exit 1 below 20/20

vLLM runs from its own environment (`bash scripts/setup.sh vllm` builds .venv-vllm; it pins its own torch and
transformers), started as `python -m vllm.entrypoints.openai.api_server`: the `vllm` command of the CPU build looks
for a distribution named `vllm` and fails. Server settings come from the run: the export's dtype (vLLM would
otherwise round a float32 export to bf16), `training.max_length` as the model length, the most images a training
row held as the per-prompt limit; the image-processor settings trained with travel in the export's processor files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluation.conversation import recipe_system_prompt
from ..models.loading import resolve_model_path, stored_dtype, with_default_system
from .merging import ExportError, merge, run_recipe

#: Where `finetune serve` looks for vLLM's Python when FINETUNE_VLLM_PYTHON is unset and this one lacks vllm.
VLLM_VENV = ".venv-vllm"
#: Seconds a starting server may take to answer /health (loading takes 45-55 s on 2 CPU cores).
START_TIMEOUT = 900


class ServeError(ExportError):
    """vLLM cannot serve this run as asked; the message names the option, file or package."""


@dataclass
class Server:
    """One vLLM server to start: its command line, environment and what it serves."""

    command: list[str]
    env: dict[str, str]
    url: str
    model: str  # the name clients send as "model"
    folder: Path  # the merged export, or the run folder for --adapter
    files: list[Path] = field(default_factory=list)  # written for this server; removed when it stops

    def curl(self) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": 64, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/chart.png"}},
            {"type": "text", "text": "What is the highest value?"}]}]}
        return (f"curl {self.url}/v1/chat/completions -H 'Content-Type: application/json' "
                f"-d {shlex.quote(json.dumps(body))}")


def vllm_python() -> str:
    """FINETUNE_VLLM_PYTHON, else this Python if it has vllm, else .venv-vllm beside the project or here."""
    if os.environ.get("FINETUNE_VLLM_PYTHON"):
        python = os.environ["FINETUNE_VLLM_PYTHON"]
        if not Path(python).is_file():
            raise ServeError(f"FINETUNE_VLLM_PYTHON={python}: no such file; point it at the Python of a vLLM "
                             "environment, or unset it to use .venv-vllm (bash scripts/setup.sh vllm)")
        return python
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / VLLM_VENV / "bin" / "python").is_file():
            return str(root / VLLM_VENV / "bin" / "python")
    raise ServeError("vLLM is not installed: `bash scripts/setup.sh vllm` builds its environment (.venv-vllm), or "
                     "set FINETUNE_VLLM_PYTHON to a Python that has vllm")


def vllm_architectures(python: str) -> tuple[str, set[str]]:
    """vLLM's version and the model architectures it implements, asked of the serving environment itself."""
    code = ("import json, vllm; from vllm.model_executor.models import ModelRegistry; "
            "print(json.dumps([vllm.__version__, sorted(ModelRegistry.get_supported_archs())]))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise ServeError(f"{python}: vLLM does not import: {done.stderr.strip().splitlines()[-1:]}; "
                         "rebuild it with `bash scripts/setup.sh vllm`")
    version, archs = json.loads(done.stdout.strip().splitlines()[-1])
    return version, set(archs)


def free_port(host: str, port: int | None) -> int:
    """`port` if nothing listens there (a free one when None); a clear error if it is taken."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port's TIME_WAIT is free
        try:
            s.bind((host, port or 0))
        except OSError:
            raise ServeError(f"--port {port}: already in use on {host} (another server?); choose another port") \
                from None
        return s.getsockname()[1]


def plan(run_dir: str | Path, port: int | None = None, adapter: bool = False, host: str = "127.0.0.1",
         python: str | None = None, vllm_args: str = "") -> Server:
    """What to start for `run_dir`, checked before anything is merged or started: a run folder, a free port, and
    an architecture this vLLM implements. `vllm_args`: more server flags, appended (a later flag wins)."""
    from transformers import AutoConfig

    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    port = free_port(host, port)
    python = python or vllm_python()
    base = resolve_model_path(recipe.model.name_or_path)
    # AutoConfig, not the folder's config.json: a hub id's config is in the hub cache, not under its name
    architectures = AutoConfig.from_pretrained(base, revision=recipe.model.revision,
                                               trust_remote_code=recipe.model.trust_remote_code).architectures
    version, known = vllm_architectures(python)
    missing = [a for a in architectures or [] if a not in known]
    if missing:
        raise ServeError(f"{run_dir}: vLLM {version} has no implementation of {', '.join(missing)} (the base model "
                         f"{recipe.model.name_or_path}); serve it with `finetune predict`, or export it with "
                         "`finetune export-gguf` for llama.cpp where that family converts")
    summary_file = run_dir / "run_summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    per_row = [int(k) for k in (summary.get("train_data") or {}).get("images_per_row", {})]
    name = run_dir.resolve().name
    # Clients ask for the run's name; with --adapter that is the LoRA, and the bare base model is NAME-base.
    args = ["--host", host, "--port", str(port), "--served-model-name", f"{name}-base" if adapter else name,
            "--limit-mm-per-prompt", json.dumps({"image": max(per_row + [1])}), "--seed", "0"]
    if getattr(recipe.training, "max_length", None):
        args += ["--max-model-len", str(recipe.training.max_length)]
    if recipe.model.trust_remote_code:  # the model's own code, merged export or base alike
        args += ["--trust-remote-code"]
    if adapter:
        model, folder = base, run_dir
        more, files = _adapter_args(run_dir, recipe, name)
    else:
        (folder, parity), files = _merged(run_dir), []
        model = str(folder.resolve())
        more = ["--dtype", parity["merge"]["dtype"]]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args, *more,
               *shlex.split(vllm_args)]
    return Server(command, env, f"http://{host}:{port}", name, folder, files)


def _adapter_args(run_dir: Path, recipe, name: str) -> tuple[list[str], list[Path]]:
    """Base + LoRA: vLLM's LoRA path drops adapters outside the language model unless tower/connector LoRA is on;
    the run's template (with the default system prompt) goes as a file, removed when the server stops."""
    from transformers import AutoProcessor

    handle = tempfile.NamedTemporaryFile("w", suffix=".jinja", prefix="finetune-serve-", delete=False)
    with handle:
        # the template the run saved beside its adapter: the one it trained with
        template = AutoProcessor.from_pretrained(run_dir).chat_template
        handle.write(with_default_system(template, recipe_system_prompt(recipe)))
    rank = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))["r"]
    dtype = stored_dtype(recipe.model) if recipe.model.dtype == "auto" else recipe.model.dtype
    args = ["--dtype", dtype, "--enable-lora", "--enable-tower-connector-lora",
            "--lora-modules", json.dumps({"name": name, "path": str(run_dir.resolve()),
                                          "base_model_name": f"{name}-base"}),
            "--max-lora-rank", str(_lora_rank(rank)), "--chat-template", handle.name]
    if recipe.data.image_processor:  # the base's processor files lack them; the run's export would carry them
        args += ["--mm-processor-kwargs", json.dumps(recipe.data.image_processor)]
    if recipe.model.revision:  # the base the adapter was trained on, not the hub's latest
        args += ["--revision", recipe.model.revision]
    return args, [Path(handle.name)]


def _lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts as --max-lora-rank that holds `r`."""
    return next((k for k in (1, 8, 16, 32, 64, 128, 256, 320, 512) if k >= r), r)


def _merged(run_dir: Path) -> tuple[Path, dict]:
    """RUN/merged and its parity.json, merged (parity-checked) first if missing or older than the serving settings;
    an export whose parity check failed is refused."""
    export = run_dir / "merged"
    parity = json.loads((export / "parity.json").read_text(encoding="utf-8")) \
        if (export / "parity.json").is_file() else {}
    if not (export / "config.json").is_file() or ("merge" in parity and parity.get("layout") != "published"):
        # an export from before finetune wrote the serving settings (default system prompt, stop tokens, layout)
        print(f"[finetune] {'re-' if parity else ''}merging {run_dir} into {export} to serve it as trained")
        merge(run_dir, export, overwrite=True)
        parity = json.loads((export / "parity.json").read_text(encoding="utf-8"))
    if "merge" not in parity:
        raise ServeError(f"{export}: no parity.json; merge again with `finetune merge {run_dir} --overwrite`")
    if parity.get("checked") and not parity.get("passed"):
        raise ServeError(f"{export}: its parity check failed (parity.json); it would not answer as trained")
    return export, parity


def start(server: Server, log=None) -> subprocess.Popen:
    """The server process, in its own process group (a Ctrl-C here is forwarded once, not sent to it twice)."""
    return subprocess.Popen(server.command, env=server.env, stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True)


def wait_ready(server: Server, process: subprocess.Popen, timeout: float = START_TIMEOUT, log_file=None) -> None:
    """Until /health answers; a server that exits first is reported with the end of its log."""
    from urllib.error import URLError
    from urllib.request import urlopen

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"vLLM exited with code {process.returncode} before serving"
                             + (f": {first_error(Path(log_file))} (its log: {log_file})" if log_file else ""))
        try:
            with urlopen(f"{server.url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (URLError, OSError):
            pass
        time.sleep(1)
    stop(server, process)
    raise ServeError(f"vLLM did not answer {server.url}/health within {timeout:.0f} s")


def first_error(log: Path) -> str:
    """The root cause in vLLM's log: its first exception line (later ones only say that the engine failed)."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [m.group(0) for line in lines if " WARNING " not in line
              and (m := re.search(r"\b\w+(Error|Exception): .+", line))]
    return errors[0][:500] if errors else (lines[-1].strip() if lines else "no output")


def stop(server: Server, process: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace` seconds; the server's own files go."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
    for path in server.files:
        path.unlink(missing_ok=True)


def serve(run_dir: str | Path, port: int | None = None, adapter: bool = False, host: str = "127.0.0.1",
          vllm_args: str = "") -> str:
    """Serve `run_dir` until SIGTERM or Ctrl-C (`serve_check` compares its answers with predict instead)."""
    server = plan(run_dir, 8000 if port is None else port, adapter, host, vllm_args=vllm_args)
    what = f"{run_dir} (base + adapter)" if adapter else str(server.folder)
    print(f"[finetune] starting vLLM on {what}:\n  {shlex.join(server.command)}")
    process = start(server)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        wait_ready(server, process)
        print(f"[finetune] serving {server.model} at {server.url}/v1 (OpenAI-compatible); try:\n  {server.curl()}\n"
              "Ctrl-C stops it.", flush=True)
        process.wait()
    except KeyboardInterrupt:
        print("[finetune] stopping vLLM")
    finally:
        stop(server, process)
        signal.signal(signal.SIGTERM, previous)
    if process.returncode not in (0, -signal.SIGTERM, -signal.SIGINT, None):
        raise ServeError(f"vLLM exited with code {process.returncode}")
    return server.url
