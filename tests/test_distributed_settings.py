"""Distributed settings agree before launch: the recipe's FSDP / DeepSpeed keys, the accelerate config or launch
environment, mixed precision and 4-bit storage; resume knows every mode's checkpoint layout; a run never falls back
to another strategy silently and never ends without its adapter."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.recipe import RecipeError, load_recipe
from finetune.recipe.distributed import Launch, check_launch, from_accelerate_config, from_environment
from finetune.training.checkpoints import MARKER, CheckpointError, missing_resume_state
from finetune.training.sharding import refuse_fallback, strategy_of

ROOT = Path(__file__).parents[1]
BASE = {"model": {"name_or_path": "zoo:qwen2_vl"}, "data": {"path": "data/chartqa-tiny"},
        "training": {"bf16": False}}


def recipe(*overrides):
    return load_recipe(BASE, list(overrides))


def test_training_fsdp_true_is_the_form_transformers_asks_for():
    r = recipe("training.fsdp=true", "training.fsdp_config={version: 2, fsdp_state_dict_type: SHARDED_STATE_DICT}")
    assert r.training.fsdp is True
    config = r.trl_config(use_cpu=True)
    assert config.fsdp_plugin_args["fsdp_version"] == 2
    assert config.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"


@pytest.mark.parametrize("overrides, message", [
    (["training.fsdp=true", "training.fsdp_config={version: 2, reshard_after_foward: true}"],
     r"training.fsdp_config.reshard_after_foward: unknown key \(did you mean 'reshard_after_forward'\?\)"),
    (["training.fsdp=true", "training.fsdp_config={version: 3}"], r"training.fsdp_config.version: must be 1 or 2"),
    (["training.fsdp=true", "training.fsdp_config={state_dict_type: SHARDED}"],
     r"training.fsdp_config.state_dict_type: unknown value 'SHARDED'"),
    (["training.fsdp_config={version: 2}"], r"training.fsdp_config: used only with training.fsdp: true"),
    (["training.fsdp=true", "training.deepspeed={zero_optimization: {stage: 2}}"],
     r"training.fsdp: cannot be combined with training.deepspeed"),
    (["training.deepspeed={zero_optimization: {stage: 4}}"], r"training.deepspeed: zero_optimization.stage must"),
    (["training.deepspeed=missing.json"], r"training.deepspeed: cannot read missing.json"),
    (["training.fsdp=true", "quantization.load_in_4bit=true"],
     r"quantization.quant_storage: uint8 4-bit weights cannot be sharded by FSDP \(training.fsdp\); set "
     r"quantization.quant_storage=bfloat16"),
    (["training.deepspeed={zero_optimization: {stage: 3}}", "quantization.load_in_4bit=true"],
     r"quantization.load_in_4bit: DeepSpeed ZeRO-3 \(training.deepspeed\) does not shard"),
    (["training.fsdp=true", "data.eval_split=test", "evaluation.every_n_steps=5"], r"evaluation.every_n_steps: not supported under FSDP"),
])
def test_bad_distributed_keys_name_the_key(overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe(*overrides)


def test_fsdp_with_4bit_weights_stored_in_the_model_dtype_is_accepted_and_loads_in_that_one_dtype():
    """FSDP flattens the parameters it shards into buffers of one dtype: 4-bit weights stored as bfloat16 beside
    bfloat16 weights shard; stored beside float32 weights, or as uint8, they do not."""
    import bitsandbytes as bnb
    import torch

    from finetune.models.loading import load_family, load_model

    fsdp_4bit = ["training.fsdp=true", "quantization.load_in_4bit=true", "quantization.quant_storage=bfloat16"]
    accepted = recipe(*fsdp_4bit, "model.dtype=bfloat16")
    assert (accepted.training.fsdp, accepted.quantization.load_in_4bit, accepted.quantization.quant_storage,
            accepted.model.dtype) == (True, True, "bfloat16", "bfloat16")
    check_launch(accepted, from_accelerate_config("recipes/accelerate/fsdp2-cpu.yaml"))  # FSDP, mixed precision no
    with pytest.raises(RecipeError, match=r"quantization.quant_storage: bfloat16 4-bit weights cannot be sharded by "
                                          r"FSDP \(training.fsdp\); set quantization.quant_storage=float32"):
        recipe(*fsdp_4bit, "model.dtype=float32")

    path, family = load_family(accepted.model)
    model = load_model(path, accepted.model, accepted.quantization, family)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, "one dtype: FSDP can flatten every shard"
    uint8 = recipe("quantization.load_in_4bit=true", "model.dtype=bfloat16").quantization  # the default storage
    dtypes = {p.dtype for p in load_model(path, accepted.model, uint8, family).parameters()}
    assert dtypes == {torch.bfloat16, torch.uint8}, "what FSDP refuses to flatten"


def test_launch_mixed_precision_must_match_the_recipe():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
           "ACCELERATE_MIXED_PRECISION": "bf16"}
    launch = from_environment(env)
    assert launch == Launch("DeepSpeed ZeRO-2", "bf16", "accelerate launch")
    with pytest.raises(RecipeError, match=r"training.bf16: false trains in full precision \(float32 compute\), but "
                                          r"accelerate launch sets mixed_precision: bf16; make them agree "
                                          r"\(training.bf16=true, or --mixed_precision no at launch\)"):
        check_launch(recipe(), launch)
    check_launch(recipe(), from_environment({**env, "ACCELERATE_MIXED_PRECISION": "no"}))
    check_launch(recipe(), from_environment({}))  # plain python / torchrun: nothing to agree with
    with pytest.raises(RecipeError, match=r"training.fp16: true trains in fp16 mixed precision"):
        check_launch(recipe("training.fp16=true"), from_environment({**env, "ACCELERATE_MIXED_PRECISION": "no"}))


def test_recipe_and_launcher_must_ask_for_the_same_strategy():
    with pytest.raises(RecipeError, match=r"training.fsdp: the recipe asks for FSDP but accelerate launch sets up "
                                          r"DeepSpeed ZeRO-3"):
        check_launch(recipe("training.fsdp=true"), Launch("DeepSpeed ZeRO-3", "no", "accelerate launch"))


def test_shipped_gpu_configs_state_what_the_recipe_must_say():
    qlora = load_recipe(ROOT / "recipes/llama-3.2-11b-vision-qlora.yaml")
    with pytest.raises(RecipeError, match="quantization.quant_storage: uint8 4-bit weights cannot be sharded by FSDP "
                                          r"\(recipes/accelerate/fsdp2-qlora.yaml\)"):
        check_launch(qlora, from_accelerate_config("recipes/accelerate/fsdp2-qlora.yaml"))
    with pytest.raises(RecipeError, match="DeepSpeed ZeRO-3"):
        check_launch(load_recipe(ROOT / "recipes/qwen2_5-vl-7b-qlora.yaml"),
                     from_accelerate_config("recipes/accelerate/deepspeed-zero3.yaml"))
    with pytest.raises(RecipeError, match="training.bf16: false.*mixed_precision: bf16"):
        check_launch(recipe(), from_accelerate_config("recipes/accelerate/deepspeed-zero2.yaml"))


def test_finetune_check_validates_against_an_accelerate_config(capsys):
    from finetune.cli import main

    assert main(["check", "recipes/tiny-chartqa.yaml", "--no-data", "--accelerate-config",
                 "recipes/accelerate/fsdp2-cpu.yaml"]) == 0
    assert "(with recipes/accelerate/fsdp2-cpu.yaml: FSDP, mixed precision no)" in capsys.readouterr().out
    assert main(["check", "recipes/tiny-chartqa.yaml", "--no-data", "--accelerate-config",
                 "recipes/accelerate/deepspeed-zero3.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.bf16: false" in err[0] and "mixed_precision: bf16" in err[0]


def checkpoint(tmp_path, files: list[str]) -> Path:
    path = tmp_path / "checkpoint-2"
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"x")
    (path / MARKER).write_text(json.dumps({"step": 2, "files": {f: 1 for f in files}}))
    return path


STATE = ["scheduler.pt", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"]


@pytest.mark.parametrize("layout", [
    ["adapter_model.safetensors", "optimizer.pt"],  # one process, DDP, DeepSpeed/FSDP with finetune's adapter
    ["pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/__0_0.distcp"],  # FSDP, SHARDED_STATE_DICT
    ["pytorch_model_fsdp.bin", "optimizer.bin"],  # FSDP, FULL_STATE_DICT
    ["global_step2/zero_pp_rank_0_mp_rank_00_model_states.pt",
     "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt"],  # DeepSpeed ZeRO-3
], ids=["plain", "fsdp-sharded", "fsdp-full", "deepspeed"])
def test_every_modes_checkpoint_is_complete(tmp_path, layout):
    assert missing_resume_state(checkpoint(tmp_path, layout + STATE)) == []


def test_a_deepspeed_checkpoint_without_its_optimizer_states_is_incomplete(tmp_path):
    path = checkpoint(tmp_path, ["global_step2/mp_rank_00_model_states.pt"] + STATE)
    assert missing_resume_state(path) == ["optimizer.pt (or optimizer_0/ under FSDP, global_stepN/ under DeepSpeed)"]


@pytest.mark.parametrize("asked, ran", [("FSDP", "DDP"), ("DeepSpeed ZeRO-3", "DeepSpeed ZeRO-2"),
                                        ("DeepSpeed ZeRO-2", "DDP"), (None, "none (each process trains alone)")])
def test_a_strategy_other_than_the_one_asked_for_stops_the_run(asked, ran):
    with pytest.raises(RecipeError, match="stopping before training"):
        refuse_fallback(asked, {"strategy": ran, "world_size": 2})


@pytest.mark.parametrize("asked, ran, fallback", [
    ("FSDP", "FSDP2", "DDP"), ("FSDP", "FSDP1", "DeepSpeed ZeRO-3"),
    ("DeepSpeed ZeRO-3", "DeepSpeed ZeRO-3", "DeepSpeed ZeRO-2"),
    (None, "DDP", "none (each process trains alone)"), (None, "single", "none (each process trains alone)")])
def test_the_strategy_asked_for_runs_and_the_nearest_fallback_stops(asked, ran, fallback):
    assert refuse_fallback(asked, {"strategy": ran, "world_size": 2}) is None
    refusal = (rf"the run asked for {asked} but the model was prepared as {fallback} over 2 process\(es\); stopping "
               "before training" if asked else "2 processes run without gradient synchronisation; stopping before")
    with pytest.raises(RecipeError, match=refusal):
        refuse_fallback(asked, {"strategy": fallback, "world_size": 2})


def test_an_unwrapped_model_reads_as_single_and_stops_a_run_that_asked_for_fsdp():
    """`strategy_of` on a real model no launcher wrapped: one process, "single"; fine unless FSDP was asked for."""
    import torch

    model = torch.nn.Linear(2, 2)
    ran = strategy_of(SimpleNamespace(model=model, model_wrapped=model))
    assert ran == {"strategy": "single", "world_size": 1}
    assert refuse_fallback(None, ran) is None
    with pytest.raises(RecipeError, match=r"asked for FSDP but the model was prepared as single over 1 process\(es\)"):
        refuse_fallback("FSDP", ran)


def test_a_run_that_wrote_no_adapter_fails(tmp_path):
    from finetune.training.pipeline import save

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"the adapter was not written: .* lacks adapter_model.safetensors"):
        save(SimpleNamespace(trainer=None, recipe=None), None, tmp_path, 0.0)
