"""Tiny-model zoo: randomly initialised vision-language checkpoints built locally, without the Hugging Face Hub.

Each family is built with its real model and processor classes, its real special and image tokens and its real chat
template, so that everything downstream (collator, label masking, LoRA placement, 4-bit loading, merging) runs the
same code paths as on a hub checkpoint, in seconds, on a CPU. Only the sizes are tiny, and the weights are random.

    from finetune import zoo
    path = zoo.ensure("qwen2_vl", "small")     # a folder for AutoProcessor / AutoModelForImageTextToText
    model, processor = zoo.build("llava")      # in memory, not saved
    path = zoo.ensure_like("tests/fixtures/hub/Qwen__Qwen2.5-VL-3B-Instruct")  # a real checkpoint's interface

Tokenizers are byte-level BPE trained here on a small fixed corpus (generic words plus the vocabulary of the
bundled chart-QA demo), deterministic run to run. Images are small (32-64 px) so image token runs stay short.

`ensure_like` / `build_like` (recipes: `zoo:<folder>`) build a replica of a real checkpoint from a folder of its
small hub files instead: its own chat template, special tokens and image settings (so an image expands to as many
tokens as on the real model), with tiny weights and vocabulary. The repository keeps those files for every model
the recipes name under tests/fixtures/hub/.
"""


from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..families import FAMILIES as FAMILY_TABLE
from . import gemma, idefics, llava, mllama, qwen
from .common import HubFiles, token_ids

#: Bump when a change in the build changes what gets saved; the cache key also hashes the zoo's files and the
#: versions of the libraries whose classes and templates end up in the checkpoint.
ZOO_VERSION = "1"

#: The llama.cpp pre-tokenizer of every zoo tokenizer (byte-level BPE with GPT-2's split rule), which llama.cpp's
#: converter cannot recognise from its hash table of hub tokenizers. GGUF exports of zoo models name it explicitly;
#: the export's tokenizer-parity check still compares the two tokenizers string by string.
GGUF_PRE_TOKENIZER = "gpt-2"

#: Every family of the model-family table has a zoo builder (BUILDERS below).
FAMILIES: tuple[str, ...] = tuple(FAMILY_TABLE)

#: Size presets. Text: decoder width/depth; v_*: vision tower. A preset never changes image size, patch size or
#: token layout, so the same conversation expands to the same tokens at every size.
PRESETS: dict[str, dict[str, int]] = {
    # A few hundred K parameters: for tests.
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                 v_hidden=32, v_intermediate=64, v_layers=2, v_heads=2),
    # ~2-3M: big enough to visibly learn the chart-QA demo on a CPU.
    "small": dict(hidden=192, intermediate=512, layers=4, heads=6, kv_heads=2,
                  v_hidden=64, v_intermediate=256, v_layers=3, v_heads=4),
    # Tens of M: for throughput benchmarks.
    "bench": dict(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4,
                  v_hidden=128, v_intermediate=512, v_layers=4, v_heads=4),
}


#: One builder per family, in the family's module: `(preset sizes, HubFiles or None) -> (model, processor)`. The
#: processor is built before the config: some processors add tokens.
BUILDERS = {
    "llava": llava.llava, "llava_next": llava.llava_next, "idefics3": idefics.idefics3, "smolvlm": idefics.smolvlm,
    "qwen2_vl": qwen.qwen2_vl, "qwen2_5_vl": qwen.qwen2_5_vl, "qwen3_vl": qwen.qwen3_vl,
    "qwen3_vl_moe": qwen.qwen3_vl_moe, "qwen3_5": qwen.qwen3_5, "qwen3_5_moe": qwen.qwen3_5_moe,
    "paligemma": gemma.paligemma, "gemma3": gemma.gemma3,
    "gemma3n": gemma.gemma3n, "gemma4": gemma.gemma4, "mllama": mllama.mllama,
}


# --- public API ----------------------------------------------------------------------------------------------------


def _check(family: str, preset: str) -> None:
    if family not in BUILDERS:
        raise ValueError(f"unknown zoo family {family!r}; valid: {', '.join(FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown zoo preset {preset!r}; valid: {', '.join(PRESETS)}")


def build(family: str, preset: str = "tiny"):
    """A randomly initialised (seeded: identical every run) model and its processor, in memory."""
    _check(family, preset)
    return _finish(family, *_seeded(lambda: BUILDERS[family](PRESETS[preset])), stop_at_end_of_turn=True)


