"""`finetune push`: upload an adapter (run folder) or a merged export to the Hugging Face Hub, in one commit.

    finetune push runs/tiny-chartqa --repo alice/tiny-chartqa --private --revision experiment
    finetune push runs/tiny-chartqa --repo alice/tiny-chartqa-merged --merged   # merges first if needed
    finetune push runs/tiny-chartqa --repo alice/tiny-chartqa-gguf --gguf       # after `finetune export-gguf`

The token is huggingface_hub's own: `HF_TOKEN` or the `hf auth login` token file (or `token=` from Python). finetune
never prints, logs or writes it. Transient failures (HTTP 408/429/5xx, dropped connections) are retried with
exponential backoff, the commit included: huggingface_hub retries its preupload call but not the commit POST.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable, TypeVar

from ..recipe import HUB_ID, load_recipe
from .card import adapter_serving_warnings, hub_id, render_card
from .merging import ExportError, merge

T = TypeVar("T")

#: HTTP statuses worth retrying: timeouts, rate limits and server-side failures.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Top-level files that make up an adapter or a merged model. Subfolders (checkpoints, best/, eval/, merged/) stay
#: local, and pickles (.bin, .pt, .pkl) are never uploaded. README.md is always the card rendered for the push.
UPLOAD_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".yaml", ".png")


class HubError(ExportError):
    """A push that cannot run or did not succeed; the message says what to change."""


def push(target: str | Path, repo_id: str | None = None, private: bool | None = None, revision: str | None = None,
         merged: bool | None = None, token: str | None = None, endpoint: str | None = None,
         commit_message: str | None = None, attempts: int = 5, retry_delay: float = 1.0, gguf: bool = False) -> str:
    """Upload a run's adapter (or its merged export, or with `gguf` its checked GGUF files) with processor files and
    a model card; returns the commit URL.

    Unset arguments fall back to the recipe's `export` section (hub_repo_id, hub_private, hub_revision, hub_merged).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import OfflineModeIsEnabled

    target = Path(target)
    recipe = _recipe_of(target)
    cfg = recipe.export
    merged = cfg.hub_merged if merged is None else merged
    repo_id = repo_id or cfg.hub_repo_id
    if not repo_id:
        raise HubError("--repo: where to push? pass --repo namespace/name or set export.hub_repo_id in the recipe")
    if not HUB_ID.match(repo_id):
        raise HubError(f"--repo: expected namespace/name (e.g. alice/qwen2-vl-chartqa), got {repo_id!r}")
    private = cfg.hub_private if private is None else private
    revision = revision or cfg.hub_revision
    if not (token or get_token()):
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    folder, kind = _gguf_folder(target) if gguf else _folder(target, merged)  # this may run a merge

    suffixes = (".gguf", ".json", ".jinja") if kind == "gguf" else UPLOAD_SUFFIXES
    contents: dict[str, str | bytes] = {p.name: str(p) for p in sorted(folder.iterdir())
                                        if p.is_file() and p.suffix in suffixes}
    for name, value in list(contents.items()):
        if not name.endswith(".gguf"):
            contents[name] = _without_local_paths(Path(value))
    if kind == "gguf":
        contents["README.md"] = _gguf_card(folder, recipe).encode()
    else:
        contents["README.md"] = render_card(folder, kind, repo_id).encode()
    if kind == "adapter":
        contents["adapter_config.json"] = _portable_adapter_config(folder, recipe.model.name_or_path)
        for w in adapter_serving_warnings(folder):
            print(f"[finetune] warning: {w}")
    what = {"merged": "merged model", "adapter": "LoRA adapter", "gguf": "GGUF files"}[kind]
    message = commit_message or f"Upload {what} (finetune)"
    # One set of operations for every attempt: files already uploaded (LFS/xet) are not sent again on a retry.
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=value) for name, value in contents.items()]

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    print(f"[finetune] pushing {kind} ({len(operations)} files) to {repo_id}"
          f"{'@' + revision if revision else ''}{' (private)' if private else ''}")
    try:
        url = with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                           "create repository", attempts, retry_delay)
        if revision:
            with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model"),
                         f"create branch {revision}", attempts, retry_delay)
        info = with_retries(lambda: api.create_commit(repo_id, operations=operations, commit_message=message,
                                                      revision=revision, repo_type="model"),
                            "commit", attempts, retry_delay)
    except OfflineModeIsEnabled as e:
        raise HubError("pushing needs the network, but HF_HUB_OFFLINE is set; unset it for `finetune push`") from e
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable line; the cause stays chained
        if not _is_http_error(e):
            raise
        raise HubError(f"push to {repo_id} failed: {_describe(e)}") from e
    print(f"[finetune] pushed to {url}; commit {info.oid}")
    return info.commit_url


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, delay: float = 1.0, max_delay: float = 30.0) -> T:
    """Call `fn`, retrying transient failures up to `attempts` calls in all, waiting delay, 2 x delay, ..."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered by `transient`, re-raised otherwise
            if attempt == attempts or not transient(e):
                raise
            wait = min(max_delay, delay * 2 ** (attempt - 1))
            print(f"[finetune] push: {what} failed ({_describe(e)}); retry {attempt}/{attempts - 1} in {wait:g}s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def transient(error: BaseException) -> bool:
    """HTTP 408/429/5xx, or a connection that failed or timed out (not offline mode, not 4xx)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return False
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status is not None:
        return status in RETRY_STATUS
    # huggingface_hub's HTTP client (httpx2 here, httpx in other versions) raises TransportError subclasses.
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__name__ == "TransportError" for cls in type(error).__mro__)


