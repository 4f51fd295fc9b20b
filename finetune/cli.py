"""The `finetune` command: a thin layer over `finetune.train` and `finetune.check`."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
recipes are YAML files with sections model, data, lora, quantization, training (trl.SFTConfig keys) and export.
override any key from the command line: finetune train recipes/tiny-chartqa.yaml training.max_steps=20

examples:
  finetune train recipes/tiny-chartqa.yaml
  accelerate launch -m finetune train recipes/qwen2_5-vl-7b-qlora.yaml
  finetune check recipes/tiny-chartqa.yaml --show-labels 2
  finetune merge runs/tiny-chartqa --dtype float32
  finetune export-gguf runs/tiny-chartqa --outtype f16 --outtype q4_k_m
  finetune push runs/tiny-chartqa --repo alice/tiny-chartqa --private
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune", description="LoRA / QLoRA fine-tuning of vision-language models from YAML recipes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model as a recipe says",
                       description="Fine-tune a model as a recipe says. Writes the adapter, processor, resolved "
                                   "recipe, run_summary.json and loss_curve.png to training.output_dir "
                                   "(default runs/<recipe name>).",
                       epilog="example: finetune train recipes/tiny-chartqa.yaml training.learning_rate=1e-4",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lora.r=8")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")

    p = sub.add_parser("check", help="validate a recipe and scan its data without training",
                       description="Validate a recipe, then scan its data exactly as training would: token "
                                   "lengths after image expansion, samples that would be dropped and why.",
                       epilog="example: finetune check recipes/tiny-chartqa.yaml --show-labels 2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. data.max_samples=10")
    p.add_argument("--show-labels", type=int, default=0, metavar="N",
                   help="print N collated samples with the loss-carrying tokens marked [[like this]]")
    p.add_argument("--no-data", action="store_true", help="validate the recipe only; do not load the processor or data")
    p.add_argument("--accelerate-config", metavar="PATH",
                   help="also check the recipe against this accelerate config (strategy, mixed precision, 4-bit "
                        "storage), as `accelerate launch --config_file PATH` would run it")
    p = sub.add_parser("eval", help="score a run, merged export or base model on held-out data",
                       description="Greedy generation on a split, scored per task (ChartQA relaxed accuracy, exact "
                                   "match, ANLS, VQA accuracy). Writes predictions.jsonl and metrics.json.",
                       epilog="example: finetune eval runs/tiny-chartqa --split test --limit 50")
    p.add_argument("target", help="run folder, merged export folder, model folder, hub id or zoo:<family>")
    p.add_argument("--split", help="split to evaluate (default: the recipe's data.eval_split)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--metric", help="relaxed_accuracy, exact_match, anls or vqa_accuracy")
    p.add_argument("--recipe", help="recipe giving the data, for targets without a recipe.yaml")
    p.add_argument("--out", help="folder for predictions.jsonl and metrics.json (default: TARGET/eval)")
    p.add_argument("--batch-size", type=int, default=8)

    p = sub.add_parser("predict", help="answer a prompt about an image, or every row of a JSONL file",
                       description="Answer with the same chat template, system prompt and image settings as training.",
                       epilog="examples:\n  finetune predict runs/tiny-chartqa --image chart.png --prompt "
                              "'Which color is the tallest bar?'\n  finetune predict runs/tiny-chartqa --data "
                              "questions.jsonl --out answers.jsonl   # rows: {\"prompt\": ..., \"images\": [...]}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="run folder, merged export folder, model folder, hub id or zoo:<family>")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several images)")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--data", help="JSONL file of {prompt, images} rows to answer instead")
    p.add_argument("--out", help="where --data answers go (default: <data>.predictions.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=32)

    p = sub.add_parser("chat", help="interactive multi-turn chat with images by path",
                       description="Type a message and press enter. /image PATH attaches an image to your next "
                                   "message, /reset starts over, /exit (or end of input) quits.")
    p.add_argument("target", help="run folder, merged export folder, model folder, hub id or zoo:<family>")
    p.add_argument("--max-new-tokens", type=int, default=64)

    p = sub.add_parser("merge", help="merge a run's adapter into its base model and check parity",
                       description="Reload the base model in full precision, merge the LoRA adapter, and save "
                                   "safetensors weights with the processor, chat template, generation config, "
                                   "recipe and a model card. Then reload the export and compare it with base + "
                                   "adapter on samples of the run's eval data (logits, KL, greedy generations): "
                                   "parity.json; exits 1 above the tolerance. QLoRA runs merge onto the original "
                                   "16-bit weights unless --onto-dequantized.",
                       epilog="examples:\n  finetune merge runs/tiny-chartqa --dtype float32\n"
                              "  finetune merge runs/qwen-qlora --onto-dequantized --out exports/qwen-merged",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="training run folder (adapter + recipe.yaml)")
    p.add_argument("--out", help="export folder (default: RUN_DIR/merged)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weight dtype of the export (default: the recipe's export.merge_dtype; auto = as the base "
                        "checkpoint is stored)")
    p.add_argument("--onto-dequantized", action="store_true",
                   help="QLoRA runs: merge onto the NF4-dequantized weights the adapter was trained against")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check")
    p.add_argument("--tolerance", type=float,
                   help="max |logit difference| allowed (default: 1e-4 float32, 0.25 float16, 1.0 bfloat16)")
    p.add_argument("--samples", type=int, default=4, help="eval samples the parity check uses (default 4)")
    p.add_argument("--device", default="cpu", help="device for the parity forward passes (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty export folder")

    p = sub.add_parser("export-gguf", help="convert a run or merged export to GGUF for llama.cpp, and check it",
                       description="Merge (if needed) and convert to GGUF with llama.cpp's own converter: the "
                                   "language model per --outtype and the vision encoder + projector (mmproj). Then "
                                   "check it: llama.cpp's tokenizer against transformers' on a few thousand "
                                   "strings, and llama.cpp's greedy answers against the merged model's on held-out "
                                   "rows at the trained image resolution. Writes the files, gguf.json and a README "
                                   "with the llama.cpp command to TARGET/gguf; exits 1 when a check fails. Needs "
                                   "`pip install 'finetune[gguf]'` and, once, `finetune export-gguf --setup`.",
                       epilog="examples:\n  finetune export-gguf --setup\n"
                              "  finetune export-gguf runs/tiny-chartqa --outtype f16 --outtype q4_k_m",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help="training run folder or merged export folder")
    p.add_argument("--outtype", action="append", metavar="TYPE",
                   help="f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k or q4_0; repeat for several (default f16)")
    p.add_argument("--out", help="folder for the GGUF files (default: TARGET/gguf)")
    p.add_argument("--mmproj-outtype", default="f16", help="the vision file's type: f32, f16, bf16 or q8_0")
    p.add_argument("--samples", type=int, default=20, help="held-out rows the answer check uses (default 20)")
    p.add_argument("--min-agreement", type=float,
                   help="share of answers that must agree (default 0.9 for 8 bits and up, 0.7 below)")
    p.add_argument("--image-tokens", metavar="MIN:MAX",
                   help="llama.cpp's image-token limits, instead of those of the trained resolution")
    p.add_argument("--no-parity", action="store_true", help="convert only; skip the tokenizer and answer checks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")
    p.add_argument("--setup", action="store_true",
                   help="install llama.cpp's converter of the pinned version (once, after installing the extra)")
    p.add_argument("--sdist", metavar="FILE", help="--setup from this llama-cpp-python source archive (offline)")

    p = sub.add_parser("push", help="upload an adapter or merged model to the Hugging Face Hub",
                       description="Upload the adapter (or with --merged the merged export, made first if "
                                   "missing) with the processor files and a model card, in one commit. The token "
                                   "comes from HF_TOKEN or `hf auth login`; it is never printed or written. "
                                   "Unset options fall back to the recipe's export.hub_* keys.",
                       epilog="examples:\n  finetune push runs/tiny-chartqa --repo alice/tiny-chartqa --private\n"
                              "  finetune push runs/tiny-chartqa --repo alice/tiny-chartqa --merged "
                              "--revision v1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="training run folder, or a merged export folder")
    p.add_argument("--repo", help="Hub repository, namespace/name (default: export.hub_repo_id)")
    p.add_argument("--private", action="store_const", const=True, default=None,
                   help="create the repository as private (no effect on an existing one)")
    p.add_argument("--revision", help="branch to commit to, created if missing (default: main)")
    p.add_argument("--merged", action="store_const", const=True, default=None,
                   help="push RUN/merged instead of the adapter (runs `finetune merge` first if needed)")
    p.add_argument("--gguf", action="store_true",
                   help="push RUN/gguf (the files of `finetune export-gguf`) with a card on running them")
    p.add_argument("--message", help="commit message")
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

    from .console import quiet_library_warnings

    quiet_library_warnings()
    from .batching import DataRefused, TemplateError
    from .data import DataError
    from .errors import RecipeError, SourceNotFound
    from .export import ExportError  # also ParityError and HubError
    from .models import UnsupportedModelError
    from .training import CheckpointError, TrainingHealthError, TrainingInterrupted

    import finetune

    try:
        if args.command == "train":
            out = finetune.train(args.recipe, args.overrides, overwrite=args.overwrite)
            print(out)
        elif args.command == "check":
            finetune.check(args.recipe, args.overrides, show_labels=args.show_labels, data=not args.no_data,
                           accelerate_config=args.accelerate_config)
        elif args.command == "eval":
            finetune.evaluate(args.target, split=args.split, limit=args.limit, metric=args.metric,
                              recipe=args.recipe, out_dir=args.out, batch_size=args.batch_size)
        elif args.command == "predict":
            from .evaluation import predict, predict_file

            if args.data:
                print(predict_file(args.target, args.data, args.out or f"{args.data}.predictions.jsonl",
                                   args.max_new_tokens))
            elif args.prompt:
                print(predict(args.target, args.prompt, args.image, args.max_new_tokens))
            else:
                parser.error("predict needs --prompt (with --image) or --data")
        elif args.command == "chat":
            from .evaluation.conversation import chat

            chat(args.target, max_new_tokens=args.max_new_tokens)
        elif args.command == "merge":
            finetune.merge(args.run_dir, out=args.out, dtype=args.dtype,
                           onto="dequantized" if args.onto_dequantized else "original", parity=not args.no_parity,
                           tolerance=args.tolerance, samples=args.samples, overwrite=args.overwrite,
                           device=args.device)
        elif args.command == "export-gguf":
            if args.setup:
                from .export.llama_cpp import install_converter

                print(install_converter(args.sdist))
            elif not args.target:
                parser.error("export-gguf needs a run or merged export folder (or --setup)")
            else:
                print(finetune.export_gguf(args.target, outtypes=args.outtype or ["f16"], out=args.out,
                                           mmproj_outtype=args.mmproj_outtype, samples=args.samples,
                                           min_agreement=args.min_agreement,
                                           image_tokens=_token_range(parser, args.image_tokens),
                                           parity=not args.no_parity, overwrite=args.overwrite))
        elif args.command == "push":
            print(finetune.push(args.target, args.repo, private=args.private, revision=args.revision,
                                merged=args.merged, gguf=args.gguf, commit_message=args.message))
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
    return 0


def _token_range(parser, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    low, _, high = value.partition(":")
    if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
        parser.error(f"--image-tokens: expected MIN:MAX with 0 < MIN <= MAX, got {value!r}")
    return int(low), int(high)
