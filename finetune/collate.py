"""Chat rows -> model inputs whose labels are the assistant replies (each closed by its end-of-turn token) only.

How the labels are found, the same way for every family:
1. The chat template is rendered for the conversation, and for each assistant turn also for the conversation up to
   that turn with the generation prompt; the difference is the reply, as characters of the rendered text. A
   template whose renderings are not prefixes of each other is refused rather than guessed at.
2. The processor expands image placeholders and tokenises, returning token character offsets and where each
   placeholder was expanded (`return_text_replacement_offsets`); reply spans are shifted past the expansions.
3. A token carries loss when it overlaps a reply span. Image tokens and padding are forced to -100 regardless.

Tokens are exactly those `processor.apply_chat_template(..., tokenize=True)` gives at inference time, with two
documented exceptions, both applied identically in training and inference by the functions below:
- a template that closes a reply with no end-of-turn token (llava-hf's LLaVA-1.5) gets the tokenizer's EOS appended
  to each reply (`prepare_messages`), so the model learns to stop and `generate` stops there;
- template variables in `Family.template_kwargs` (Llama 3.2 Vision's date) are pinned.

What the pre-flight scan and inference must share with training: `render_with_spans` (text + reply spans),
`render` (a prompt), and `encode` (text + images -> tensors, PaliGemma's text-only rows and Mllama's batches
included). `ChatCollator.__call__` is only these three plus the label mask.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

import torch

from .data import DataError
from .families import Family

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template renders a conversation in a way labels cannot be derived from."""


# --- how a template treats messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateTraits:
    """What finetune adapts to, probed once per template by rendering small conversations."""

    #: Roles whose text-only messages must be passed as a plain string: the template would otherwise render the
    #: list of parts itself (Llama 3.2 Vision's hub template does `messages[0]['content']|trim` for the system).
    string_roles: frozenset[str]
    #: The token that ends each reply: the family's end-of-turn when the template writes it, else the EOS that
    #: `prepare_messages` appends to every reply.
    end_token: str
    #: True when the template writes no end-of-turn after a reply and finetune appends `end_token` itself.
    appends_eos: bool


_TRAITS: dict[tuple, TemplateTraits] = {}
_PROBE = ("Probe system text.", "Probe user text.", "Probe reply text.")


def template_kwargs(processor, family: Family) -> dict:
    """The family's pinned template variables that this template reads (transformers hands any other keyword to
    the processor, with a warning)."""
    template = str(processor.chat_template or "")
    return {k: v for k, v in family.template_kwargs if k in template}


def template_traits(processor, family: Family) -> TemplateTraits:
    """Probe (once per template) how the chat template renders message content and reply endings."""
    tokenizer = processor.tokenizer
    key = (str(processor.chat_template), tokenizer.eos_token, family.name)
    if key in _TRAITS:
        return _TRAITS[key]
    if not processor.chat_template:
        raise TemplateError(f"the {family.name} processor has no chat template; set model.chat_template to a "
                            "Jinja template file")
    system, user, reply = _PROBE

    def text_ok(messages: list[dict], texts: list[str]) -> bool:
        try:
            rendered = _apply(processor, messages, family)
        except Exception:  # a template that refuses the probe (e.g. no system role) decides nothing here
            return False
        return all(rendered.count(t) == 1 for t in texts) and "'type'" not in rendered

    def parts(role: str, text: str) -> dict:
        return {"role": role, "content": [{"type": "text", "text": text}]}

    string_roles = set()
    turn = [parts("user", user), parts("assistant", reply)]
    for role, text in (("system", system), ("user", user), ("assistant", reply)):
        probe = ([parts("system", system)] + turn) if role == "system" else turn
        if text_ok(probe, [text]):
            continue
        as_string = [dict(m, content=text) if m["role"] == role else m for m in probe]
        if text_ok(as_string, [text]):
            string_roles.add(role)

    rendered = _apply(processor, _with_string_roles(turn, string_roles), family)
    after = rendered[rendered.index(reply) + len(reply):] if reply in rendered else ""
    closes = after.lstrip().startswith(family.end_of_turn)
    if not closes and not tokenizer.eos_token:
        raise TemplateError(f"the chat template writes no end-of-turn {family.name!r} after a reply and the "
                            "tokenizer has no EOS token to end replies with")
    traits = TemplateTraits(frozenset(string_roles), family.end_of_turn if closes else tokenizer.eos_token,
                            appends_eos=not closes)
    _TRAITS[key] = traits
    return traits


