"""Chat templates as training and inference render them: how a template treats messages (probed once per template),
the rendered text of a conversation, and the character span of every assistant reply in it.

`render_with_spans` is where labels start: the template is rendered for the conversation, and for each assistant
turn also for the conversation up to that turn with the generation prompt; the difference is the reply, as
characters of the rendered text. A template whose renderings are not prefixes of each other is refused rather than
guessed at. Two documented adaptations, applied identically in training and inference (`prepare_messages`):
- a template that closes a reply with no end-of-turn token (llava-hf's LLaVA-1.5) gets the tokenizer's EOS appended
  to each reply, so the model learns to stop and `generate` stops there;
- template variables in `Family.template_kwargs` (Llama 3.2 Vision's date) are pinned.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.families import Family


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
