"""The README.md of a GGUF export: how to run the files in llama.cpp at the trained resolution, and its checks."""

from __future__ import annotations


def run_flags(report: dict) -> str:
    """llama.cpp options that reproduce the trained image resolution ("" where the family has a fixed count)."""
    limits = report.get("image_tokens")
    return f" --image-min-tokens {limits['min']} --image-max-tokens {limits['max']}" if limits else ""


def render_readme(report: dict, recipe) -> str:
    files = report["files"]
    model = files.get("q4_k_m") or next(iter(files.values()))
    flags = run_flags(report)
    system = recipe.data.system_prompt
    lines = [
        f"# GGUF export ({report['family']})",
        "",
        f"Converted by `finetune export-gguf` from `{report['source']}` with llama.cpp as vendored by "
        f"llama-cpp-python {report['llama_cpp_python']}.",
        "",
        "| file | what |",
        "|---|---|",
        *(f"| `{name}` | language model, {outtype} |" for outtype, name in files.items()),
        f"| `{report['mmproj']}` | vision encoder and projector (pass it with `--mmproj`) |",
        "| `chat_template.jinja` | the chat template the run trained with (also stored in every model file) |",
        "| `gguf.json` | image-token limits, stop tokens and the checks below, as data |",
        "",
        "## Run it",
        "",
        "```bash",
        f"llama-mtmd-cli -m {model} --mmproj {report['mmproj']}{flags} --jinja --temp 0 \\",
        "  --image chart.png -p 'Which color is the tallest bar?'",
        f"llama-server -m {model} --mmproj {report['mmproj']}{flags} --jinja   # OpenAI-compatible API",
        "```",
        "",
    ]
    if flags:
        lines += [f"The image-token limits ({flags.strip()}) are the range the processor allowed in training. "
                  "Without them llama.cpp lets an image take up to 4,096 tokens and the model sees it at a "
                  "resolution it never trained on (llama-cpp-python: `mtmd_context_params.image_min_tokens` and "
                  "`image_max_tokens`).", ""]
    if system:
        lines += ["The run trained with this system prompt; send it as the system message of every conversation "
                  "(llama-server: the first message with role `system`):", "", "```",
                  system, "```", ""]
    lines += [f"Generation stops at {', '.join(f'`{t}`' for t in report['stop_tokens'])} (llama.cpp reads the "
              "end-of-generation tokens from the file).", ""]
    lines += _checks(report)
    return "\n".join(lines) + "\n"


def _checks(report: dict) -> list[str]:
    if "answers" not in report:
        return ["## Checks", "", "Skipped (`--no-parity`).", ""]
    tokenizer = report["tokenizer"]
    lines = ["## Checks", "", f"Tokenizer: {tokenizer['verdict']}.", "",
             "Greedy answers of llama.cpp against the merged model (transformers, float32) on held-out rows of the "
             "run's eval split, images at the trained resolution:", "",
             "| file | answers agree | image tokens per row equal | max first-token log-prob difference | passed |",
             "|---|---|---|---|---|"]
    for outtype, result in report["answers"].items():
        if "rows" not in result:
            lines.append(f"| {outtype} | {result['verdict']} | | | no |")
            continue
        agree = sum(r["agree"] for r in result["rows"])
        lines.append(f"| {report['files'][outtype]} | {agree}/{len(result['rows'])} | "
                     f"{'yes' if result['image_tokens_equal'] else 'no'} | {result['first_logprob_diff_max']:.3g} | "
                     f"{'yes' if result['passed'] else 'NO: ' + result['verdict']} |")
    return lines + [""]
