"""The `finetune` command. Every subcommand is declared once, in COMMANDS: its help, its arguments and the function
it calls. Each argument's argparse `dest` is the keyword that function takes, so the call is derived, never
written out; where the command line is not 1:1 with one function, a small adapter here says how.

Functions are named "module:function" and imported only when their command runs: `finetune --help` imports no torch.
Plain argparse underneath: TRL's own CLI is argparse subparsers too, and its per-command TrlParser (transformers'
HfArgumentParser over dataclasses) would cost a transformers import on every `--help` and a dataclass per command
that restates the signature of the function it calls.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

EPILOG = """\
recipes are YAML files with sections model, data, lora, quantization, training (trl.SFTConfig keys) and export.
override any key from the command line:
  finetune train recipes/tiny-chartqa.yaml training.max_steps=20

examples:
  finetune train recipes/tiny-chartqa.yaml
  accelerate launch -m finetune train recipes/qwen2_5-vl-7b-qlora.yaml
  finetune check recipes/tiny-chartqa.yaml --show-labels 2
  finetune merge runs/tiny-chartqa --dtype float32
  finetune export-gguf runs/tiny-chartqa --outtype f16 --outtype q4_k_m
  finetune serve runs/tiny-chartqa --check 20
  finetune push runs/tiny-chartqa --repo alice/tiny-chartqa --private
"""
TARGET = "run folder, merged export folder, model folder, hub id or zoo:<family>"


class UsageError(Exception):
    """A combination of arguments argparse cannot refuse by itself; exits 2 like argparse's own errors."""


class Arg:
    """One `add_argument` call: a name ("recipe", "--show-labels") and argparse's options, as argparse takes them."""

    def __init__(self, name: str, help: str | None = None, **options: Any):
        self.name, self.help, self.options = name, help, options
        #: The keyword of the command's function that receives the value (argparse's dest).
        self.dest = options.get("dest", name.lstrip("-").replace("-", "_"))


@dataclass(frozen=True)
class Command:
    name: str
    function: str  # "module:function", imported when the command runs
    help: str  # one line, in `finetune --help`
    description: str  # prose, wrapped to the terminal
    epilog: str = ""  # indented lines (example commands) are kept as written
    args: tuple[Arg, ...] = ()
    #: Called as adapter(function, **arguments) instead of function(**arguments), where they are not 1:1.
    adapter: Callable[..., Any] | None = None
    prints: bool = False  # print what the function returns (a folder, an answer, a URL)

    def load(self) -> Callable[..., Any]:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)

    def run(self, args: argparse.Namespace) -> Any:
        arguments = {a.dest: getattr(args, a.dest) for a in self.args}
        if self.adapter:
            return self.adapter(self.load(), **arguments)
        return self.load()(**arguments)


def answer_prompt_or_file(predict, target, prompt, images, max_new_tokens, data, out):
    """`--data` answers every row of a file (predict_file) instead of one `--prompt` (predict)."""
    if data:
        from .evaluation.conversation import predict_file

        return predict_file(target, data, out or f"{data}.predictions.jsonl", max_new_tokens)
    if not prompt:
        raise UsageError("predict needs --prompt (with --image) or --data")
    return predict(target, prompt, images, max_new_tokens)


def convert_or_setup(export_gguf, target, outtypes, setup, sdist, **options):
    """`--setup` installs llama.cpp's converter instead of converting; `--outtype` is f16 unless repeated."""
    if setup:
        from .export.llama_cpp import install_converter

        return install_converter(sdist)
    if not target:
        raise UsageError("export-gguf needs a run or merged export folder (or --setup)")
    return export_gguf(target, outtypes=outtypes or ["f16"], **options)


def token_range(value: str) -> tuple[int, int]:
    low, _, high = value.partition(":")
    if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 0 < MIN <= MAX, got {value!r}")
    return int(low), int(high)


