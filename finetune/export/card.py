"""The model card (README.md with YAML front-matter) for an adapter run folder or a merged export.

Everything comes from files in the folder: recipe.yaml, run_summary.json, eval/metrics.json and, for an export,
parity.json and config.json. `base_model` is a hub id or absent (zoo models and local folders are not on the Hub);
no filesystem path is ever written, and nothing here reads or writes a token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ..evaluation.conversation import recipe_system_prompt
from ..models.families import FAMILIES
from ..models.lora import group_of
from ..models.zoo import HubFiles, parse_name
from ..recipe import HUB_ID, load_recipe, method_of

#: vLLM (like TGI and SGLang) applies LoRA adapters to the language model only, unless told otherwise.
SERVING_NOTE = ("vLLM's LoRA path applies adapters to the language model only and drops these unless started "
                "with --enable-tower-connector-lora (`finetune serve --adapter` sets it); the merged export "
                "(`finetune merge`, `finetune serve`) has no such limit")
#: Placeholder for the repo id in a card rendered before the export is pushed anywhere.
REPO_PLACEHOLDER = "<your-namespace>/<repo-name>"


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it is a Hub id (`org/name`), None for zoo models and local files or folders."""
    if not name_or_path or name_or_path.startswith("zoo:") or Path(name_or_path).expanduser().exists():
        return None
    return name_or_path if HUB_ID.match(name_or_path) else None


def family_key(folder: Path, recipe, summary: dict) -> str | None:
    """The model type (`qwen2_vl`, ...) from config.json, the zoo name, or the family name in run_summary.json."""
    config = folder / "config.json"
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if recipe.model.name_or_path.startswith("zoo:"):
        family, folder, _ = parse_name(recipe.model.name_or_path)
        return family or HubFiles(folder).family
    return next((k for k, f in FAMILIES.items() if f.name == summary.get("family")), None)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def render_card(folder: str | Path, kind: str, repo_id: str | None = None) -> str:
    """README.md for `folder`: kind "adapter" (a run folder) or "merged" (a `finetune merge` export)."""
    folder = Path(folder)
    recipe = load_recipe(folder / "recipe.yaml")
    summary = _json(folder / "run_summary.json")
    metrics = _json(folder / "eval" / "metrics.json")
    parity = _json(folder / "parity.json") if kind == "merged" else {}
    family = family_key(folder, recipe, summary)
    qlora = recipe.quantization.load_in_4bit
    base = hub_id(recipe.model.name_or_path)
    dataset = hub_id(recipe.data.path)
    repo = repo_id or REPO_PLACEHOLDER

    meta: dict = {}
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if kind == "adapter" else "finetune"
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["pipeline_tag"] = "image-text-to-text"
    meta["tags"] = [t for t in ("finetune", "qlora" if qlora else "lora", family, "vision-language",
                                "merged" if kind == "merged" else None) if t]
    if dataset:
        meta["datasets"] = [dataset]
    front = yaml.safe_dump(meta, sort_keys=False).strip()

    if base:
        base_text = f"[`{base}`](https://huggingface.co/{base})"
    elif recipe.model.name_or_path.startswith("zoo:"):
        base_text = (f"`{recipe.model.name_or_path}`, a tiny randomly initialised model built locally by "
                     "`finetune.zoo` (not on the Hub)")
    else:
        base_text = "a local checkpoint (not on the Hub)"
    data_text = f"[`{dataset}`](https://huggingface.co/datasets/{dataset})" if dataset else \
        f"a local dataset `{Path(recipe.data.path).name}`"
    method = "QLoRA" if qlora else "LoRA"
    what = (f"A {method} adapter for {base_text}" if kind == "adapter" else
            f"A {method} fine-tune of {base_text}, with the adapter merged into the weights "
            f"({parity.get('merge', {}).get('dtype', 'full precision')})")
    title = repo_id.split("/")[-1] if repo_id else f"{FAMILIES[family].name if family in FAMILIES else 'VLM'} {method}"

    parts = [f"---\n{front}\n---\n", f"# {title}\n",
             f"{what}, trained with finetune on {data_text} "
             f"(format `{recipe.data.format}`, split `{recipe.data.train_split}`).\n"]
    parts.append(_training_table(recipe, summary))
    parts.append(_results(summary, metrics))
    if kind == "merged":
        parts.append(_merge_section(parity, qlora))
    if kind == "adapter" and (warnings := adapter_serving_warnings(folder)):
        parts.append("## Serving\n\n" + "\n".join(f"- Note: {w}." for w in warnings) + "\n")
    elif kind == "merged":
        parts.append(_serving(repo, parity, recipe))
    prompt = recipe_system_prompt(recipe)
    parts.append(_quick_start(kind, repo, base, recipe, family, prompt))
    return "\n".join(parts)