def _with_string_roles(messages: list[dict], roles) -> list[dict]:
    out = []
    for m in messages:
        content = m["content"]
        if m["role"] in roles and not isinstance(content, str) and all(p["type"] == "text" for p in content):
            m = dict(m, content="".join(p["text"] for p in content))
        out.append(m)
    return out


def prepare_messages(processor, messages: list[dict], family: Family) -> list[dict]:
    """The messages as this chat template needs them: text-only messages as strings for roles whose template
    cannot take a list of parts, and the EOS appended to every assistant reply when the template writes no
    end-of-turn (as LLaVA-1.5 was trained: "ASSISTANT: reply</s>"). Training and inference both render these."""
    traits = template_traits(processor, family)
    out = _with_string_roles(messages, traits.string_roles)
    if traits.appends_eos:
        out = [_append_to_reply(m, traits.end_token) if m["role"] == "assistant" else m for m in out]
    return out


def _append_to_reply(message: dict, token: str) -> dict:
    content = message["content"]
    if isinstance(content, str):
        return dict(message, content=content + token)
    last = max((i for i, p in enumerate(content) if p["type"] == "text"), default=None)
    if last is None:
        return dict(message, content=list(content) + [{"type": "text", "text": token}])
    return dict(message, content=[dict(p, text=p["text"] + token) if i == last else p for i, p in enumerate(content)])


def _apply(processor, messages: list[dict], family: Family, generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **template_kwargs(processor, family))


def render(processor, messages: list[dict], family: Family, generation_prompt: bool = False) -> str:
    """The chat template's text for a conversation, exactly as training renders it (for prompts at inference:
    `generation_prompt=True` on the conversation without its final reply)."""
    return _apply(processor, prepare_messages(processor, messages, family), family, generation_prompt)


# --- text and label spans ---------------------------------------------------------------------------------------


