"""Dataset formats: one small function per schema, from one dataset row to one chat row.

A chat row is `{"messages": [...], "images": [...], "videos": [...]}`: messages hold `{"type": "image"}`,
`{"type": "video"}` and `{"type": "text", "text": ...}` parts, and images/videos are the row's references (paths or
`{"bytes", "path"}` dicts) in the order their parts appear. Nothing is decoded here. `data.format` picks the
function from FORMATS; COLUMNS lists the columns each reads, which `data.columns` can map to other names.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

CHARTQA_SYSTEM_PROMPT = (
    "You are a Vision Language Model specialized in interpreting visual data from chart images. Your task is to "
    "analyze the provided chart image and respond to queries with concise answers, usually a single word, number, "
    "or short phrase. The charts include a variety of types (e.g., line charts, bar charts) and contain colors, "
    "labels, and text. Focus on delivering accurate, succinct answers based on the visual information. Avoid "
    "additional explanation unless absolutely necessary."
)
CAPTION_PROMPT = "Describe this image."
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RowError(ValueError):
    """A row that does not fit its format; `reason` is a short label the pre-flight report counts rows by."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _system(prompt: str | None) -> list[dict]:
    return [{"role": "system", "content": [_text(prompt)]}] if prompt else []


def _column(row: dict, name: str) -> Any:
    if name not in row or row[name] is None:
        raise RowError("missing column", f"no value in column '{name}' (the row has {', '.join(sorted(row))})")
    return row[name]


