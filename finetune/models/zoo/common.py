"""What every zoo family is built from: a tiny byte-level BPE tokenizer with the family's special tokens, the
pieces of the zoo's own chat templates, the decoder and vision config fields every family shares, and `HubFiles`,
the small files of a real checkpoint that a replica copies its interface from."""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import random
import shutil
import tempfile
from pathlib import Path

from ...data.formats import CHARTQA_SYSTEM_PROMPT
from ..families import FAMILIES

VOCAB_SIZE = 1536  # BPE target before special tokens are counted; the corpus saturates a bit below it


# --- tokenizer -----------------------------------------------------------------------------------------------------

_COLORS = "red green blue orange purple yellow gray grey black pink brown white".split()
_CHART_WORDS = ("bar bars chart charts plot graph line label labels value values axis title legend color colour "
                "colors tallest shortest highest lowest largest smallest leftmost rightmost middle biggest").split()
_WORDS = ("the a an is are was of to in on at with for and or not this that these there here it its image picture "
          "photo shape square circle cat dog describe what which where how many much who when why do does show "
          "shows shown please tell me about answer question yes no left right top bottom up down small large big "
          "tall short high low more less most least than first second third last one two three four five six seven "
          "eight nine ten hundred percent number total sum difference average between each per year you can see "
          "I my your we they he she has have had be been will would could should brief briefly short concise").split()
_MARKERS = ["User:", "Assistant:", "System:", "USER:", "ASSISTANT:", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
            "system\n", "user\n", "assistant\n", "model\n", "Answer:", "Answer", "Yes", "No", "Picture 1:"]


def _corpus(seed: int = 0):
    """Training text for the BPE: fixed, so the tokenizer (and so the model) is identical run to run."""
    rnd = random.Random(seed)
    words = _WORDS + _COLORS + _CHART_WORDS + [str(n) for n in range(101)]
    for _ in range(4000):
        sentence = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 14)))
        yield (sentence[0].upper() + sentence[1:] if rnd.random() < 0.5 else sentence) + rnd.choice(".?!,:\n")
    # The demo's questions and answers in the templates' role formats, so that they tokenize compactly.
    formats = ["Answer briefly. USER: {q} ASSISTANT: {a}", "[INST] {q} [/INST] {a}", "User: {q}\nAssistant: {a}",
               "System: Answer briefly.\nuser\n{q}\nmodel\n{a}\n"]
    for _ in range(2):
        for c, fmt in itertools.product(_COLORS, formats):
            for a in (c.capitalize(), c, str(rnd.randint(0, 100)), rnd.choice(["Yes", "No"])):
                q = rnd.choice([f"What is the value of the {c} bar?", "How many bars are in the chart?",
                                f"Which color is the {rnd.choice(_CHART_WORDS[-8:])} bar?", f"Is the {c} bar tallest?"])
                yield fmt.format(q=q, a=a)
    for _ in range(20):
        yield CHARTQA_SYSTEM_PROMPT
    yield from _MARKERS
    yield " ".join(str(n) for n in range(101)) + " 0.5 1.25 (e.g., x) - ; ' \" / %"