COMMANDS = (
    Command(
        "train", "finetune.training.pipeline:train", "fine-tune a model as a recipe says",
        "Fine-tune a model as a recipe says. Writes the adapter, processor, resolved recipe, run_summary.json and "
        "loss_curve.png to training.output_dir (default runs/<recipe name>).",
        "example:\n  finetune train recipes/tiny-chartqa.yaml training.learning_rate=1e-4",
        (Arg("recipe", "path to a recipe YAML file"),
         Arg("overrides", "recipe overrides, e.g. lora.r=8", nargs="*", metavar="KEY=VALUE"),
         Arg("--overwrite", "replace an existing, non-empty output folder", action="store_true")),
        prints=True),
    Command(
        "check", "finetune.training.preflight:check", "validate a recipe and scan its data without training",
        "Validate a recipe, then scan its data exactly as training would: token lengths after image expansion, "
        "samples that would be dropped and why.",
        "example:\n  finetune check recipes/tiny-chartqa.yaml --show-labels 2",
        (Arg("recipe", "path to a recipe YAML file"),
         Arg("overrides", "recipe overrides, e.g. data.max_samples=10", nargs="*", metavar="KEY=VALUE"),
         Arg("--show-labels", "print N collated samples with the loss-carrying tokens marked [[like this]]",
             type=int, default=0, metavar="N"),
         Arg("--no-data", "validate the recipe only; do not load the processor or data",
             action="store_false", dest="data"),
         Arg("--accelerate-config", "also check the recipe against this accelerate config (strategy, mixed "
             "precision, 4-bit storage), as `accelerate launch --config_file PATH` would run it", metavar="PATH"))),
    Command(
        "eval", "finetune.evaluation.heldout:evaluate", "score a run, merged export or base model on held-out data",
        "Greedy generation on a split, scored per task (ChartQA relaxed accuracy, exact match, ANLS, VQA accuracy). "
        "Writes predictions.jsonl and metrics.json.",
        "example:\n  finetune eval runs/tiny-chartqa --split test --limit 50",
        (Arg("target", TARGET),
         Arg("--split", "split to evaluate (default: the recipe's data.eval_split)"),
         Arg("--limit", "evaluate only the first N samples", type=int),
         Arg("--metric", "relaxed_accuracy, exact_match, anls or vqa_accuracy"),
         Arg("--recipe", "recipe giving the data, for targets without a recipe.yaml"),
         Arg("--out", "folder for predictions.jsonl and metrics.json (default: TARGET/eval)",
             dest="out_dir", metavar="OUT"),
         Arg("--batch-size", type=int, default=8))),
    Command(
        "predict", "finetune.evaluation.conversation:predict",
        "answer a prompt about an image, or every row of a JSONL file",
        "Answer with the same chat template, system prompt and image settings as training.",
        "examples:\n  finetune predict runs/tiny-chartqa --image chart.png --prompt 'Which color is the tallest bar?'\n"
        "  finetune predict runs/tiny-chartqa --data questions.jsonl --out answers.jsonl"
        "   # rows: {\"prompt\": ..., \"images\": [...]}",
        (Arg("target", TARGET),
         Arg("--image", "image path (repeat for several images)", action="append", default=[],
             dest="images", metavar="IMAGE"),
         Arg("--prompt", "the question"),
         Arg("--data", "JSONL file of {prompt, images} rows to answer instead"),
         Arg("--out", "where --data answers go (default: <data>.predictions.jsonl)"),
         Arg("--max-new-tokens", type=int, default=32)),
        adapter=answer_prompt_or_file, prints=True),
    Command(
        "chat", "finetune.evaluation.conversation:chat", "interactive multi-turn chat with images by path",
        "Type a message and press enter. /image PATH attaches an image to your next message, /reset starts over, "
        "/exit (or end of input) quits.",
        args=(Arg("target", TARGET), Arg("--max-new-tokens", type=int, default=64))),
    Command(
        "merge", "finetune.export.merging:merge", "merge a run's adapter into its base model and check parity",
        "Reload the base model in full precision, merge the LoRA adapter, and save safetensors weights with the "
        "processor, chat template, generation config, recipe and a model card. Then reload the export and compare "
        "it with base + adapter on samples of the run's eval data (logits, KL, greedy generations): parity.json; "
        "exits 1 above the tolerance. QLoRA runs merge onto the original 16-bit weights unless --onto-dequantized.",
        "examples:\n  finetune merge runs/tiny-chartqa --dtype float32\n"
        "  finetune merge runs/qwen-qlora --onto-dequantized --out exports/qwen-merged",
        (Arg("run_dir", "training run folder (adapter + recipe.yaml)"),
         Arg("--out", "export folder (default: RUN_DIR/merged)"),
         Arg("--dtype", "weight dtype of the export (default: the recipe's export.merge_dtype; auto = as the base "
             "checkpoint is stored)", choices=["float32", "bfloat16", "float16"]),
         Arg("--onto-dequantized", "QLoRA runs: merge onto the NF4-dequantized weights the adapter was trained "
             "against", action="store_const", const="dequantized", default="original", dest="onto"),
         Arg("--no-parity", "skip the parity check", action="store_false", dest="parity"),
         Arg("--tolerance", "max |logit difference| allowed (default: 1e-4 float32, 0.25 float16, 1.0 bfloat16)",
             type=float),
         Arg("--samples", "eval samples the parity check uses (default 4)", type=int, default=4),
         Arg("--device", "device for the parity forward passes (default cpu)", default="cpu"),
         Arg("--overwrite", "replace an existing, non-empty export folder", action="store_true"))),
    Command(
        "export-gguf", "finetune.export.gguf:export_gguf",
        "convert a run or merged export to GGUF for llama.cpp, and check it",
        "Merge (if needed) and convert to GGUF with llama.cpp's own converter: the language model per --outtype "
        "and the vision encoder + projector (mmproj). Then check it: llama.cpp's tokenizer against transformers' "
        "on a few thousand strings, and llama.cpp's greedy answers against the merged model's on held-out rows at "
        "the trained image resolution. Writes the files, gguf.json and a README with the llama.cpp command to "
        "TARGET/gguf; exits 1 when a check fails. Needs `pip install 'finetune[gguf]'` and, once, "
        "`finetune export-gguf --setup`.",
        "examples:\n  finetune export-gguf --setup\n"
        "  finetune export-gguf runs/tiny-chartqa --outtype f16 --outtype q4_k_m",
        (Arg("target", "training run folder or merged export folder", nargs="?"),
         Arg("--outtype", "f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k or q4_0; repeat for several (default f16)",
             action="append", dest="outtypes", metavar="TYPE"),
         Arg("--out", "folder for the GGUF files (default: TARGET/gguf)"),
         Arg("--mmproj-outtype", "the vision file's type: f32, f16, bf16 or q8_0", default="f16"),
         Arg("--samples", "held-out rows the answer check uses (default 20)", type=int, default=20),
         Arg("--min-agreement", "share of answers that must agree (default 0.9 for 8 bits and up, 0.7 below)",
             type=float),
         Arg("--image-tokens", "llama.cpp's image-token limits, instead of those of the trained resolution",
             type=token_range, metavar="MIN:MAX"),
         Arg("--no-parity", "convert only; skip the tokenizer and answer checks", action="store_false",
             dest="parity"),
         Arg("--overwrite", "replace an existing, non-empty output folder", action="store_true"),
         Arg("--setup", "install llama.cpp's converter of the pinned version (once, after installing the extra)",
             action="store_true"),
         Arg("--sdist", "--setup from this llama-cpp-python source archive (offline)", metavar="FILE")),
        adapter=convert_or_setup, prints=True),
    Command(
        "serve", "finetune:serve", "serve a run with vLLM (OpenAI-compatible API), or check it",
        "Start vLLM's OpenAI-compatible server on the run's merged export (merged first if missing), at the dtype "
        "its parity check used, with training.max_length as the model length and the most images a training row "
        "held as the per-prompt limit; prints the URL and a curl example; Ctrl-C or SIGTERM stops it. --adapter "
        "serves the base model + the LoRA adapter instead, with the projector and vision LoRA kept "
        "(--enable-tower-connector-lora). --check N sends N held-out rows over HTTP, with and without a system "
        "message, compares the answers with `finetune predict` and exits 1 below N/N. vLLM comes from its own "
        "environment: `bash scripts/setup.sh vllm` (or FINETUNE_VLLM_PYTHON).",
        "examples:\n  finetune serve runs/tiny-chartqa --port 8000\n  finetune serve runs/tiny-chartqa --adapter\n"
        "  finetune serve runs/tiny-chartqa --check 20\n"
        "  finetune serve runs/qwen-7b --vllm-args '--tensor-parallel-size 8'",
        (Arg("run_dir", "training run folder (adapter + recipe.yaml)"),
         Arg("--port", "port to listen on (default 8000; with --check, a free one)", type=int),
         Arg("--host", "address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
             default="127.0.0.1"),
         Arg("--adapter", "serve base model + adapter instead of the merged export", action="store_true"),
         Arg("--check", "compare N held-out answers with `finetune predict` instead of serving (default 20)",
             type=int, nargs="?", const=20, metavar="N"),
         Arg("--vllm-args", "more vLLM server flags, one quoted string, e.g. '--tensor-parallel-size 8 "
             "--gpu-memory-utilization 0.9'", default="", metavar="FLAGS")),
        prints=True),
    Command(
        "push", "finetune.export.hub:push", "upload an adapter or merged model to the Hugging Face Hub",
        "Upload the adapter (or with --merged the merged export, made first if missing) with the processor files "
        "and a model card, in one commit. The token comes from HF_TOKEN or `hf auth login`; it is never printed or "
        "written. Unset options fall back to the recipe's export.hub_* keys.",
        "examples:\n  finetune push runs/tiny-chartqa --repo alice/tiny-chartqa --private\n"
        "  finetune push runs/tiny-chartqa --repo alice/tiny-chartqa --merged --revision v1",
        # --private and --merged default to None, not False: unset, the recipe's export.hub_* keys decide.
        (Arg("target", "training run folder, or a merged export folder"),
         Arg("--repo", "Hub repository, namespace/name (default: export.hub_repo_id)", dest="repo_id",
             metavar="REPO"),
         Arg("--private", "create the repository as private (no effect on an existing one)",
             action="store_const", const=True, default=None),
         Arg("--revision", "branch to commit to, created if missing (default: main)"),
         Arg("--merged", "push RUN/merged instead of the adapter (runs `finetune merge` first if needed)",
             action="store_const", const=True, default=None),
         Arg("--gguf", "push RUN/gguf (the files of `finetune export-gguf`) with a card on running them",
             action="store_true"),
         Arg("--message", "commit message", dest="commit_message", metavar="MESSAGE")),
        prints=True),
)


