"""Build (or find in the cache) the tiny local checkpoints of the model zoo.

    python scripts/build_zoo.py                          # every family, preset "tiny"
    python scripts/build_zoo.py qwen2_vl llava --preset small
    python scripts/build_zoo.py --preset bench --cache-dir /tmp/zoo

Prints one line per family: family, folder, parameter count, seconds (a cached folder takes ~0 s).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from finetune import zoo  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"default: all ({', '.join(zoo.FAMILIES)})")
    parser.add_argument("--preset", default="tiny", choices=list(zoo.PRESETS))
    parser.add_argument("--cache-dir", help="default: $FINETUNE_CACHE/zoo or ~/.cache/finetune/zoo")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in zoo.FAMILIES]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; valid: {', '.join(zoo.FAMILIES)}")

    from transformers.utils import logging

    logging.disable_progress_bar()  # one "Writing model shards" bar per family is noise here
    for family in args.families or zoo.FAMILIES:
        start = time.perf_counter()
        path = zoo.ensure(family, args.preset, args.cache_dir)
        params = zoo.info(path)["params"]
        print(f"{family:<11} {path}  {params:>11,d} params  {time.perf_counter() - start:6.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