def adapted_modules(run_dir: Path) -> list[str]:
    """Full paths of the modules (and raw parameters) the adapter holds LoRA weights for, read off its safetensors
    keys: adapter_config.json's `target_modules` may be shortened by peft to suffixes (`mlp.0`) no group can place."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    names = {re.sub(r"^base_model\.model\.", "", key).partition(".lora_")[0] for key in keys if ".lora_" in key}
    return sorted(names)


def serving_warnings(run_dir: Path, family) -> list[str]:
    """One line per adapter group outside the language model (projector, vision tower)."""
    groups = sorted({g for g in (group_of(n, family) or group_of(n.rpartition(".")[0], family)
                                 for n in adapted_modules(run_dir)) if g in ("projector", "vision")})
    return [f"the adapter trains the {g} ({family.name}); {SERVING_NOTE}" for g in groups]


def adapter_serving_warnings(folder: str | Path) -> list[str]:
    """`serving_warnings` for an adapter run folder, its family read from the folder's own files."""
    folder = Path(folder)
    key = family_key(folder, load_recipe(folder / "recipe.yaml"), _json(folder / "run_summary.json"))
    return serving_warnings(folder, FAMILIES[key]) if key in FAMILIES else []


def _training_table(recipe, summary: dict) -> str:
    t, lora, q, method = recipe.training, recipe.lora, recipe.quantization, method_of(recipe.training)
    rows = [
        ("LoRA rank / alpha / dropout", f"{lora.r} / {lora.alpha} / {lora.dropout}"),
        ("LoRA targets", ", ".join(lora.targets) if lora.target_modules is None else f"`{lora.target_modules}`"),
        ("adapted modules per group", ", ".join(f"{g} {n}" for g, n in (summary.get("lora_modules") or {}).items()
                                                if n) or "-"),
        ("adapted raw parameters", ", ".join(f"`{p}`" for p in summary.get("lora_parameters") or []) or "-"),
        ("4-bit base (QLoRA)", f"{q.quant_type}, double quant {q.double_quant}" if q.load_in_4bit else "no"),
        ("learning rate / scheduler", f"{t.learning_rate} / {t.lr_scheduler_type}"),
        ("batch size x grad. accumulation", f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps}"),
        ("steps / epochs", f"{summary.get('steps', t.max_steps)} / {_round(summary.get('epochs'))}"),
        ("max length (tokens, images included)", getattr(t, "max_length", None) or "-"),
        *(method.card_settings(recipe) if method.card_settings else []),
        ("optimizer / weight decay / warmup", f"{t.optim} / {t.weight_decay} / {t.warmup_steps}"),
        ("seed", t.seed),
    ]
    return "## Training\n\n| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _round(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "-"


def _results(summary: dict, metrics: dict) -> str:
    lines = ["## Results\n"]
    if summary.get("first_loss") is not None:
        lines.append(f"Training loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} "
                     f"over {summary.get('steps')} steps.\n")
    if metrics.get("metric"):
        lines.append(f"Held-out split `{metrics.get('split')}`, {metrics.get('n')} samples, greedy decoding:\n")
        lines.append(f"| model | {metrics['metric']} |\n|---|---|")
        for key, label in (("base", "base model"), ("tuned", "fine-tuned"),
                           ("majority_answer", "majority answer (no image)"),
                           ("majority_per_question", "majority answer per question (no image)")):
            if isinstance(metrics.get(key), (int, float)):
                lines.append(f"| {label} | {metrics[key]:.3f} |")
        lines.append("")
    if isinstance(metrics.get("preference_accuracy"), dict):  # a DPO run (finetune.training.dpo.before_after)
        pref, gen = metrics["preference_accuracy"], metrics.get("generation") or {}
        lines.append(f"Preference tuning (DPO) from `{metrics.get('reference')}`; held-out split "
                     f"`{metrics.get('split')}`, {metrics.get('n')} pairs:\n")
        lines.append("| | before DPO | after DPO |\n|---|---|---|")
        lines.append(f"| preference accuracy (chosen likelier than rejected) | {pref['before']:.3f} | "
                     f"{pref['after']:.3f} |")
        if gen:
            lines.append(f"| generation {metrics.get('metric')} | {gen['before']:.3f} | {gen['after']:.3f} |")
        lines.append("")
    if len(lines) == 1:
        lines.append("No evaluation was recorded for this run.\n")
    return "\n".join(lines)