def build_like(hub_dir: str | Path, preset: str = "tiny"):
    """A tiny random model with the interface of a real checkpoint: its model and processor classes, special
    tokens, chat template, image settings and vision geometry (patch and image size, merge/pixel-shuffle factors,
    tiling), read from a folder of its small files (`HubFiles`). Only the sizes and the vocabulary are tiny, so an
    image expands to exactly as many tokens as on the real model. Generation stops where the checkpoint's
    generation config says (its `generation_config.json`; without one, or one whose ids the tokenizer_config.json
    does not name, at EOS and the family's end of turn)."""
    hub = HubFiles(hub_dir)
    _check(hub.family, preset)
    eos = hub.generation_eos_tokens()
    return _finish(hub.family, *_seeded(lambda: BUILDERS[hub.family](PRESETS[preset], hub)),
                   stop_at_end_of_turn=eos is None, eos_tokens=eos)


def _seeded(make):
    import torch

    torch.manual_seed(0)
    return make()


def _finish(family: str, model, proc, stop_at_end_of_turn: bool, eos_tokens: list[str] | None = None):
    import torch

    # Behind the final RMSNorm, an lm_head initialised at std 0.02 caps every logit near 0.02 * hidden: the output
    # stays near-uniform whatever LoRA learns. Unit-variance logits leave LoRA the room a trained head has.
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        with torch.no_grad():
            head.weight.normal_(0.0, head.weight.shape[1] ** -0.5)
    tok = proc.tokenizer
    eos = token_ids(tok, *eos_tokens) if eos_tokens else [tok.eos_token_id]
    if stop_at_end_of_turn:
        eos += [i for i in token_ids(tok, FAMILY_TABLE[family].end_of_turn) if i != tok.eos_token_id]
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, eos, tok.pad_token_id
    return model, proc


def version_tag() -> str:
    """ZOO_VERSION plus a hash of the zoo's files and the library versions that shape the saved checkpoint."""
    import tokenizers
    import transformers
    import trl

    h = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.name.encode() + b"\0" + source.read_bytes())
    h.update(f"{transformers.__version__} {trl.__version__} {tokenizers.__version__}".encode())
    return f"v{ZOO_VERSION}-{h.hexdigest()[:8]}"


def cache_root() -> Path:
    env = os.environ.get("FINETUNE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "finetune") / "zoo"


def ensure(family: str, preset: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """The folder of a saved zoo checkpoint (model + processor, safetensors), built on first use and then cached."""
    _check(family, preset)
    return _ensure(f"{family}-{preset}-{version_tag()}", lambda: build(family, preset),
                   dict(family=family, preset=preset), cache_dir)


def ensure_like(hub_dir: str | Path, preset: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """`ensure` for `build_like`: a cached tiny checkpoint with a real checkpoint's interface."""
    hub = HubFiles(hub_dir)
    _check(hub.family, preset)
    return _ensure(f"like-{hub.folder.name}-{preset}-{version_tag()}-{hub.digest()}",
                   lambda: build_like(hub.folder, preset),
                   dict(family=hub.family, preset=preset, like=str(hub.folder.resolve())), cache_dir)


def _ensure(name: str, make, meta: dict, cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / name
    if (final / "zoo.json").is_file():  # written before the folder is renamed into place: the folder is complete
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))  # same filesystem: the rename is atomic
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        start = time.perf_counter()
        model, proc = make()
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
        meta = dict(meta, version=version_tag(), params=sum(p.numel() for p in model.parameters()),
                    model_class=type(model).__name__, processor_class=type(proc).__name__,
                    build_seconds=round(time.perf_counter() - start, 3))
        (tmp / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "zoo.json").is_file():
                raise
            # another process finished the same build first; its copy is identical and complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def parse_name(name: str) -> tuple[str | None, Path | None, str]:
    """`zoo:<family>[:<preset>]` -> (family, None, preset); `zoo:<folder of hub files>[:<preset>]` -> (None,
    folder, preset). A folder is told apart by its path separator; family names have none."""
    body = name.removeprefix("zoo:")
    head, _, tail = body.rpartition(":")
    target, preset = (head, tail) if head and tail in PRESETS else (body, "tiny")
    if "/" in target or os.sep in target:
        return None, Path(target).expanduser(), preset
    return target, None, preset


def resolve(name: str) -> Path:
    """The checkpoint folder a `zoo:` name stands for, built and cached on first use."""
    family, folder, preset = parse_name(name)
    return ensure_like(folder, preset) if folder is not None else ensure(family, preset)


def info(path: str | Path) -> dict:
    """The zoo.json of a checkpoint folder made by `ensure`."""
    return json.loads((Path(path) / "zoo.json").read_text())
