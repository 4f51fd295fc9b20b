"""`finetune export-gguf`: a run (or merged export) as GGUF files for llama.cpp, Ollama or LM Studio, checked.

    out = finetune.export_gguf("runs/tiny-chartqa", outtypes=["f16", "q4_k_m"])   # -> runs/tiny-chartqa/gguf

Writes `model-<outtype>.gguf` per outtype (the language model), `mmproj-<type>.gguf` (vision encoder and
projector, f16 unless asked), `chat_template.jinja`, `gguf.json` (files, image-token limits, stop tokens, checks)
and a README.md with the llama.cpp command and the parity table. A run folder is merged first (`finetune merge`,
parity-checked) unless it already holds one.

Two checks refuse the export (the files stay, the report says why):
1. Tokenizer parity: llama.cpp and transformers tokenise a few thousand strings (special tokens of the chat
   template, numbers, unicode, the run's own data and rendered prompts) identically; the first difference is named.
2. Answer parity, per outtype: greedy answers of llama.cpp and the merged model on held-out rows of the run's eval
   split, with the images at the trained resolution (llama.cpp is told the image-token limits): every row's image
   takes the same number of tokens (a wrong resolution fails here), and answers agree on at least `min_agreement`
   of the rows. The first-token log-probability difference is reported beside.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ..batching.encoding import tokenizer_kwargs
from ..batching.template import render
from ..evaluation.inference import load_target, prompt_batch, prompt_messages, stop_token_ids
from ..models.families import family_for, image_token_id
from ..models.loading import load_family
from ..recipe import load_recipe
from .gguf_card import render_readme
from .gguf_strings import tokenizer_strings
from .llama_cpp import CONVERTED, OUTTYPES, QUANTIZED, Runtime, convert, converter, quantize, runtime
from .merging import ExportError, ParityError, claim_folder, merge, parity_rows

#: Answer agreement an outtype must reach: 8 bits and more keep greedy answers; 4-6-bit quants may flip close calls.
MIN_AGREEMENT = {**{t: 0.9 for t in CONVERTED}, **{t: 0.7 for t in QUANTIZED}}
SOURCE_TYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # lossless converter outtype per dtype


def export_gguf(target: str | Path, outtypes=("f16",), out: str | Path | None = None, mmproj_outtype: str = "f16",
                samples: int = 20, min_agreement: float | None = None, image_tokens: tuple[int, int] | None = None,
                parity: bool = True, max_new_tokens: int = 16, overwrite: bool = False) -> Path:
    """Convert a run or merged export to GGUF (`outtypes` of llama_cpp.OUTTYPES) in `out` (default TARGET/gguf)."""
    target = Path(target)
    folder, recipe = _merged_folder(target)
    family = (family_for(json.loads((folder / "config.json").read_text())["model_type"]) if folder
              else load_family(recipe.model)[1])
    if family.no_gguf:
        raise ExportError(f"{family.name}: no GGUF export: {family.no_gguf}")
    outtypes = list(dict.fromkeys(outtypes))
    unknown = [t for t in outtypes if t not in OUTTYPES]
    if unknown or not outtypes:
        raise ExportError(f"outtype: unknown '{unknown[0] if unknown else ''}'; choose from {', '.join(OUTTYPES)}")
    if mmproj_outtype not in CONVERTED:
        raise ExportError(f"mmproj outtype: unknown '{mmproj_outtype}'; choose from {', '.join(CONVERTED)}")
    runtime(), converter()  # what is missing is said before a merge
    if folder is None:
        folder = merge(target)
    out = Path(out) if out else target / "gguf"
    claim_folder(out, folder, overwrite)

    dtype = json.loads((folder / "config.json").read_text()).get("dtype") or "float32"
    source_type = SOURCE_TYPE.get(dtype, "f32")
    # An export already in the published layout (finetune merge writes it) is converted as it is; an older one
    # is renamed and transposed on the way into the converter.
    published = json.loads((folder / "parity.json").read_text()).get("layout") == "published" \
        if (folder / "parity.json").is_file() else False
    options = dict(pre_tokenizer=_zoo_pre_tokenizer(recipe), text_architecture=family.gguf_text_architecture,
                   renames=() if published else family.hub_renames,
                   transposed=() if published else family.hub_transposed)
    print(f"[finetune] converting {folder} to GGUF ({', '.join(outtypes)}; mmproj {mmproj_outtype}) in {out}")
    files = {t: convert(folder, out / f"model-{t}.gguf", t, **options) for t in outtypes if t in CONVERTED}
    quants = [t for t in outtypes if t in QUANTIZED]
    if quants:  # from a lossless conversion: a requested one, or a temporary one converted once for all quants
        source = files.get(source_type) or convert(folder, out / f".model-{source_type}.gguf", source_type, **options)
        files.update({t: quantize(source, out / f"model-{t}.gguf", t) for t in quants})
        if source.name.startswith("."):
            source.unlink()
    files = {t: files[t] for t in outtypes}  # in the order asked: the first is the tokenizer check's
    mmproj = convert(folder, out / f"mmproj-{mmproj_outtype}.gguf", mmproj_outtype, mmproj=True, **options)

    hf = load_target(folder, recipe)
    limits = image_tokens or image_token_limits(family, hf.processor, recipe)
    report = {"source": str(folder), "family": family.name, "files": {t: p.name for t, p in files.items()},
              "mmproj": mmproj.name, "image_tokens": dict(zip(("min", "max"), limits)) if limits else None,
              "stop_tokens": [hf.processor.tokenizer.convert_ids_to_tokens(i)
                              for i in stop_token_ids(hf.model, hf.processor, family)],
              "llama_cpp_python": runtime().__version__}
    (out / "chat_template.jinja").write_text(hf.processor.chat_template or "", encoding="utf-8")
    failures = []
    if parity:
        rows = parity_rows(recipe, samples)
        report["tokenizer"] = check_tokenizer(files[outtypes[0]], hf.processor, family, recipe, rows)
        if not report["tokenizer"]["passed"]:
            failures.append(report["tokenizer"]["verdict"])
        reference = hf_answers(hf, rows, max_new_tokens)
        report["answers"] = {}
        for outtype, path in files.items():
            result = answer_parity(path, mmproj, hf, rows, reference, limits, max_new_tokens,
                                   min_agreement if min_agreement is not None else MIN_AGREEMENT[outtype])
            report["answers"][outtype] = result
            print(f"[finetune] {outtype}: {result['verdict']}")
            if not result["passed"]:
                failures.append(f"{outtype}: {result['verdict']}")
    report["checked"], report["passed"] = parity, not failures
    (out / "gguf.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(render_readme(report, recipe), encoding="utf-8")
    if failures:
        raise ParityError(f"GGUF export in {out} failed its checks: " + "; ".join(failures))
    print(f"[finetune] GGUF files in {out} (run them as its README.md shows)")
    return out


def image_token_limits(family, processor, recipe) -> tuple[int, int] | None:
    """The image-token range the processor allows, for llama.cpp's `--image-min-tokens/--image-max-tokens`."""
    if family.gguf_image_tokens != "pixels":
        return None
    images = processor.image_processor
    size = getattr(images, "size", None) or {}
    low = size.get("shortest_edge") or getattr(images, "min_pixels", None)
    high = size.get("longest_edge") or getattr(images, "max_pixels", None)
    if recipe.data.max_pixels:  # finetune downscales every image to this before the processor sees it
        high = min(high, recipe.data.max_pixels)
    area = (images.patch_size * images.merge_size) ** 2
    return max(1, low // area), max(1, high // area)


def check_tokenizer(model: Path, processor, family, recipe, rows: list[dict]) -> dict:
    """llama.cpp's tokenizer (from the GGUF) against the processor's on `tokenizer_strings`."""
    strings = tokenizer_strings(processor, family, recipe, rows)
    runtime_ = Runtime(model, n_ctx=256)
    try:
        tokenizer = processor.tokenizer
        for text in strings:
            expected, got = tokenizer.encode(text, add_special_tokens=False), runtime_.tokenize(text)
            if expected != got:
                return {"strings": len(strings), "passed": False,
                        "verdict": f"llama.cpp tokenises {text[:80]!r} as {got[:12]} where transformers gives "
                                   f"{expected[:12]}: the GGUF would read text differently from training"}
    finally:
        runtime_.close()
    return {"strings": len(strings), "passed": True,
            "verdict": f"{len(strings)} strings tokenised identically by llama.cpp and transformers"}


@torch.no_grad()
def hf_answers(hf, rows: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy answers of the merged model, one row at a time (no padding): tokens, first log-prob, image tokens."""
    image_token = image_token_id(hf.model.config)
    stops = stop_token_ids(hf.model, hf.processor, hf.family)
    answers = []
    for row in rows:
        batch = prompt_batch(hf.processor, hf.family, [prompt_messages(row["messages"])], [row["images"]])
        batch = batch.to(hf.model.device)
        output = hf.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                   pad_token_id=hf.processor.tokenizer.pad_token_id, output_logits=True,
                                   return_dict_in_generate=True)
        new = output.sequences[0, batch["input_ids"].shape[1]:].tolist()
        tokens = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        first = torch.log_softmax(output.logits[0][0].float(), -1)[new[0]].item()
        answers.append({"tokens": tokens, "first_logprob": first,
                        "image_tokens": int((batch["input_ids"] == image_token).sum())})
    return answers


def answer_parity(model: Path, mmproj: Path, hf, rows, reference, limits, max_new_tokens, min_agreement) -> dict:
    """llama.cpp's greedy answers on the same prompts and images against the merged model's."""
    runtime_ = Runtime(model, mmproj, limits)
    try:
        if (runtime_.chat_template or "") != (hf.processor.chat_template or ""):
            return {"passed": False, "verdict": "the GGUF's chat template differs from the one the run trained with"}
        rows_out = []
        for row, ref in zip(rows, reference):
            messages = [{**m, "content": [{"type": "text", "text": runtime_.marker} if p.get("type") == "image"
                                          else p for p in m["content"]]} if isinstance(m["content"], list) else m
                        for m in prompt_messages(row["messages"])]
            prompt = render(hf.processor, messages, hf.family, generation_prompt=True)
            # BOS as finetune's encoding adds it: not where the template already wrote it
            add_bos = tokenizer_kwargs(hf.processor, [prompt]).get("add_special_tokens", True)
            got = runtime_.answer(prompt, [_png(image) for image in row["images"]], max_new_tokens, add_bos)
            rows_out.append({"row_id": row["row_id"], "merged": hf.processor.tokenizer.decode(ref["tokens"]).strip(),
                             "gguf": got.text, "agree": got.tokens == ref["tokens"],
                             "image_tokens": [ref["image_tokens"], got.image_tokens],
                             "first_logprob_diff": abs(got.first_logprob - ref["first_logprob"])})
    finally:
        runtime_.close()
    agree = sum(r["agree"] for r in rows_out)
    resized = [r for r in rows_out if r["image_tokens"][0] != r["image_tokens"][1]]
    result = {"rows": rows_out, "agreement": agree / len(rows_out), "min_agreement": min_agreement,
              "first_logprob_diff_max": max(r["first_logprob_diff"] for r in rows_out),
              "image_tokens_equal": not resized}
    if resized:
        r = resized[0]
        result["verdict"] = (f"row {r['row_id']}: the image takes {r['image_tokens'][1]} tokens in llama.cpp and "
                             f"{r['image_tokens'][0]} as trained (image-token limits {limits}): llama.cpp would see "
                             f"the images at another resolution")
    else:
        result["verdict"] = (f"{agree}/{len(rows_out)} greedy answers agree (at least {min_agreement:.0%} needed), "
                             f"max first-token log-prob difference {result['first_logprob_diff_max']:.3g}")
    result["passed"] = not resized and result["agreement"] >= min_agreement
    return result


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _merged_folder(target: Path):
    """(merged folder or None when a run must be merged first, recipe)."""
    if not (target / "recipe.yaml").is_file():
        raise ExportError(f"{target}: not a training run or merged export (no recipe.yaml)")
    recipe = load_recipe(target / "recipe.yaml")
    if (target / "config.json").is_file():
        return target, recipe
    if not (target / "adapter_config.json").is_file():
        raise ExportError(f"{target}: neither a merged export (config.json) nor a run folder (adapter_config.json)")
    merged = target / "merged"
    return (merged if (merged / "config.json").is_file() else None), recipe


def _zoo_pre_tokenizer(recipe) -> str | None:
    if not recipe.model.name_or_path.startswith("zoo:"):
        return None  # a real tokenizer: the converter knows it, or the export is refused
    from ..models.zoo import GGUF_PRE_TOKENIZER

    return GGUF_PRE_TOKENIZER