def render_with_spans(processor, messages: list[dict], family: Family) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant reply (with its end-of-turn).

    For PaliGemma the spans are those of the text after the processor's `<bos>` insertion (see `encode`)."""
    traits = template_traits(processor, family)
    messages = prepare_messages(processor, messages, family)

    def rendered(msgs: list[dict], generation_prompt: bool = False) -> str:
        try:
            return _apply(processor, msgs, family, generation_prompt)
        except TemplateError:
            raise
        except Exception as e:  # jinja's TemplateError and raise_exception(): a conversation the template refuses
            raise TemplateError(f"the chat template cannot render this conversation: {e}") from e

    full = rendered(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = rendered(messages[:i], generation_prompt=True)
        upto = rendered(messages[: i + 1])
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise TemplateError(
                f"assistant turn {i}: the chat template does not render the conversation up to this turn as a prefix "
                "of the whole conversation, so reply tokens cannot be located (PaliGemma's template does this for "
                "an image after a reply, as it puts every image first; Llama 3.2 Vision's when an image first "
                "appears after a reply and there is no system message)"
            )
        # Trailing whitespace is template glue (Qwen's "\n" after <|im_end|>). Leading whitespace is generated by
        # the model (LLaVA's " " after "ASSISTANT:"), except the "\n" PaliGemma's processor itself appends.
        raw = upto[len(prompt):]
        start = len(prompt)
        if family.processor_adds_bos_and_newline and raw.startswith("\n"):
            start += 1
        end = len(prompt) + len(raw.rstrip())
        if not upto[:end].endswith(traits.end_token):
            raise TemplateError(
                f"assistant turn {i}: the rendered reply does not end with the end-of-turn token "
                f"{traits.end_token!r}: {upto[max(start, end - 60):end]!r}"
            )
        spans.append((start, end))
    if family.processor_adds_bos_and_newline:
        spans = _shift_for_bos(full, spans, processor)
    return full, spans


def _shift_for_bos(text: str, spans: list[tuple[int, int]], processor) -> list[tuple[int, int]]:
    # PaliGemma's prompt layout puts <bos> right after the last image token, or first when there is none.
    image_token = processor.image_token
    at = text.rfind(image_token) + len(image_token) if image_token in text else 0
    n = len(processor.tokenizer.bos_token)
    return [(s + n if s >= at else s, e + n if e >= at else e) for s, e in spans]


# --- tokenising -------------------------------------------------------------------------------------------------


def encode(processor, family: Family, texts: list[str], images: list[list], videos: list[list] | None = None,
           offsets: bool = False):
    """Rendered texts and their images -> a BatchFeature of tensors, as the model's processor makes them.

    With `offsets`, also `offset_mapping` (a tensor) and `text_replacement_offsets` (per row, where each image
    placeholder was expanded). Handles what the processors do not: rows with and rows without images in one
    batch (transformers cannot turn the ragged replacement lists into a tensor when the first row has none;
    Mllama's image processor fails then; PaliGemma's processor puts `<bos>` mid-text in a row without `<image>`
    and refuses a batch without images)."""
    from transformers import BatchFeature

    n = len(texts)
    has_image = [bool(i) for i in images]
    if family.processor_adds_bos_and_newline and not all(has_image):
        return _paligemma_mixed(processor, family, texts, images, offsets)
    order = list(range(n))
    if family.image_rows_first and any(has_image) and not all(has_image):
        order = [i for i in order if has_image[i]] + [i for i in order if not has_image[i]]
    texts = [texts[i] for i in order]
    images = [list(images[i]) for i in order]
    kwargs = dict(padding=True, return_tensors=None, **tokenizer_kwargs(processor, texts))
    if offsets:
        kwargs.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
    if videos:
        kwargs["videos"] = videos
    out = processor(text=texts, images=images if any(images) else None, **kwargs)
    replacements = out.pop("text_replacement_offsets", None)
    # Converted here, not by the processor: its conversion trips over ragged replacement lists.
    batch = BatchFeature(dict(out), tensor_type="pt")
    batch.pop("labels", None)  # PaliGemma's processor makes its own (wrong for chat) labels
    if family.image_rows_first:
        _pad_image_rows(batch, n)
    if order != list(range(n)):
        back = sorted(range(n), key=order.__getitem__)
        for key, value in batch.items():
            batch[key] = value[back]
        replacements = [replacements[i] for i in back] if replacements is not None else None
    if offsets:
        batch["text_replacement_offsets"] = replacements or [[] for _ in range(n)]
    return batch


def tokenizer_kwargs(processor, texts: list[str]) -> dict:
    """Tokenizer settings that change which tokens come out (the pre-flight scan measures with them too)."""
    bos = processor.tokenizer.bos_token
    if bos and all(t.startswith(bos) for t in texts):
        return {"add_special_tokens": False}  # the template wrote <bos>; don't add a second (as transformers)
    return {}


def _pad_image_rows(batch, n: int) -> None:
    """Mllama's image processor leaves rows without images out of `aspect_ratio_ids`/`aspect_ratio_mask` (they are
    last here): pad them as it pads a missing image (id 0, first tile unmasked, so no attention row is empty)."""
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        value = batch.get(key)
        if value is None or value.shape[0] == n:
            continue
        pad = torch.zeros((n - value.shape[0], *value.shape[1:]), dtype=value.dtype)
        if key == "aspect_ratio_mask":
            pad[..., 0] = 1
        batch[key] = torch.cat([value, pad])


def _paligemma_mixed(processor, family: Family, texts, images, offsets: bool):
    """PaliGemma with text-only rows: image rows through the processor, text-only rows laid out as the processor
    lays out a prompt without image ("<bos>{text}\\n"), then padded into one batch on the tokenizer's side."""
    from transformers import BatchFeature

    tokenizer = processor.tokenizer
    keys = ["input_ids", "attention_mask", "token_type_ids"] + (["offset_mapping"] if offsets else [])
    rows, replacements, pixel_values = {}, {}, None
    image_rows = [i for i, im in enumerate(images) if im]
    if image_rows:
        enc = encode(processor, family, [texts[i] for i in image_rows], [images[i] for i in image_rows],
                     offsets=offsets)
        pixel_values = enc["pixel_values"]  # one entry per image, in row order: text-only rows add none
        for j, i in enumerate(image_rows):
            real = enc["attention_mask"][j] == 1
            rows[i] = {k: enc[k][j][real] for k in keys}
            replacements[i] = enc["text_replacement_offsets"][j] if offsets else []
    for i, text in enumerate(texts):
        if i not in rows:
            enc = tokenizer(tokenizer.bos_token + text + "\n", add_special_tokens=False, return_tensors="pt",
                            return_offsets_mapping=offsets, return_token_type_ids=True)
            rows[i], replacements[i] = {k: enc[k][0] for k in keys}, []
    length = max(len(r["input_ids"]) for r in rows.values())
    fill = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "offset_mapping": 0}
    left = tokenizer.padding_side == "left"
    batch = {}
    for k in keys:
        padded = []
        for i in range(len(texts)):
            v = rows[i][k]
            pad = torch.full((length - len(v), *v.shape[1:]), fill[k], dtype=v.dtype)
            padded.append(torch.cat([pad, v] if left else [v, pad]))
        batch[k] = torch.stack(padded)
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    if offsets:
        batch["text_replacement_offsets"] = [replacements[i] for i in range(len(texts))]
    return BatchFeature(batch)