def _is_http_error(error: BaseException) -> bool:
    return getattr(error, "response", None) is not None or transient(error)


def _describe(error: BaseException) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    # Only the status and the first line: server messages are short, and nothing here can hold the token.
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"HTTP {status}: {first}" if status is not None and str(status) not in first else first


def _recipe_of(target: Path):
    if not (target / "recipe.yaml").is_file():
        raise HubError(f"{target}: no recipe.yaml; pass a training run folder or a `finetune merge` export")
    return load_recipe(target / "recipe.yaml")


def _folder(target: Path, merged: bool) -> tuple[Path, str]:
    """The folder to upload and what it holds: "adapter" (a run folder) or "merged" (an export)."""
    if (target / "adapter_config.json").is_file():
        if not merged:
            return target, "adapter"
        export = target / "merged"
        if not (export / "config.json").is_file():
            merge(target, export, overwrite=True)  # raises on a failed parity check: nothing is pushed
        target = export
    if not (target / "config.json").is_file():
        raise HubError(f"{target}: neither a training run folder (adapter_config.json) nor a merged export "
                       "(config.json)")
    _refuse_failed_checks(target, target / "parity.json", "its parity check")
    return target, "merged"


def _gguf_folder(target: Path) -> tuple[Path, str]:
    """The checked output of `finetune export-gguf`: TARGET/gguf, or TARGET itself."""
    folder = target if (target / "gguf.json").is_file() else target / "gguf"
    if not (folder / "gguf.json").is_file():
        raise HubError(f"{target}: no GGUF export; run `finetune export-gguf {target}` first")
    _refuse_failed_checks(folder, folder / "gguf.json", "its GGUF checks")
    return folder, "gguf"


def _refuse_failed_checks(folder: Path, report_file: Path, checks: str) -> None:
    """Refuse an export whose own checks (recorded in `report_file`) failed; warn when it was made without them."""
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    if not report.get("checked"):
        print(f"[finetune] warning: {folder} was exported without {checks}")
    elif not report.get("passed"):
        raise HubError(f"{folder}: {checks} failed (see {report_file}); refusing to push it")


def _gguf_card(folder: Path, recipe) -> str:
    """The export's own README (how to run it, its checks) with the Hub's metadata header."""
    base = hub_id(recipe.model.name_or_path)
    header = ["---", "library_name: gguf", "tags: [gguf, llama.cpp, image-text-to-text, finetune]"]
    header += [f"base_model: {base}"] if base else []
    body = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    return "\n".join(header + ["---", ""]) + redact_local_paths(body)


#: An absolute or home-relative filesystem path inside a string (not a URL, not a fraction like 3/4).
LOCAL_PATH = re.compile(r"(?<![\w:/.~-])~?(?:/[^\s/'\",;()\[\]]+)+/?")
REDACTED = "<local path>"


def redact_local_paths(value):
    """`value` (parsed JSON/YAML) with every absolute path of this machine replaced by `<local path>/NAME`: the
    file or folder name says what it was without telling the world how this machine's disk is laid out."""
    if isinstance(value, dict):
        return {k: redact_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_local_paths(v) for v in value]
    if isinstance(value, str):
        return LOCAL_PATH.sub(lambda m: f"{REDACTED}/{Path(m[0].rstrip('/')).name}", value)
    return value


def _without_local_paths(path: Path) -> str | bytes:
    """The file to upload: the path itself, or for a JSON/YAML file that names local paths (recipe.yaml's data and
    output folders, run_summary.json's examples) a redacted copy. The run folder keeps the full original."""
    if path.suffix not in (".json", ".yaml"):
        return str(path)
    text = path.read_text(encoding="utf-8")
    if not LOCAL_PATH.search(text):
        return str(path)
    if path.suffix == ".json":
        return (json.dumps(redact_local_paths(json.loads(text)), indent=2) + "\n").encode()
    import yaml

    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    note = f"# Local filesystem paths are shown as {REDACTED}/NAME; the run folder has them in full.\n"
    return (header + note + yaml.safe_dump(redact_local_paths(yaml.safe_load(text)), sort_keys=False)).encode()


def _portable_adapter_config(folder: Path, name_or_path: str) -> bytes:
    """adapter_config.json with the base model as a hub id (or null): never this machine's filesystem path."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_id(name_or_path)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
