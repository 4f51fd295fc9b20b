"""Run llama.cpp's `convert_hf_to_gguf.py` from the pinned llama.cpp sources, with what finetune knows added.

    python -m finetune.export.gguf_convert SOURCES [--pre-tokenizer NAME] [--text-architecture ARCH]
        [--rename OLD=NEW ...] [--transpose SUFFIX ...] -- CONVERTER_ARGS...

A subprocess of finetune.export.llama_cpp: the converter imports its own `gguf` package (which must come from the
same llama.cpp as the runtime) and holds whole tensors in memory, so it runs apart from the caller. What it adds,
each only where asked (the family table and the zoo decide, never a guess):
- `--pre-tokenizer`: the name used when the converter does not recognise a tokenizer's pre-tokenizer (only the
  zoo's own tokenizer; a real checkpoint's unknown tokenizer is refused as the converter refuses it);
- `--text-architecture`: the text model's class where `text_config` names none (transformers 5 saves of Idefics3);
- `--rename`: tensor-name prefixes the converter knows under their transformers 4 names;
- `--transpose`: 3-D tensors (by name suffix) whose last two axes the converter expects swapped: transformers 5
  saves Qwen3-VL-MoE's fused experts as (experts, out, in), the hub checkpoints the converter reads as (experts,
  in, out).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from ..models.families import renamed


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m finetune.export.gguf_convert")
    parser.add_argument("sources", type=Path)
    parser.add_argument("--pre-tokenizer")
    parser.add_argument("--text-architecture")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    parser.add_argument("--transpose", action="append", default=[], metavar="SUFFIX")
    args = parser.parse_args(argv[:split])
    sys.path[:0] = [str(args.sources), str(args.sources / "gguf-py")]
    import conversion.base as base  # the pinned converter's own modules, from the sources above

    if args.pre_tokenizer:
        recognised = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):
            try:
                return recognised(self, tokenizer)
            except NotImplementedError:
                return args.pre_tokenizer

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    if args.text_architecture:
        architecture = base.get_model_architecture

        def get_model_architecture(hparams, model_type):
            if model_type == base.ModelType.TEXT and not hparams.get("text_config", {}).get("architectures"):
                return args.text_architecture
            return architecture(hparams, model_type)

        base.get_model_architecture = get_model_architecture
        sys.modules["conversion"].get_model_architecture = get_model_architecture
    if args.rename:
        renames = [tuple(r.split("=", 1)) for r in args.rename]
        index = base.ModelBase.index_tensors

        def index_tensors(self, *a, **k):
            return {renamed(name, renames): tensor for name, tensor in index(self, *a, **k).items()}

        base.ModelBase.index_tensors = index_tensors
    if args.transpose:
        listed = base.ModelBase.index_tensors

        def transposed_tensors(self, *a, **k):
            tensors = listed(self, *a, **k)
            return {name: (lambda load=load: load().transpose(-1, -2).contiguous())
                    if any(name.endswith(suffix) for suffix in args.transpose) else load
                    for name, load in tensors.items()}

        base.ModelBase.index_tensors = transposed_tensors
    script = args.sources / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *argv[split + 1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
