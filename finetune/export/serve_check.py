"""`finetune serve RUN --check N`: does the served model answer like `finetune predict`?

N held-out rows (the run's eval split, else its train split) go to the server over HTTP twice, as an OpenAI-style
client sends them: once without a system message (the template's default then applies: the export's is the
recipe's system prompt) and once with the recipe's system prompt. Images travel as PNG, the pixels predict uses
(already resized to `data.max_pixels`). Greedy decoding, `max_new_tokens` tokens, both sides. The reference is
`finetune predict RUN` (base + adapter, as trained). Results: RUN/serve_check.json.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from ..evaluation.conversation import recipe_system_prompt
from ..evaluation.inference import generate, load_target, prompt_messages
from .merging import parity_rows, run_recipe
from .serve import ServeError, first_error, plan, start, stop, wait_ready


def serve_check(run_dir: str | Path, samples: int = 20, port: int | None = None, adapter: bool = False,
                host: str = "127.0.0.1", max_new_tokens: int = 32, vllm_args: str = "") -> str:
    """Start the server, compare `samples` answers with and without a system message, stop it. Raises ServeError
    below samples/samples either way; returns a one-line summary."""
    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    # Refused (no adapter, port taken, family missing) before any work.
    server = plan(run_dir, port, adapter, host, vllm_args=vllm_args)
    rows = parity_rows(recipe, samples)
    if len(rows) < samples:
        raise ServeError(f"--check {samples}: the run's held-out split has only {len(rows)} usable rows")
    target = load_target(run_dir)
    expected = []
    for i in range(0, len(rows), 8):
        chunk = rows[i:i + 8]
        expected += generate(target, [prompt_messages(r["messages"]) for r in chunk], [r["images"] for r in chunk],
                             max_new_tokens)
    del target
    prompt = recipe_system_prompt(recipe)
    log = tempfile.NamedTemporaryFile("w+b", prefix="finetune-vllm-", suffix=".log", delete=False)
    started = time.monotonic()
    process = start(server, log)
    try:
        wait_ready(server, process, log_file=log.name)
        load_s = time.monotonic() - started
        results = {}
        for label, system in (("without_system_message", None), ("with_system_message", prompt)):
            with ThreadPoolExecutor(8) as pool:
                try:
                    served = list(pool.map(lambda r: ask(server, r, system, max_new_tokens), rows))
                except ServeError as e:  # the engine's own reason is in its log
                    raise ServeError(f"{e}; vLLM's log says: {first_error(Path(log.name))} ({log.name})") from None
            results[label] = {"agree": sum(a == b for a, b in zip(served, expected)), "total": len(rows),
                              "differ": [{"row_id": r["row_id"], "predict": b, "served": a}
                                         for r, a, b in zip(rows, served, expected) if a != b][:10]}
    finally:
        stop(server, process)
    report = {"served": "base + adapter" if adapter else "merged export", "folder": str(server.folder),
              "command": server.command, "max_new_tokens": max_new_tokens, "system_prompt": prompt,
              "server_start_s": round(load_s, 1), **results, "answers": expected}
    (run_dir / "serve_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    line = (f"served ({report['served']}) vs finetune predict on {len(rows)} held-out rows: "
            + ", ".join(f"{r['agree']}/{r['total']} {k.replace('_', ' ')}" for k, r in results.items()))
    print(f"[finetune] {line}; details in {run_dir / 'serve_check.json'}")
    if any(r["agree"] < r["total"] for r in results.values()):
        raise ServeError(f"{line}: the server does not answer as trained (see {run_dir / 'serve_check.json'})")
    Path(log.name).unlink(missing_ok=True)
    return line


def ask(server, row: dict, system: str | None, max_new_tokens: int) -> str:
    """The server's greedy answer to the row's prompt, as an OpenAI chat-completions client sends it."""
    messages = [m for m in prompt_messages(row["messages"]) if m["role"] != "system"]
    images = iter(row["images"])
    body = {"model": server.model, "temperature": 0, "max_tokens": max_new_tokens, "seed": 0,
            "messages": ([{"role": "system", "content": system}] if system else [])
            + [{"role": m["role"], "content": [_part(p, images) for p in m["content"]]} for m in messages]}
    request = Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"})
    try:
        with urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())["choices"][0]["message"]["content"] or ""
    except HTTPError as e:  # vLLM says why in the body ({"error": {"message": ...}})
        detail = e.read().decode("utf-8", errors="replace")
        raise ServeError(f"row {row['row_id']}: the server answered HTTP {e.code}: {detail[:300]}") from None
    return answer.strip()


def _part(part: dict, images) -> dict:
    if part["type"] == "image":
        buffer = io.BytesIO()
        next(images).save(buffer, format="PNG")  # lossless: the server decodes the pixels predict used
        return {"type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}
    return {"type": "text", "text": part["text"]}
