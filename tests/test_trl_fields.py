"""Every TRL config field is mapped onto prefopt or refused with the reason (prefopt.trl_compat)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from prefopt import ConfigError, CPOConfig, DPOConfig, KTOConfig, RewardConfig, SFTConfig
from prefopt.trl_compat import FIELDS, JOINT, LORA, LOSS_PARAMS, table_rows

README = Path(__file__).resolve().parents[1] / "README.md"


def trl_fields(cls_name: str = "DPOConfig") -> dict:
    trl = pytest.importorskip("trl")
    if cls_name in ("CPOConfig", "ORPOConfig"):
        import importlib
        cls = getattr(importlib.import_module(f"trl.experimental.{cls_name[:-6].lower()}"), cls_name)
    else:
        cls = getattr(trl, cls_name)
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls) if f.init}


@pytest.mark.parametrize("cls_name", ["DPOConfig", "KTOConfig", "CPOConfig", "ORPOConfig", "RewardConfig",
                                      "SFTConfig", "ModelConfig", "ScriptArguments"])
def test_every_field_of_trls_configs_is_covered(cls_name):
    missing = [n for n in trl_fields(cls_name) if n not in FIELDS and n not in LOSS_PARAMS and n not in JOINT]
    assert missing == []


def test_a_script_spelling_out_every_trl_default_builds(caplog):
    """DPOConfig(**every TRL 1.16 DPOConfig field at its default) is accepted, silently."""
    defaults = trl_fields("DPOConfig")
    defaults["output_dir"] = "out"
    with caplog.at_level(logging.INFO, logger="prefopt"):
        args = DPOConfig(**defaults)
    assert not [r for r in caplog.records if "has no effect" in r.message]
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (1e-6, 3.0, 8)
    assert args.model.gradient_checkpointing is True and args.train.save_steps == 500
    assert args.train.eval_strategy == "no" and args.loss[0].name == "dpo" and args.loss[0].params["beta"] == 0.1
    assert args.reference.sync_steps == 0  # ref_model_sync_steps=512 acts only with sync_ref_model
    assert args.data.prompt_truncation == "keep_end" and args.data.pad_to_multiple_of is None  # keep_start: no change
    assert args.train.report_to == [] and args.train.mixed_precision == "auto"  # bf16=None: prefopt's auto


def test_mapped_fields_land_on_their_keys():
    a = DPOConfig(output_dir="o", loss_type=["sigmoid", "ipo", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.3,
                  label_smoothing=0.1, f_divergence_type="js_divergence", use_weighting=True, ld_alpha=0.5,
                  precompute_ref_log_probs=True, padding_free=True, pad_to_multiple_of=8, truncation_mode="keep_end",
                  sync_ref_model=True, ref_model_sync_steps=64, ref_model_mixup_alpha=0.9, fp16=True,
                  eval_strategy="epoch", save_strategy="epoch", warmup_steps=10, disable_tqdm=True,
                  model_init_kwargs={"torch_dtype": "bfloat16", "attn_implementation": "eager"},
                  gradient_checkpointing_kwargs={"use_reentrant": False}, resume_from_checkpoint=True,
                  train_sampling_strategy="group_by_length", optim="adamw_torch", lr_scheduler_kwargs={"power": 2.0})
    dpo, ipo, sft = a.loss
    assert (dpo.name, dpo.weight, dpo.params, dpo.modifiers) == (
        "dpo", 0.8, {"beta": 0.3, "label_smoothing": 0.1, "reference_free": False, "f_divergence": "js",
                     "f_alpha": 0.5}, {"wpo": True, "ld_alpha": 0.5})
    assert (ipo.name, ipo.weight, ipo.params, sft.name, sft.weight, sft.params) == ("ipo", 0.2, {"beta": 0.3},
                                                                                    "sft", 1.0, {})
    assert (a.reference.strategy, a.reference.sync_steps, a.reference.sync_alpha) == ("precomputed", 64, 0.9)
    assert (a.data.layout, a.data.pad_to_multiple_of, a.data.prompt_truncation, a.data.group_by_length) == (
        "packed", 8, "keep_end", True)
    t = a.train
    assert (t.mixed_precision, t.eval_strategy, t.save_strategy, t.warmup_steps, t.progress_bar, t.resume_from) == (
        "fp16", "epoch", "epoch", 10, False, "latest")
    assert (a.model.dtype, a.model.attn_implementation, t.lr_scheduler_kwargs) == ("bfloat16", "eager", {"power": 2.0})
    # read back with TRL's names
    assert (a.loss_type, a.loss_weights, a.fp16, a.bf16, a.sync_ref_model, a.padding_free) == (
        ["dpo", "ipo", "sft"], [0.8, 0.2, 1.0], True, False, True, True)


def test_older_trl_names_and_the_trainer_families():
    a = DPOConfig(rpo_alpha=0.5, max_prompt_length=64, warmup_ratio=0.1, evaluation_strategy="steps",
                  logging_steps=5, reference_free=True)
    assert [(t.name, t.weight) for t in a.loss] == [("dpo", 1.0), ("sft", 0.5)]
    assert (a.data.max_prompt_length, a.train.warmup_ratio, a.train.eval_steps) == (64, 0.1, 5)  # eval_steps: logging's
    assert a.reference.strategy == "none"
    assert DPOConfig(warmup_steps=0.1).train.warmup_ratio == 0.1  # transformers 5: a float < 1 is a ratio
    simpo = CPOConfig(loss_type="simpo", simpo_gamma=0.7, cpo_alpha=0.2).loss  # TRL's CPO-SimPO
    assert [(t.name, t.weight) for t in simpo] == [("simpo", 1.0), ("sft", 0.2)] and simpo[0].params["gamma"] == 0.7
    assert CPOConfig(cpo_alpha=0.3).loss[0].params["alpha"] == 0.3
    assert KTOConfig(desirable_weight=1.33).loss[0].params["desirable_weight"] == 1.33
    assert RewardConfig(center_rewards_coefficient=0.01).loss[0].params["center_rewards_coefficient"] == 0.01
    assert SFTConfig(packing=True, dataset_text_field="content").data.columns == {"text": "content"}
    # `trl dpo`'s ModelConfig and ScriptArguments
    m = DPOConfig(model_name_or_path="org/m", dtype="bfloat16", use_peft=True, lora_r=8, lora_alpha=16,
                  lora_target_modules=["q_proj", "v_proj"], dataset_name="org/data", dataset_train_split="tr")
    assert m.model.lora == {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    assert (m.model.name_or_path, m.model.dtype, m.data.train, m.data.split) == ("org/m", "bfloat16", "org/data", "tr")
    # a setting of its own says what is meant: LoRA / TR-DPO on (at TRL's default value it is not)
    assert DPOConfig(lora_r=8).model.lora == {"r": 8} and DPOConfig(lora_r=16).model.lora is None
    synced = DPOConfig(ref_model_sync_steps=4).reference
    assert (synced.sync_steps, synced.sync_alpha) == (4, 0.6) and DPOConfig(ref_model_sync_steps=512).reference.sync_steps == 0


def test_cpo_loss_types_and_alphapo_map_to_prefopt_losses():
    """CPOConfig's loss_type hinge/ipo/alphapo and its alpha (AlphaPO's reward shape), as TRL 1.16 reads them."""
    def terms(**kw):
        return [(t.name, t.weight, t.params) for t in CPOConfig(**kw).loss]

    cpo = {"beta": 0.1, "alpha": 1.0, "label_smoothing": 0.0}
    assert terms(loss_type="hinge") == [("cpo", 1.0, {**cpo, "loss": "hinge"})]
    assert terms(loss_type="ipo", beta=0.2, cpo_alpha=0.5) == [("cpo", 1.0, {**cpo, "beta": 0.2, "alpha": 0.5,
                                                                               "loss": "ipo"})]
    assert terms(loss_type="sigmoid") == terms() == [("cpo", 1.0, {**cpo, "loss": "sigmoid"})]  # default unchanged
    # alphapo: SimPO's objective with TRL's alpha as the shape, simpo_gamma as gamma, and no NLL (cpo_alpha = 0)
    alphapo = {"beta": 0.1, "gamma": 0.7, "alpha": 0.25, "label_smoothing": 0.0}
    assert terms(loss_type="alphapo", alpha=0.25, simpo_gamma=0.7, beta=0.1) == [("alphapo", 1.0, alphapo)]
    assert terms(loss_type="alphapo", alpha=0.25, simpo_gamma=0.7, beta=0.1, cpo_alpha=2.0) == [("alphapo", 1.0, alphapo)]
    assert terms(loss_type="alphapo")[0][2]["alpha"] == 0.0  # TRL's alpha default 0: SimPO
    # simpo with alpha: the AlphaPO reward plus cpo_alpha's NLL, as TRL's CPO trainer computes it
    assert terms(loss_type="simpo", alpha=0.3, cpo_alpha=0.2) == [
        ("alphapo", 1.0, {"beta": 0.1, "gamma": 0.5, "alpha": 0.3, "label_smoothing": 0.0}), ("sft", 0.2, {})]  # TRL's defaults
    # TRL's alpha on CPO's own (summed) rewards is not AlphaPO as the paper defines it: refused, saying what to use
    for kw in (dict(alpha=0.3), dict(loss_type="hinge", alpha=0.3), dict(loss_type="ipo", alpha=0.3)):
        with pytest.raises(ConfigError, match="use loss_type='alphapo'"):
            CPOConfig(**kw)
    with pytest.raises(ConfigError, match="alpha=0.3 is CPOConfig's AlphaPO reward shape"):
        DPOConfig(alpha=0.3)
    assert CPOConfig(alpha=0.0).loss[0].name == "cpo"  # TRL's default is accepted
    with pytest.raises(ConfigError, match="label_smoothing=0.1 applies to loss: sigmoid only"):
        CPOConfig(loss_type="hinge", label_smoothing=0.1)  # TRL warns and ignores it


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_liger_kernel=True), "use_liger_kernel=True is not supported by prefopt: model.lm_head: fused"),
    (dict(optim="adafactor"), "prefopt trains with torch.optim.AdamW"),
    (dict(load_best_model_at_end=True), "final/ is the last model"),
    (dict(deepspeed="ds.json"), "accelerate launch --config_file"),
    (dict(torch_compile=True), "recompiles"),
    (dict(sync_ref_model=False, ref_model_sync_steps=4), "ref_model_sync_steps=4 with sync_ref_model=False: TR-DPO"),
    (dict(use_peft=False, lora_r=8), "lora_r=8 with use_peft=False: LoRA is off"),
    (dict(truncation_mode="middle"), "expected keep_start or keep_end"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights has 1 values for 2 loss types"),
    (dict(loss_type="sft", beta=0.5), "beta=0.5: none of the losses \\['sft'\\] has this parameter"),
    (dict(gradient_checkpointing_kwargs={"use_reentrant": True}), "non-reentrantly"),
    (dict(model_init_kwargs={"device_map": "auto"}), "model_init_kwargs: 'device_map' is not supported"),
    (dict(bf16=True, fp16=True), "choose one mixed precision"),
    (dict(eval_strategy="best"), "eval_strategy='best': prefopt supports steps, epoch, no"),
    (dict(hub_token="hf_x"), "never writes it into config.yaml"),
    (dict(max_length=None), "prefopt needs a maximum length"),
    (dict(learnig_rate=1e-5), "did you mean 'learning_rate'"),
])
def test_refusals_say_why_and_what_instead(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DPOConfig(**kwargs)


def test_no_effect_fields_are_accepted_and_said(caplog):
    with caplog.at_level(logging.INFO, logger="prefopt"):
        a = DPOConfig(dataloader_num_workers=4, remove_unused_columns=False)
    said = " ".join(r.message for r in caplog.records)
    assert "dataloader_num_workers=4 has no effect in prefopt" in said and "remove_unused_columns=False" in said
    assert a.dataloader_num_workers == 4 and a.remove_unused_columns is False  # read back as passed


def test_a_field_alone_never_resets_what_was_set_before_it():
    """Set one at a time (attributes, command-line flags), TRL's fields keep the earlier settings."""
    a = DPOConfig(eval_steps=50, logging_steps=5, beta=0.5)
    a.eval_strategy = "steps"
    a.save_steps = 100
    a.save_strategy = "steps"
    a.loss_type = "ipo"
    assert (a.train.eval_steps, a.train.save_steps, a.loss[0].name, a.loss[0].params["beta"]) == (50, 100, "ipo", 0.5)
    b = DPOConfig(logging_steps=5)
    b.eval_strategy = "steps"
    assert b.train.eval_steps == 5  # TRL: eval_steps defaults to logging_steps
    from prefopt.config import load_config

    c = load_config(None, ["eval_steps=20", "eval_strategy=steps", "beta=0.5", "loss_type=ipo", "lora_r=8",
                           "use_peft=true", "ref_model_mixup_alpha=0.9", "sync_ref_model=true"])
    assert (c.train.eval_steps, c.loss[0].name, c.loss[0].params["beta"], c.model.lora) == (20, "ipo", 0.5, {"r": 8})
    assert (c.reference.sync_steps, c.reference.sync_alpha) == (512, 0.9)
    # TRL's beta (0.1, shared by every loss type) when a loss type is named without one
    assert DPOConfig(loss_type="sigmoid_norm").loss[0].params["beta"] == 0.1


def test_setting_a_flat_name_rebuilds_the_config():
    a = DPOConfig(output_dir="o", beta=0.2)
    a.learning_rate = 3e-5
    a.gradient_checkpointing = True
    a.beta = 0.4
    a.bf16 = True
    assert (a.train.learning_rate, a.model.gradient_checkpointing, a.loss[0].params["beta"]) == (3e-5, True, 0.4)
    assert a.train.mixed_precision == "bf16" and a.output_dir == "o"


def test_readme_table_lists_every_field():
    text = README.read_text()
    for name, _, _ in table_rows():
        assert f"| `{name}` |" in text, name
    for name in (*LOSS_PARAMS, *LORA, "use_peft"):
        assert f"`{name}`" in text, name
