"""Run under `accelerate launch` / `torchrun` by test_sharded_training.py: finetune's own `train()` (what `finetune
train` runs), then what the test cannot see from outside: how each rank holds the LoRA weights, and the trained
model's logits on fixed rows (computed by all ranks together, as the weights may be sharded; rank 0 writes them)."""

import json
import sys
from pathlib import Path

import torch

from finetune.training import pipeline

report_dir, recipe_path, *overrides = sys.argv[1:]
runs = []
real_prepare = pipeline.prepare


def prepare(*args, **kwargs):
    runs.append(real_prepare(*args, **kwargs))
    return runs[-1]


pipeline.prepare = prepare
pipeline.train(recipe_path, overrides)
trainer = runs[0].trainer
rank = torch.distributed.get_rank()

# How this rank holds the LoRA weights: FSDP2 keeps a DTensor shard, ZeRO-3 a flat partition (ds_tensor).
lora = [(n, p) for n, p in trainer.model.named_parameters() if "lora_A" in n]
name, param = lora[0]
if hasattr(param, "to_local"):
    local, full = list(param.to_local().shape), list(param.shape)
elif hasattr(param, "ds_tensor"):
    local, full = [param.ds_tensor.numel()], list(param.ds_shape)
else:
    local = full = list(param.shape)
wrapped = trainer.model_wrapped
held = {"rank": rank, "name": name, "local": local, "full": full, "dtensor": type(param).__name__ == "DTensor",
        "wrapper": type(wrapped).__name__,
        "zero_stage": wrapped.zero_optimization_stage() if hasattr(wrapped, "zero_optimization_stage") else None}
Path(report_dir, f"rank{rank}.json").write_text(json.dumps(held))

rows = [trainer.train_dataset[i] for i in range(2)]
batch = trainer.data_collator(rows)
inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
wrapped.eval()
with torch.no_grad():
    logits = wrapped(**inputs).logits
if rank == 0:
    torch.save({"inputs": inputs, "logits": logits}, Path(report_dir, "logits.pt"))
