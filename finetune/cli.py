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

    from .collate import TemplateError
    from .data import DataError
    from .families import UnsupportedModelError
    from .recipe import RecipeError
    from .scan import DataRefused

    import finetune

    try:
        if args.command == "train":
            out = finetune.train(args.recipe, args.overrides, overwrite=args.overwrite)
            print(out)
        elif args.command == "check":
            finetune.check(args.recipe, args.overrides, show_labels=args.show_labels, data=not args.no_data)
    except (RecipeError, DataError, DataRefused, TemplateError, UnsupportedModelError) as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 1
    return 0
