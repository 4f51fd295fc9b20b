"""Train every shipped real-model recipe for 2 steps on a replica of its checkpoint, then check `predict` stops.

For each recipe in recipes/ that names a hub checkpoint, `model.name_or_path` is pointed at `zoo:<its hub files>`
(tests/fixtures/hub/<org>__<name>: the checkpoint's own chat template, special tokens and image settings, tiny
weights), the data at the bundled data/chartqa-tiny (4 rows), and `finetune train` runs 2 steps through the CLI with
everything else as the recipe says (QLoRA recipes stay 4-bit: bitsandbytes runs NF4 on the CPU). Then:

- `finetune predict` (the CLI) answers a chart question from the run folder;
- the same prompt is answered by a model forced to emit "red red red <end-of-turn> red ...": generation must stop
  after the end-of-turn token the run trained on (4 new tokens, answer "red red red"), also for checkpoints whose
  generation config names only the tokenizer's EOS (the replicas' do, like Gemma 3's <eos>).

    python scripts/check_real_recipes.py                       # all recipes, runs under /tmp
    python scripts/check_real_recipes.py gemma3-4b-qlora --out runs/real-recipes

Prints one line per recipe and writes results.json in the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.recipe.methods import DEFAULT_METHOD, METHODS

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / "tests" / "fixtures" / "hub"
DATA = ROOT / "data" / "chartqa-tiny"
QUESTION = "Which color is the tallest bar?"


def real_recipes() -> dict[str, str]:
    """Recipe name -> the hub checkpoint it names (recipes on zoo models are left out)."""
    import yaml

    out = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        name = yaml.safe_load(path.read_text())["model"]["name_or_path"]
        if not name.startswith("zoo:"):
            out[path.stem] = name
    return out


def overrides(hub_dir: Path, out: Path) -> list[str]:
    return [f"model.name_or_path=zoo:{hub_dir}", "model.dtype=float32", f"data.path={DATA}", "data.format=chartqa",
            "data.max_samples=4", "data.eval_split=null", "evaluation.enabled=false", "training.max_steps=2",
            "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1",
            "training.logging_steps=1", "training.save_strategy=\"no\"", "training.bf16=false",
            "training.dataloader_num_workers=0", f"training.output_dir={out}"]


def run_recipe(name: str, hub_id: str, root: Path, env: dict | None = None) -> dict:
    hub_dir = HUB / hub_id.replace("/", "__")
    out = root / name
    recipe = ROOT / "recipes" / f"{name}.yaml"
    extra = []
    import yaml

    if yaml.safe_load(recipe.read_text()).get("quantization", {}).get("load_in_4bit"):
        extra = ["quantization.compute_dtype=float32"]  # the recipes' bfloat16 compute needs a bf16 GPU
    if METHODS[yaml.safe_load(recipe.read_text()).get("training", {}).get("method", DEFAULT_METHOD)].generates:
        extra += ["training.num_generations=2", "training.max_completion_length=8"]  # batches of 2 rows
    started = time.time()
    train = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe), *overrides(hub_dir, out), *extra,
                            "--overwrite"], capture_output=True, text=True, cwd=ROOT, env=env)
    result = {"recipe": name, "checkpoint": hub_id, "train_returncode": train.returncode,
              "train_seconds": round(time.time() - started, 1)}
    if train.returncode != 0:
        result["error"] = train.stderr[-2000:]
        return result
    summary = json.loads((out / "run_summary.json").read_text())
    result.update(family=summary["family"], steps=summary["steps"], loss=[p["loss"] for p in summary["loss_curve"]],
                  tokens_per_sample=summary["train_data"]["tokens_per_sample"],
                  quantized=yaml.safe_load(recipe.read_text()).get("quantization", {}).get("load_in_4bit", False))
    image = DATA / "images" / "test-0000.png"
    predict = subprocess.run([sys.executable, "-m", "finetune", "predict", str(out), "--image", str(image),
                              "--prompt", QUESTION, "--max-new-tokens", "8"], capture_output=True, text=True,
                             cwd=ROOT, env=env)
    result["predict_returncode"] = predict.returncode
    result["predict_answer"] = predict.stdout.strip().splitlines()[-1] if predict.stdout.strip() else ""
    result.update(forced_stop(out, image))
    return result


def forced_stop(run_dir: Path, image: Path, max_new_tokens: int = 16) -> dict:
    """Answer with a model whose logits spell "red red red <end-of-turn>" and then keep saying "red": the answer
    must end at the end-of-turn token."""
    import torch

    from finetune.evaluation.conversation import predict
    from finetune.batching.template import template_traits
    from finetune.evaluation.inference import load_target

    target = load_target(run_dir)
    tokenizer = target.processor.tokenizer
    word = tokenizer.encode(" red", add_special_tokens=False)[-1]
    end = tokenizer.convert_tokens_to_ids(template_traits(target.processor, target.family).end_token)
    calls = []

    def spell(module, inputs, output):
        token = end if len(calls) == 3 else word
        calls.append(token)
        forced = torch.full_like(output[:, -1], -1e4)
        forced[:, token] = 1e4
        output[:, -1] = forced
        return output

    handle = target.model.get_output_embeddings().register_forward_hook(spell)
    try:
        answer = predict(target, QUESTION, [str(image)], max_new_tokens=max_new_tokens)
    finally:
        handle.remove()
    return {"forced_answer": answer, "forced_new_tokens": len(calls), "end_token": tokenizer.convert_ids_to_tokens(end),
            "stopped_at_end_token": len(calls) == 4 and answer == tokenizer.decode([word] * 3).strip()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", help="recipe names (default: every real-model recipe)")
    parser.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    recipes = real_recipes()
    chosen = args.recipes or list(recipes)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="real-recipes-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    for name in chosen:
        r = run_recipe(name, recipes[name], root, env)
        results.append(r)
        if r["train_returncode"] != 0:
            print(f"{name}: train FAILED ({r['train_seconds']}s)\n{r['error']}", flush=True)
            continue
        print(f"{name} ({r['checkpoint']}, {r['family']}{', 4-bit' if r['quantized'] else ''}): {r['steps']} steps "
              f"in {r['train_seconds']}s, loss {' -> '.join(f'{x:.3f}' for x in r['loss'])}, tokens/sample "
              f"{r['tokens_per_sample']['min']}-{r['tokens_per_sample']['max']}; predict rc {r['predict_returncode']} "
              f"{r['predict_answer']!r}; forced: {r['forced_answer']!r} after {r['forced_new_tokens']} tokens, "
              f"stopped at {r['end_token']}: {r['stopped_at_end_token']}", flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    ok = all(r["train_returncode"] == 0 and r.get("predict_returncode") == 0 and r.get("stopped_at_end_token")
             for r in results)
    print(f"{'all' if ok else 'NOT all'} {len(results)} recipes trained 2 steps and stopped at the end-of-turn token; "
          f"results in {root / 'results.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