def _chat(system_prompt: str | None, user: list[dict], answer: str, images: list, videos: list = ()) -> dict:
    return {"messages": _system(system_prompt) + [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": [_text(str(answer).strip())]}],
            "images": list(images), "videos": list(videos)}


def chartqa(row: dict, system_prompt: str | None) -> dict:
    """HuggingFaceM4/ChartQA: `image`, `query`, `label` (a list whose first entry is the answer)."""
    label = _column(row, "label")
    answer = label[0] if isinstance(label, list) else label
    prompt = CHARTQA_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return _chat(prompt, [{"type": "image"}, _text(_column(row, "query"))], answer, [_column(row, "image")])


def vqa(row: dict, system_prompt: str | None) -> dict:
    """DocVQA / VQAv2: `image`, `question`, `answers` (strings or VQAv2's `{"answer": ...}` dicts)."""
    answer = row.get("multiple_choice_answer") or _majority(_column(row, "answers"))
    return _chat(system_prompt, [{"type": "image"}, _text(_column(row, "question"))], answer,
                 [_column(row, "image")])


def _majority(answers: Any) -> str:
    if isinstance(answers, str):
        return answers
    if isinstance(answers, dict):  # a column of VQAv2 dicts that Arrow turned into a dict of lists
        answers = answers.get("answer", [])
    values = [a["answer"] if isinstance(a, dict) else a for a in answers]
    values = [str(v).strip() for v in values if v is not None and str(v).strip()]
    if not values:
        raise RowError("no answer", "column 'answers' holds no non-empty answer")
    counts = Counter(values)
    return max(values, key=lambda v: (counts[v], -values.index(v)))  # most frequent; ties go to the earliest


def caption(row: dict, system_prompt: str | None) -> dict:
    """Captioning: `image` and `caption`, or `captions` (a list; the first is used unless data.expand_captions)."""
    text = row.get("caption")
    if not text:
        captions = _column(row, "captions")
        if not captions:
            raise RowError("no answer", "column 'captions' is empty")
        text = captions[0]
    prompt = row.get("prompt") or CAPTION_PROMPT
    return _chat(system_prompt, [{"type": "image"}, _text(prompt)], text, [_column(row, "image")])


def expand_captions(batch: dict[str, list]) -> dict[str, list]:
    """For a batched `datasets.map`: one row per caption of each `captions` list, other columns repeated."""
    out: dict[str, list] = {key: [] for key in batch}
    for i in range(len(next(iter(batch.values())))):
        captions = batch["captions"][i] if "captions" in batch else None
        texts = captions if captions else [batch["caption"][i] if "caption" in batch else None]
        for text in texts:
            for key in batch:
                out[key].append(batch[key][i])
            if "caption" in out:
                out["caption"][-1] = text
            if "captions" in out:
                out["captions"][-1] = [text] if text is not None else captions
    return out


def llava(row: dict, system_prompt: str | None) -> dict:
    """LLaVA / ShareGPT: `image` (a path, a list of paths, or none) and `conversations` of `{from, value}` turns.

    Each `<image>` placeholder becomes an image part where it stands; rows without placeholders get their images at
    the start of the first user turn, as LLaVA does.
    """
    images = row.get("image")
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    messages = []
    for turn in _column(row, "conversations"):
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise RowError("unknown role", f"conversation turn from '{turn.get('from')}' (expected one of "
                                           f"{', '.join(ROLES)})")
        messages.append({"role": role, "content": _placeholder_parts(str(turn.get("value", "")))})
    placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
    if placeholders and placeholders != len(images):
        raise RowError("placeholders != images", f"the row has {placeholders} {IMAGE_PLACEHOLDER} placeholders "
                                                 f"but {len(images)} images")
    if not placeholders and images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowError("no user turn", "the row has images but no user turn to put them in")
        first_user["content"][:0] = [{"type": "image"} for _ in images]
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = _system(system_prompt) + messages
    return {"messages": messages, "images": images, "videos": []}


def _placeholder_parts(value: str) -> list[dict]:
    """Text and image parts of a turn, each `<image>` where it stands.

    Whitespace is trimmed at the turn's ends and where an image sits on its own line (`<image>\\n...`: the line
    break is layout); a space around a mid-sentence image ("Compare <image> and <image>.") is part of the sentence
    and kept, as LLaVA's own tokenisation keeps it.
    """
    pieces = value.split(IMAGE_PLACEHOLDER)
    parts = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        lead = piece[:len(piece) - len(piece.lstrip())]
        trail = piece[len(piece.rstrip()):]
        if i == 0 or "\n" in lead:
            piece = piece.lstrip()
        if i == len(pieces) - 1 or "\n" in trail:
            piece = piece.rstrip()
        if piece.strip():
            parts.append(_text(piece))
    return parts


def cauldron(row: dict, system_prompt: str | None) -> dict:
    """HuggingFaceM4/the_cauldron: `images` (a list) and `texts` (a list of `{user, assistant}` turns)."""
    images = list(_column(row, "images"))
    messages = _system(system_prompt)
    for i, turn in enumerate(_column(row, "texts")):
        user = [{"type": "image"} for _ in images] if i == 0 else []
        messages.append({"role": "user", "content": user + [_text(turn["user"])]})
        messages.append({"role": "assistant", "content": [_text(turn["assistant"])]})
    return {"messages": messages, "images": images, "videos": []}


def messages(row: dict, system_prompt: str | None, placeholders_first: bool = False) -> dict:
    """Rows already in chat form (`messages` + `images`), as TRL and llava-instruct-mix style datasets use.
    `placeholders_first`: messages without image parts get the row's images at the start of the first user turn
    (TRL's conversational preference prompts often name no image part)."""
    out = []
    for m in _column(row, "messages"):
        if m.get("role") not in ("system", "user", "assistant"):
            raise RowError("unknown role", f"message role '{m.get('role')}' (expected system, user or assistant)")
        content = m["content"]
        parts = [_text(content)] if isinstance(content, str) else [_part(p) for p in content]
        out.append({"role": m["role"], "content": parts})
    images, videos = list(row.get("images") or []), list(row.get("videos") or [])
    if placeholders_first and images and not any(p["type"] == "image" for m in out for p in m["content"]):
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"][:0] = [{"type": "image"} for _ in images]
    for kind, refs in (("image", images), ("video", videos)):
        parts = sum(p["type"] == kind for m in out for p in m["content"])
        if parts != len(refs):
            raise RowError("placeholders != images", f"the messages have {parts} {kind} parts but the row has "
                                                     f"{len(refs)} {kind}s")
    if system_prompt and not (out and out[0]["role"] == "system"):
        out = _system(system_prompt) + out
    return {"messages": out, "images": images, "videos": videos}


def _part(part: dict) -> dict:
    # Arrow stores every part with the union of keys, so image parts arrive as {"type": "image", "text": None}.
    if part.get("type") in ("image", "video"):
        return {"type": part["type"]}
    if part.get("type") == "text":
        return _text(part.get("text") or "")
    if part.get("type") in ("audio", "input_audio"):
        # Gemma 3n / Gemma 4 take audio, but finetune trains image-text data: its audio tower stays frozen
        raise RowError("audio", "an audio part: finetune trains image and video with text; audio is not supported")
    raise RowError("unknown part", f"message part of type '{part.get('type')}' (expected image, video or text)")


def video(row: dict, system_prompt: str | None) -> dict:
    """Video QA: `video` (a file) or `frames` (image files in temporal order), `question` (or `prompt`), `answer`."""
    clip = row.get("video") or (list(row["frames"]) if row.get("frames") else None)
    if clip is None:
        raise RowError("missing column", f"no value in column 'video' or 'frames' (the row has "
                                         f"{', '.join(sorted(row))})")
    question = row.get("question") or _column(row, "prompt")
    return _chat(system_prompt, [{"type": "video"}, _text(question)], _column(row, "answer"), [], [clip])


def preference(row: dict, system_prompt: str | None) -> dict:
    """Preference pairs (DPO): `image` or `images`, `prompt` (a question, or TRL's conversational prompt: a list of
    messages) or `messages`, and `chosen` / `rejected` replies (strings, or TRL's one-assistant-message lists).
    RLAIF-V maps with `data.columns: {prompt: question}`.

    The chat row's `messages` are the prompt (ending with a user turn); `chosen` and `rejected` are the two reply
    texts, which finetune.training.dpo appends as the assistant turn."""
    images = row.get("images")
    if images is None and row.get("image") is not None:
        images = [row["image"]]
    images = list(images or [])
    prompt = row.get("prompt")
    if prompt is None:
        prompt = _column(row, "messages")
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": [{"type": "image"} for _ in images] + [_text(prompt)]}]
    else:
        msgs = messages({"messages": prompt, "images": images}, None, placeholders_first=True)["messages"]
    if not msgs or msgs[-1]["role"] != "user":
        raise RowError("prompt does not end with a user turn", "the prompt's last message must be the user's")
    if system_prompt and msgs[0]["role"] != "system":
        msgs = _system(system_prompt) + msgs
    return {"messages": msgs, "images": images, "videos": [],
            "chosen": _reply(row, "chosen"), "rejected": _reply(row, "rejected")}


def _reply(row: dict, column: str) -> str:
    value = _column(row, column)
    if isinstance(value, list):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise RowError(f"malformed {column}", f"column '{column}' must be a reply text or one assistant message")
        content = value[0].get("content")
        value = content if isinstance(content, str) else "".join(
            p.get("text") or "" for p in content if p.get("type") == "text")
    text = str(value).strip()
    if not text:
        raise RowError(f"empty {column}", f"column '{column}' is empty")
    return text


FORMATS: dict[str, Callable[[dict, str | None], dict]] = {
    "chartqa": chartqa,
    "vqa": vqa,
    "caption": caption,
    "llava": llava,
    "cauldron": cauldron,
    "messages": messages,
    "video": video,
    "preference": preference,
}

#: The columns each format reads; `data.columns` maps these names to a dataset's own.
COLUMNS: dict[str, tuple[str, ...]] = {
    "chartqa": ("image", "query", "label"),
    "vqa": ("image", "question", "answers", "multiple_choice_answer"),
    "caption": ("image", "caption", "captions", "prompt"),
    "llava": ("image", "conversations"),
    "cauldron": ("images", "texts"),
    "messages": ("messages", "images", "videos"),
    "video": ("video", "frames", "question", "prompt", "answer"),
    "preference": ("image", "images", "prompt", "messages", "chosen", "rejected"),
}