def _merge_section(parity: dict, qlora: bool) -> str:
    merge = parity.get("merge", {})
    lines = ["## Merge\n", f"Weights: `{merge.get('dtype')}`, adapter merged with peft `merge_and_unload`."]
    if qlora:
        lines.append("The adapter was trained on an NF4 (4-bit) base. " + (
            "It was merged onto the NF4-dequantized weights, the weights it was trained against."
            if merge.get("onto") == "dequantized" else
            "It was merged onto the original 16-bit base weights (not the NF4 weights it was trained against); "
            "the difference is the NF4 gap below."))
    if parity.get("checked"):
        c = parity["comparison"]
        lines.append(f"\nParity check ({'passed' if parity.get('passed') else 'FAILED'}), on {parity['samples']} "
                     f"samples of split `{parity['split']}`: {parity['reference']} vs {parity['candidate']}.\n")
        lines.append("| positions | max abs logit diff | mean KL | greedy generations identical |\n|---|---|---|---|")
        for name in ("text_positions", "supervised_positions"):
            s = c.get(name, {})
            if s.get("positions"):
                lines.append(f"| {name.split('_')[0]} ({s['positions']}) | {s['max_abs_diff']:.3g} | "
                             f"{s['kl_mean']:.3g} | {c['generation']['agree']}/{c['generation']['total']} |")
        gap = parity.get("nf4_gap", {}).get("comparison", {})
        if gap.get("inputs_equal"):
            lines.append(f"\nNF4 gap (NF4 base + adapter, as trained, vs this export): max abs logit diff "
                         f"{gap['text_positions']['max_abs_diff']:.3g}, mean KL {gap['text_positions']['kl_mean']:.3g}, "
                         f"greedy generations identical {gap['generation']['agree']}/{gap['generation']['total']}.")
    else:
        lines.append("\nNo parity check was run for this export.")
    return "\n".join(lines) + "\n"


def _serving(repo: str, parity: dict, recipe) -> str:
    """vLLM's command for this export: the dtype its parity check used, the trained length."""
    dtype = parity.get("merge", {}).get("dtype", "auto")
    length = getattr(recipe.training, "max_length", None)
    command = f"vllm serve {repo} --dtype {dtype}" + (f" --max-model-len {length}" if length else "")
    lines = ["## Serving\n", f"```bash\n{command}\n```\n",
             "The chat template's default system prompt is the one used in training, so a client that sends no "
             "system message gets the prompt the model was trained with; the generation config stops at the "
             "end-of-turn token training labelled."]
    if parity.get("serving_warnings"):
        lines.append(" The adapter also trained parts outside the language model (projector or vision tower), "
                     "which vLLM's LoRA path drops unless told otherwise; here they are merged into the weights, so "
                     "this checkpoint serves as a plain model.")
    return "".join(lines) + "\n"


def _quick_start(kind: str, repo: str, base: str | None, recipe, family: str | None, system: str | None) -> str:
    if recipe.model.name_or_path.startswith("zoo:"):
        zoo_family, folder, preset = parse_name(recipe.model.name_or_path)
        call = f"zoo.ensure({zoo_family!r}, {preset!r})" if folder is None else f"zoo.ensure_like({str(folder)!r}, {preset!r})"
        base_line = f"from finetune import zoo\nbase_id = {call}  # the tiny local base model"
    else:
        base_line = f"base_id = {(base or '<the base model this adapter was trained on>')!r}"
    messages = []
    if system:
        messages.append(f'    {{"role": "system", "content": [{{"type": "text", "text": {system!r}}}]}},')
    messages.append('    {"role": "user", "content": [{"type": "image", "image": image},\n'
                    '                              {"type": "text", "text": "What does this image show?"}]},')
    if kind == "adapter":
        load = (f"{base_line}\nrepo_id = {repo!r}\n\n"
                "processor = AutoProcessor.from_pretrained(repo_id)  # as trained: chat template, image settings\n"
                'model = AutoModelForImageTextToText.from_pretrained(base_id, dtype="auto", device_map="auto")\n'
                + ("# Trained on a 4-bit base: to run exactly as trained, also pass quantization_config=\n"
                   f"# BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={recipe.quantization.quant_type!r}, "
                   f"bnb_4bit_use_double_quant={recipe.quantization.double_quant}).\n"
                   if recipe.quantization.load_in_4bit else "")
                + "model = PeftModel.from_pretrained(model, repo_id).eval()\n")
        imports = "from peft import PeftModel\n"
    else:
        load = (f"repo_id = {repo!r}\n\n"
                "processor = AutoProcessor.from_pretrained(repo_id)\n"
                'model = AutoModelForImageTextToText.from_pretrained(repo_id, dtype="auto", device_map="auto").eval()\n')
        imports = ""
    code = (f"from PIL import Image\n{imports}from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f"{load}\n"
            'image = Image.open("image.png").convert("RGB")\n'
            "messages = [\n" + "\n".join(messages) + "\n]\n"
            "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,\n"
            + "".join(f"                                       {k}={v!r},  # as in training\n"
                      for k, v in (FAMILIES[family].template_kwargs if family in FAMILIES else ()))
            + '                                       return_dict=True, return_tensors="pt").to(model.device)\n'
            "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n"
            'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n')
    note = ("Image + text inference with the processor saved here (same chat template and image resolution as "
            "training)" + (", the system prompt used in training" if system else "") + ":")
    return f"## Quick start\n\n{note}\n\n```python\n{code}```\n"
