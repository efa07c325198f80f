"""Reference strategies: the precomputed cache equals the live reference, is keyed and
checksummed; LoRA's adapter-disabled base equals the base model; checkpoints and saved models
of a LoRA run; QLoRA's errors on a machine without CUDA (and a real run where there is one)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prefopt import DPOConfig, DPOTrainer
from prefopt.errors import ConfigError
from prefopt.logps import score_batch

SHORT = dict(max_length=64, max_prompt_length=32, logging_steps=1, progress_bar=False)
LORA = {"r": 4, "alpha": 8}


def dpo(tiny_model_dir, records, out, eval_records=None, **kw):
    return DPOTrainer(str(tiny_model_dir), None, train_dataset=records, eval_dataset=eval_records,
                      args=DPOConfig(output_dir=str(out), **{**SHORT, **kw}))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    return load_file(out / "final" / "model.safetensors")


# ------------------------------------------------------------------- precomputed

@pytest.mark.parametrize("loss", ["dpo", {"name": "ipo", "ld_alpha": 0.5}, "kto"])
def test_precomputed_reference_trains_like_the_live_one(tiny_model_dir, demo_records, tmp_path, loss):
    """Same losses step by step and the same final weights (fp32 noise) as the live reference;
    LD-DPO reads cached per-token log-probs, KTO its cached mismatched rows."""
    common = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, loss=loss)
    data = demo_records[:8]
    dpo(tiny_model_dir, data, tmp_path / "live", **common).train()
    pre = dpo(tiny_model_dir, data, tmp_path / "pre", reference={"strategy": "precomputed"}, **common)
    pre.train()
    live_rows, pre_rows = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
    for a, b in zip(live_rows, pre_rows):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b.get("rewards/margins", 0) == pytest.approx(a.get("rewards/margins", 0), abs=1e-4)
    if loss == "dpo":
        assert pre_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    a, b = final_weights(tmp_path / "live"), final_weights(tmp_path / "pre")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    strategy = pre.job.objective.reference
    assert strategy.name == "precomputed" and strategy.source.model is None  # the model was freed


def test_cached_values_equal_live_reference_scores(tiny_model_dir, demo_records, tmp_path):
    t = dpo(tiny_model_dir, demo_records[:6], tmp_path, reference={"strategy": "precomputed"},
            per_device_train_batch_size=3, max_steps=1)
    job = t.setup()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for batch in job.train_loader:
        cached = job.objective.reference.scores(batch)
        with torch.no_grad():
            live = score_batch(ref, batch)
        assert torch.allclose(cached.logps, live.logps, atol=1e-4)
        assert torch.allclose(cached.token_logps, live.token_logps, atol=1e-5)


def test_cache_is_reused_rekeyed_and_checksummed(tiny_model_dir, demo_records, tmp_path, caplog):
    cache = tmp_path / "cache"
    ref = {"strategy": "precomputed", "cache_dir": str(cache)}

    def run(out, data, **kw):
        t = dpo(tiny_model_dir, data, tmp_path / out, reference=ref, max_steps=1, per_device_train_batch_size=4, **kw)
        t.train()
        return t.job.objective.reference.folder

    first = run("a", demo_records[:8])
    data_file = first / "logps.safetensors"
    stamp = data_file.stat().st_mtime_ns
    assert run("b", demo_records[:8], learning_rate=1e-3) == first and data_file.stat().st_mtime_ns == stamp
    assert run("c", demo_records[:9]) != first                              # other data: another key
    assert run("d", demo_records[:8], max_length=48) != first               # other tokenisation
    assert run("e", demo_records[:8], layout="padded") != first             # other layout
    assert len(list(cache.iterdir())) == 4  # a and b share one folder; c, d, e have their own
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["examples"] == 8 and manifest["roles"] == ["chosen", "rejected"]
    # a corrupt file is detected by its checksum and recomputed, never used
    raw = bytearray(data_file.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"
    data_file.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="prefopt"):
        assert run("f", demo_records[:8]) == first
    assert "checksum does not match" in caplog.text
    assert data_file.read_bytes() != bytes(raw)  # rewritten


def test_precomputed_refuses_token_level_losses_before_computing(tiny_model_dir, demo_records, tmp_path):
    with pytest.raises(ConfigError, match="cannot serve token-level losses"):
        dpo(tiny_model_dir, demo_records[:4], tmp_path, loss="tdpo1", reference={"strategy": "precomputed"},
            max_steps=1).train()
    assert not (tmp_path / "reference_cache").exists()


def test_precomputed_resume_gives_identical_weights(tiny_model_dir, demo_records, tmp_path):
    common = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                  reference={"strategy": "precomputed", "cache_dir": str(tmp_path / "cache")})
    dpo(tiny_model_dir, demo_records[:8], tmp_path / "full", save_steps=2, **common).train()
    dpo(tiny_model_dir, demo_records[:8], tmp_path / "resumed",
        resume_from=str(tmp_path / "full" / "checkpoints" / "step-2"), **common).train()
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_uses_the_cached_reference(tiny_model_dir, demo_records, tmp_path):
    t = dpo(tiny_model_dir, demo_records[:8], tmp_path, demo_records[8:12], reference={"strategy": "precomputed"},
            max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3)
    result = t.train()
    assert result.metrics["eval_rewards/margins"] != 0.0  # against the trained policy it would be exactly 0
    assert t.evaluate(on="train")["eval_rewards/margins"] != 0.0


# ------------------------------------------------------------------- LoRA

def test_lora_reference_is_the_base_model_and_only_adapters_train(tiny_model_dir, demo_records, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    t = dpo(tiny_model_dir, demo_records[:8], tmp_path, lora=LORA, max_steps=4, per_device_train_batch_size=4,
            learning_rate=5e-3, save_steps=2)
    t.train()
    rows = metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["rewards/margins"] != 0.0
    job = t.job
    assert job.objective.reference.name == "lora"
    batch = next(iter(job.train_loader))
    with torch.no_grad():
        disabled = job.objective.reference.scores(batch)
        plain = score_batch(base, batch)
        trained = score_batch(job.model, batch)
    assert torch.allclose(disabled.logps, plain.logps, atol=1e-4)   # adapters off == the base model
    assert not torch.allclose(trained.logps, plain.logps, atol=1e-3)  # and the adapters did train
    policy = job.accelerator.unwrap_model(job.model)
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in policy.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_now[k], v) for k, v in base.state_dict().items() if k in base_now)
    # a checkpoint holds the adapters only (plus optimizer state), never the frozen base
    ckpt = tmp_path / "checkpoints" / "step-2"
    keys = load_file(ckpt / "model.safetensors").keys()
    assert keys and all("lora_" in k for k in keys)
    assert (ckpt / "adapter_model.safetensors").is_file()


def test_lora_saves_an_adapter_or_merged_weights_that_reload_exactly(tiny_model_dir, demo_records, tmp_path):
    from peft import PeftModel

    for merge in (False, True):
        out = tmp_path / f"merge-{merge}"
        t = dpo(tiny_model_dir, demo_records[:8], out, lora=LORA, max_steps=3, per_device_train_batch_size=4,
                learning_rate=5e-3, merge_lora=merge)
        t.train()
        batch = next(iter(t.job.train_loader))
        with torch.no_grad():
            trained = score_batch(t.job.model, batch).logps
            if merge:
                reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
            else:
                reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final")
            again = score_batch(reloaded, batch).logps
        assert torch.allclose(trained, again, atol=1e-4), merge


def test_lora_resume_gives_identical_adapters(tiny_model_dir, demo_records, tmp_path):
    common = dict(max_steps=4, per_device_train_batch_size=2, learning_rate=5e-3, lora=LORA)
    dpo(tiny_model_dir, demo_records[:8], tmp_path / "full", save_steps=2, **common).train()
    dpo(tiny_model_dir, demo_records[:8], tmp_path / "resumed",
        resume_from=str(tmp_path / "full" / "checkpoints" / "step-2"), **common).train()
    a = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peft_config_argument_and_peft_model_match_the_yaml_key(tiny_model_dir, demo_records, tmp_path):
    from peft import LoraConfig, get_peft_model

    from helpers import first_step_gradient

    common = dict(per_device_train_batch_size=4, max_steps=1)
    yaml_style = first_step_gradient(dpo(tiny_model_dir, demo_records[:4], tmp_path / "a", lora=LORA, **common))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trl_style = DPOTrainer(str(tiny_model_dir), None, train_dataset=demo_records[:4], peft_config=config,
                           args=DPOConfig(output_dir=str(tmp_path / "b"), **SHORT, **common))
    assert trl_style.config.model.lora["r"] == 4
    torch.manual_seed(42)  # the run's seed: LoRA's A is drawn from it in the other two paths
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    given = DPOTrainer(model, None, train_dataset=demo_records[:4],
                       args=DPOConfig(output_dir=str(tmp_path / "c"), tokenizer=str(tiny_model_dir), **SHORT, **common))
    grads = [yaml_style, first_step_gradient(trl_style), first_step_gradient(given)]
    assert grads[0].abs().max() > 0
    assert all(torch.allclose(g, grads[0], atol=1e-7) for g in grads)
    assert given.job.objective.reference.name == "lora"


@pytest.mark.parametrize("kw, message", [
    (dict(lora=LORA, load_in_4bit=True), "needs a CUDA GPU"),
    (dict(load_in_4bit=True), "set model.lora"),
    (dict(lora={"r": 4, "lora_alhpa": 8}), r"unknown LoRA option 'lora_alhpa' \(did you mean 'lora_alpha'\?\)"),
    (dict(lora=LORA, reference={"strategy": "lora", "name_or_path": "x"}), "needs reference.strategy=model"),
    (dict(reference={"strategy": "lora"}), "needs a LoRA policy"),
])
def test_lora_and_qlora_option_errors(tiny_model_dir, demo_records, tmp_path, kw, message):
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=message):
        dpo(tiny_model_dir, demo_records[:4], tmp_path, max_steps=1, **kw).train()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_trains_on_a_gpu(tiny_model_dir, demo_records, tmp_path):
    pytest.importorskip("bitsandbytes")
    t = dpo(tiny_model_dir, demo_records[:8], tmp_path, lora=LORA, load_in_4bit=True, max_steps=3,
            per_device_train_batch_size=4, learning_rate=5e-3, mixed_precision="bf16")
    t.train()
    rows = metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and math.isfinite(rows[-1]["loss"])
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_checkpoint_hook_drops_frozen_weights_by_the_wrapped_names(tiny_model_dir):
    """Names are matched without DDP's 'module.' prefix (either side may carry it); FSDP/DeepSpeed
    save through their own code and hand the hook no weights at all."""
    from peft import LoraConfig, get_peft_model

    from prefopt.lora import without_frozen_weights

    class Wrapped(torch.nn.Module):  # what DDP looks like to named_parameters / state_dict
        def __init__(self, module):
            super().__init__()
            self.module = module

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    wrapped = Wrapped(policy)
    weights = [wrapped.state_dict()]
    without_frozen_weights([wrapped], weights, "unused")
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert set(weights[0]) == trainable and all(k.startswith("module.") and "lora_" in k for k in weights[0])
    weights = [policy.state_dict()]  # unprefixed keys, prefixed parameter names
    without_frozen_weights([wrapped], weights, "unused")
    assert weights[0] and all("lora_" in k for k in weights[0])
    empty: list = []
    without_frozen_weights([wrapped], empty, "unused")  # FSDP / DeepSpeed: nothing to filter
    assert empty == []
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weights = [full.state_dict()]
    without_frozen_weights([full], weights, "unused")  # nothing frozen: every key stays
    assert weights[0].keys() == full.state_dict().keys()


def test_resume_refuses_a_checkpoint_without_this_models_adapters(tiny_model_dir, demo_records, tmp_path):
    common = dict(per_device_train_batch_size=2, learning_rate=5e-3)
    dpo(tiny_model_dir, demo_records[:4], tmp_path / "a", lora=LORA, max_steps=2, save_steps=2, **common).train()
    step2 = tmp_path / "a" / "checkpoints" / "step-2"
    resume = dict(max_steps=4, resume_from=str(step2), **common)
    # the checkpoint's config names the difference first
    with pytest.raises(ConfigError, match=r"another run's checkpoint; these settings differ:\n  model.lora: "
                                          r"checkpoint \{'r': 4, 'alpha': 8\}, now \{'r': 8, 'alpha': 8\}"):
        dpo(tiny_model_dir, demo_records[:4], tmp_path / "b", lora={**LORA, "r": 8}, **resume).train()
    # a checkpoint whose config was edited to match is still refused by its weights
    config = step2 / "config.yaml"
    config.write_text(config.read_text().replace("r: 4", "r: 8"))
    from prefopt.train.checkpoint import write_manifest
    write_manifest(step2)
    with pytest.raises(ConfigError, match=r"holds 28 parameter\(s\) of another shape .*\[4, 64\] \(model: \[8, 64\]\)"):
        dpo(tiny_model_dir, demo_records[:4], tmp_path / "b", lora={**LORA, "r": 8}, **resume).train()
    config.write_text(config.read_text().replace("r: 8", "r: 4").replace("\n  lora:\n", "\n  lora:\n    modules_to_save: [lm_head]\n"))
    write_manifest(step2)
    with pytest.raises(ConfigError, match="the checkpoint lacks .* trainable parameter"):
        dpo(tiny_model_dir, demo_records[:4], tmp_path / "c", lora={**LORA, "modules_to_save": ["lm_head"]},
            **resume).train()


def test_lora_reference_refuses_adapters_that_already_change_the_policy(tiny_model_dir, demo_records, tmp_path):
    """A LoRA-SFT policy passed in: its base is not the initial policy, so the adapter-disabled
    reference would be wrong (the step-0 loss would not be ln 2); a frozen copy works."""
    from peft import LoraConfig, get_peft_model

    def trained_adapter():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        return model

    def run(out, **kw):
        return DPOTrainer(trained_adapter(), None, train_dataset=demo_records[:4],
                          args=DPOConfig(output_dir=str(tmp_path / out), tokenizer=str(tiny_model_dir), max_steps=1,
                                         per_device_train_batch_size=2, **SHORT, **kw))

    with pytest.raises(ConfigError, match="adapters already change its log-probs"):
        run("auto").train()
    run("copy", reference={"strategy": "model"}).train()
    assert metrics(tmp_path / "copy")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
