"""Run under torchrun by test_distributed.py: trains through finetune's pipeline and records what each rank saw."""

import hashlib
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

import finetune.batching.collate
from finetune.training.pipeline import _claim_output_dir, prepare, save
from finetune.recipe import load_recipe

report_dir, recipe_path, *overrides = sys.argv[1:]
seen: list[int] = []
real_call = finetune.batching.collate.ChatCollator.__call__


def recording_call(self, rows):
    seen.extend(row["row_id"] for row in rows)
    return real_call(self, rows)


finetune.batching.collate.ChatCollator.__call__ = recording_call
recipe = load_recipe(recipe_path, overrides)
started = time.time()
run = prepare(recipe)
seen.clear()  # the pre-flight scan encodes every row once on every rank; count only training batches
rank = dist.get_rank() if dist.is_initialized() else 0
if rank == 0:
    _claim_output_dir(Path(recipe.training.output_dir), overwrite=False)
result = run.trainer.train()
lora = {n: p.detach() for n, p in sorted(run.trainer.model.named_parameters()) if "lora_" in n}
digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in lora.values())).hexdigest()
own = [int(x) for x in run.trainer.counts.seen]  # samples, real tokens, padded positions of this rank
throughput = run.trainer.throughput(result.metrics["train_runtime"])
run.trainer.save_model(recipe.training.output_dir)  # every rank, as finetune.training.pipeline.train does
if run.trainer.is_world_process_zero():
    save(run, result, Path(recipe.training.output_dir), started, throughput)
Path(report_dir, f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    "backend": dist.get_backend() if dist.is_initialized() else None, "rows": seen, "adapter_sha256": digest,
    "n_lora_tensors": len(lora), "seen": own,
    "scan": hashlib.sha256(json.dumps([run.train_scan.kept, run.train_scan.lengths]).encode()).hexdigest()}))