# --- the collator -----------------------------------------------------------------------------------------------


@dataclass
class ChatCollator:
    """Batches chat rows (`messages`, `images`) into padded tensors with assistant-only labels."""

    processor: object
    family: Family

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right"  # training pads after the reply; generation uses left padding
        pattern = re.compile(rf"^(?:{self.family.image_tokens})$")
        vocab = tokenizer.get_vocab()
        self.image_token_ids = sorted(i for t, i in vocab.items() if pattern.match(t))
        if not self.image_token_ids:
            raise TemplateError(f"no token of the tokenizer matches the image tokens of {self.family.name}")

    def __call__(self, rows: list[dict]) -> dict:
        """A training batch. Rows whose images failed to decode (a truncated file the header check could not see, or
        one broken since the scan) are left out and listed under `dropped_rows` as (row id, problem); a batch with no
        row left is a stand-in (the last good row, nothing labelled) marked `skip_batch`, which every rank skips
        together (finetune.trainer), so a bad file never stops a run."""
        good = [row for row in rows if not row.get("problem")]
        dropped = [(row.get("row_id"), row["problem"]) for row in rows if row.get("problem")]
        if good:
            batch = self.encode_batch(good)
            self._stand_in = good[:1]
        elif getattr(self, "_stand_in", None):
            batch = self.encode_batch(self._stand_in)
            self.unsupervise(batch)
            batch["skip_batch"] = True
        else:
            raise DataError("no row of this batch could be loaded: " + "; ".join(
                f"row {row_id}: {problem}" for row_id, problem in dropped))
        if dropped:
            batch["dropped_rows"] = dropped
        return batch

    def encode_batch(self, rows: list[dict]) -> dict:
        """The training batch of rows that all loaded (a subclass encodes its own kind of row here)."""
        return self.encode_rows(rows)

    def unsupervise(self, batch: dict) -> None:
        """Nothing in `batch` carries loss (a stand-in batch)."""
        batch["labels"][:] = IGNORE_INDEX

    def encode_rows(self, rows: list[dict]) -> dict:
        """Padded tensors with assistant-only labels for rows whose images are decoded."""
        for row in rows:
            if row.get("problem"):
                raise DataError(f"row {row.get('row_id')}: {row['problem']}")
        texts, spans = zip(*(render_with_spans(self.processor, row["messages"], self.family) for row in rows))
        images = [list(row["images"]) for row in rows]
        videos = [list(v) for row in rows for v in row.get("videos") or []]
        batch = encode(self.processor, self.family, list(texts), images, videos, offsets=True)
        offsets = batch.pop("offset_mapping")
        replacements = batch.pop("text_replacement_offsets")

        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, row_spans in enumerate(spans):
            mask = _span_mask(offsets[i], _shift_spans(row_spans, replacements[i]))
            labels[i, mask] = batch["input_ids"][i, mask]
        labels[torch.isin(batch["input_ids"], torch.tensor(self.image_token_ids))] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        if self.family.prefix_lm:
            batch["token_type_ids"] = _causal_from_first_answer(labels, batch["attention_mask"])
        batch["labels"] = labels
        return batch


def _shift_spans(spans, replacements) -> list[tuple[int, int]]:
    """Map character spans of the template text onto the text after image placeholders were expanded."""
    ends = [r["span"][1] for r in replacements]
    gained = [0]
    for r in replacements:
        gained.append(r["new_span"][1] - r["span"][1])
    return [tuple(c + gained[bisect.bisect_right(ends, c)] for c in span) for span in spans]


def _span_mask(offsets: torch.Tensor, spans) -> torch.Tensor:
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = torch.zeros(len(offsets), dtype=torch.bool)
    for start, end in spans:
        mask |= (starts < end) & (ends > start)  # zero-width tokens (padding, added <bos>) never overlap
    return mask


def _causal_from_first_answer(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # Prefix-LM: 0 = bidirectional prefix (image + prompt), 1 = causal. Everything from the first answer token on
    # is causal, so no position can attend to a later answer token (TRL leaves all zeros here).
    supervised = labels != IGNORE_INDEX
    first = torch.where(supervised.any(1), supervised.int().argmax(1), torch.full((len(labels),), labels.shape[1]))
    positions = torch.arange(labels.shape[1]).unsqueeze(0)
    return ((positions >= first.unsqueeze(1)) & (attention_mask == 1)).long()