class Formatter(argparse.HelpFormatter):
    """Wraps prose to the terminal but keeps indented lines (example commands) as written, to copy and paste."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if not line or line.startswith(" ") else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune", description="LoRA / QLoRA fine-tuning of vision-language models from YAML recipes.",
        epilog=EPILOG, formatter_class=Formatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           epilog=command.epilog, formatter_class=Formatter)
        for arg in command.args:
            p.add_argument(arg.name, help=arg.help, **arg.options)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`check R --show-labels 2 lora.r=8`), which argparse alone refuses.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    command = next(c for c in COMMANDS if c.name == args.command)

    from .console import quiet_library_warnings

    quiet_library_warnings()
    from .batching import DataRefused, TemplateError
    from .data import DataError
    from .errors import RecipeError, SourceNotFound
    from .export import ExportError  # also ParityError and HubError
    from .models import UnsupportedModelError
    from .training import CheckpointError, TrainingHealthError, TrainingInterrupted

    try:
        result = command.run(args)
    except UsageError as e:
        parser.error(str(e))
    except TrainingInterrupted as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 130
    except SourceNotFound as e:  # bad input, like a usage error: the id or path as given does not exist
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    except (RecipeError, DataError, DataRefused, TemplateError, UnsupportedModelError, FileNotFoundError,
            ExportError, CheckpointError, TrainingHealthError) as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 1
    if command.prints:
        print(result)
    return 0