def tokenizer(specials: list[str], *, bos: str | None = None, eos: str, pad: str, unk: str | None = None,
               extra: dict[str, str] | None = None, add_bos: bool = False, template: str):
    """Byte-level BPE with the family's special tokens at the lowest ids (in the order given), like real vocabularies
    that start with their control tokens. `add_bos`: the real tokenizer prepends bos when encoding (Llama, Gemma)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE + len(specials), special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   extra_special_tokens=extra or {}, chat_template=template)


def with_merge(tok, text: str):
    """`tok` with `text` (two byte-level pieces) made one token by one more BPE merge, as real vocabularies have it
    (SmolLM's "\n\n"): llama.cpp's mtmd looks the tokens it wraps images in up by their text."""
    import json

    from tokenizers import Tokenizer

    pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    if len(pieces) != 2:
        raise ValueError(f"{text!r} is {len(pieces)} tokens, not 2: one merge cannot make it one")
    data = json.loads(tok.backend_tokenizer.to_str())
    model = data["model"]
    model["vocab"]["".join(pieces)] = max(model["vocab"].values()) + 1
    model["merges"].append(pieces if model["merges"] and isinstance(model["merges"][0], list) else " ".join(pieces))
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))  # in place: special tokens and attributes stay as they are
    return tok


# --- chat templates ------------------------------------------------------------------------------------------------


def trl_template(name: str) -> str:
    """The real template as TRL ships it; read byte-for-byte so TRL recognises it (it compares templates exactly to
    swap in its `{% generation %}`-marked training variant)."""
    return (importlib.resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


# Our own templates take `content` as a string or a list of {"type": "image"} / {"type": "text"} parts.
PARTS = ("{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
          "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}")
TEXT_PARTS = "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
BAD_ROLE = "{{ raise_exception('Unsupported role: ' + message['role']) }}"


# --- shared config pieces ------------------------------------------------------------------------------------------


def token_ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def text_config(p: dict, tok, **overrides) -> dict:
    """Decoder config shared by every family (Llama-like names); vocab from the final tokenizer."""
    cfg = dict(vocab_size=len(tok), hidden_size=p["hidden"], intermediate_size=p["intermediate"],
               num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
               max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    return cfg | overrides


def vision_config(p: dict, **overrides) -> dict:
    """ViT config (CLIP / SigLIP / Idefics3 field names)."""
    return dict(hidden_size=p["v_hidden"], intermediate_size=p["v_intermediate"], num_hidden_layers=p["v_layers"],
                num_attention_heads=p["v_heads"]) | overrides


def head_dim(p: dict) -> int:
    return p["hidden"] // p["heads"]


def mrope_sections(p: dict) -> list[int]:
    """Qwen M-RoPE (temporal, height, width) sections over head_dim/2 frequencies, split like the real 16/24/24."""
    h = head_dim(p)
    return [h // 8, 3 * h // 16, 3 * h // 16]


class HubFiles:
    """The small files of a hub checkpoint (no weights, no vocabulary): its interface, read from a local folder.

    `config.json` (model type, vision geometry), `tokenizer_config.json` (special tokens, whether <bos> is added),
    `preprocessor_config.json` / `processor_config.json` / `video_preprocessor_config.json` (image settings) and
    `chat_template.jinja` (or `chat_template.json`), as `hf download <repo> --include "*.json" "*.jinja"` fetches
    them. Trimmed copies are fine: what a file leaves out takes transformers' defaults.
    """

    PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise ValueError(f"{self.folder}: not a folder of hub checkpoint files (no config.json)")
        self.config = self._json("config.json")
        self.tokenizer_config = self._json("tokenizer_config.json") or {}
        self.chat_template = self._template()
        self.family = self.config.get("model_type")
        if self.family not in FAMILIES:  # every family of the table has a zoo builder
            raise ValueError(f"{self.folder}: model type {self.family!r} has no zoo builder; valid: "
                             f"{', '.join(FAMILIES)}")

    def _json(self, name: str) -> dict | None:
        path = self.folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def _template(self) -> str | None:
        if (self.folder / "chat_template.jinja").is_file():
            return (self.folder / "chat_template.jinja").read_text(encoding="utf-8")
        return (self._json("chat_template.json") or {}).get("chat_template")

    def digest(self) -> str:
        """A hash of every file the replica is built from, for its cache key."""
        h = hashlib.sha256()
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and path.suffix in (".json", ".jinja"):
                h.update(path.name.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()[:10]

    def model_config(self):
        """The checkpoint's config as transformers reads it (defaults filled in, legacy key names mapped)."""
        from transformers import AutoConfig

        return AutoConfig.for_model(**self.config)

    def tokenizer(self):
        """A tiny BPE vocabulary with the checkpoint's special tokens, <bos> behaviour and chat template."""
        tc = self.tokenizer_config

        def token(key):
            value = tc.get(key)
            return value.get("content") if isinstance(value, dict) else value

        named = {k: token(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        # Named extra tokens (Gemma 3's boi_token, image_token, ...) become the tokenizer's attributes, as on the hub.
        # transformers 5 files (Gemma 4) may list unnamed extras instead: those are special tokens only.
        listed = tc.get("extra_special_tokens") or {}
        extra = dict(listed) if isinstance(listed, dict) else {}
        extra.update({k: token(k) for k in tc if k.endswith("_token") and k not in named and isinstance(token(k), str)})
        specials = [t for t in named.values() if t]
        # Reserved placeholders (Gemma 3n's 6,400 <unusedN> / <unused_image_N>) name nothing a template or row uses.
        specials += [e["content"] for _, e in sorted((tc.get("added_tokens_decoder") or {}).items(),
                                                       key=lambda kv: int(kv[0]))
                     if not e["content"].startswith("<unused")]
        specials += list(tc.get("additional_special_tokens") or []) + list(extra.values())
        specials += [] if isinstance(listed, dict) else list(listed)
        if not named["eos_token"] or not named["pad_token"]:
            raise ValueError(f"{self.folder}: tokenizer_config.json needs an eos_token and a pad_token")
        return tokenizer(list(dict.fromkeys(specials)), bos=named["bos_token"], eos=named["eos_token"],
                          pad=named["pad_token"], unk=named["unk_token"], extra=extra,
                          add_bos=bool(tc.get("add_bos_token")), template=self.chat_template)

    def generation_eos_tokens(self) -> list[str] | None:
        """The tokens generation stops at by the checkpoint's `generation_config.json` (Gemma 3: [1, 106]), read
        through `added_tokens_decoder`: a real id means nothing in the tiny vocabulary, its token does."""
        ids = (self._json("generation_config.json") or {}).get("eos_token_id")
        if ids is None:
            return None
        decoder = {int(k): e["content"] for k, e in (self.tokenizer_config.get("added_tokens_decoder") or {}).items()}
        ids = ids if isinstance(ids, list) else [ids]
        if not decoder:
            # A transformers 5 tokenizer_config.json (Gemma 4) names its special tokens but not their ids (those are
            # in tokenizer.json, not kept): stop where the chat template ends a reply, and at EOS.
            return None
        if missing := [i for i in ids if i not in decoder]:
            raise ValueError(f"{self.folder}: generation_config.json eos_token_id {missing} not in "
                             "tokenizer_config.json's added_tokens_decoder (its token is needed)")
        return [decoder[i] for i in ids]

    def processor(self):
        """The checkpoint's processor class and image settings, loaded the way `from_pretrained` loads the real
        one, around the tiny tokenizer."""
        from transformers import AutoProcessor

        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer().save_pretrained(tmp)
            for name in ("config.json", *self.PROCESSOR_FILES):
                if (self.folder / name).is_file():
                    shutil.copy(self.folder / name, Path(tmp) / name)
            if self.chat_template is not None:
                (Path(tmp) / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            processor = AutoProcessor.from_pretrained(tmp)
        processor.chat_template = self.chat_template
        return processor

