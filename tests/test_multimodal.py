"""Multi-modal DPO (prefopt.vlm): a tiny LLaVA built locally, generated coloured-shape images.

The test that matters: DPO on "What colour is the shape?" pairs raises the reward accuracy on
*held-out* pairs with new images when the images show the shapes, and not when every image is
blank (the colour cannot be seen).
"""
import json
from pathlib import Path

import pytest
import torch

from prefopt import DPOConfig, DPOTrainer
from prefopt.config import DataConfig, load_config
from prefopt.data.collate import make_collator
from prefopt.data.pipeline import prepare_datasets
from prefopt.demo.shapes import write_shapes
from prefopt.errors import ConfigError, DataError
from prefopt.models import load_tokenizer, save_pretrained, train_tokenizer
from prefopt.trainer import Trainer
from prefopt.vlm import build_tiny_vlm, with_processor

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(max_length=64, logging_steps=1, progress_bar=False, beta=0.1, seed=0, save_steps=0)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    """A saved random LLaVA: 1-layer CLIP vision tower (32x32 images, 8x8 patches: 16 image tokens),
    2-layer 32-wide Llama, LlavaProcessor with a locally trained tokenizer plus <image>."""
    tok = train_tokenizer(["What colour is the shape? red green blue square circle"] * 20, vocab_size=300)
    model, processor = build_tiny_vlm(tok, seed=0)
    return save_pretrained(model, with_processor(processor), tmp_path_factory.mktemp("vlm") / "llava")


def encoded(vlm_dir, records, **data):
    tok = load_tokenizer(str(vlm_dir))
    cfg = DataConfig(max_length=64, **data)
    train, _ = prepare_datasets(cfg, tok, "paired", train_source=records)
    return tok, train


def test_collated_pair_carries_its_image_and_scores_completion_tokens_only(vlm_dir, tmp_path):
    data = write_shapes(tmp_path, 1, seed=0)
    tok, train = encoded(vlm_dir, str(data))
    (ex,) = train.examples
    image_token = tok.convert_tokens_to_ids("<image>")
    assert ex.prompt_ids.count(image_token) == 16                 # expanded by the processor: 4x4 patches
    assert ex.media["pixel_values"].shape == (1, 3, 32, 32)
    record = json.loads(data.read_text())
    for role in ("chosen", "rejected"):  # the colour word and EOS: nothing of the prompt
        assert tok.decode(ex.completions[role]) == record[role]["value"] + "<|im_end|>"
    padded = make_collator("padded", tok.pad_token_id, ("chosen", "rejected"))([ex])
    assert padded.media["pixel_values"].shape == (2, 3, 32, 32)   # one image per row
    assert torch.equal(padded.media["pixel_values"][0], padded.media["pixel_values"][1])
    p = len(ex.prompt_ids)
    nc, nr = len(ex.completions["chosen"]), len(ex.completions["rejected"])
    assert padded.token_row.tolist() == [0] * nc + [1] * nr
    assert padded.token_pos.tolist() == list(range(p - 1, p - 1 + nc)) + list(range(p - 1, p - 1 + nr))
    assert padded.token_target.tolist() == ex.completions["chosen"] + ex.completions["rejected"]
    assert image_token not in padded.token_target.tolist()
    shared = make_collator("shared", tok.pad_token_id, ("chosen", "rejected"))([ex])
    assert shared.media["pixel_values"].shape == (1, 3, 32, 32)   # the prompt, and its image, once per pair
    assert shared.input_ids.shape == (1, p + nc + nr)
    assert shared.token_target.tolist() == padded.token_target.tolist()


def test_bad_images_are_file_line_messages_or_counted_skips(vlm_dir, tmp_path):
    write_shapes(tmp_path, 1, seed=0)
    (tmp_path / "images" / "broken.png").write_text("not a png")
    good = {"conversations": [{"from": "human", "value": "<image>What colour is the shape?"}],
            "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"},
            "images": ["images/shapes_0000.png"]}
    lines = [good, {**good, "images": ["images/missing.png"]}, {**good, "images": ["images/broken.png"]},
             {**good, "images": ["images/shapes_0000.png", "images/shapes_0000.png"]}]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(DataError, match=rf"{data}:2.*no such file .*missing.png"):
        encoded(vlm_dir, str(data))
    _, train = encoded(vlm_dir, str(data), on_error="skip")
    assert len(train.examples) == 1
    assert dict(train.report.rejected) == {"missing_image": 1, "unreadable_image": 1, "image_placeholders": 1}
    where = {r["reason"]: r["where"] for r in train.report.rejects}
    assert where == {"missing_image": f"{data}:2", "unreadable_image": f"{data}:3", "image_placeholders": f"{data}:4"}
    # TRL's layout: an images column on conversational records, image content parts
    trl = [{"images": [str(tmp_path / "images" / "shapes_0000.png")],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
            "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}]}]
    _, train = encoded(vlm_dir, trl)
    assert train.examples[0].media["pixel_values"].shape == (1, 3, 32, 32)


def test_vlm_loads_with_lora_on_the_language_model_and_a_frozen_vision_tower(vlm_dir, tmp_path):
    data = write_shapes(tmp_path, 8, seed=0)
    trainer = DPOTrainer(str(vlm_dir), None, train_dataset=str(data), args=DPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, lora={"r": 4}, **RUN))
    job = trainer.setup()
    trainable = [n for n, p in job.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert type(job.model.get_base_model()).__name__ == "LlavaForConditionalGeneration"


def shapes_accuracy(vlm_dir, folder, blank):
    train = write_shapes(folder, 36, seed=1, blank=blank, name="train.jsonl")
    held_out = write_shapes(folder, 24, seed=2, blank=blank, name="eval.jsonl")  # new images
    trainer = DPOTrainer(str(vlm_dir), None, train_dataset=str(train), eval_dataset=str(held_out), args=DPOConfig(
        output_dir=str(folder / "out"), learning_rate=5e-3, max_steps=12, per_device_train_batch_size=8,
        lora={"r": 8, "alpha": 16}, eval_steps=0, **RUN))
    before = trainer.evaluate()["eval_rewards/accuracies"]
    trainer.train()
    return before, trainer.evaluate()["eval_rewards/accuracies"], trainer._collator.layout


def test_dpo_learns_the_colour_from_the_image_and_not_from_a_blank_one(vlm_dir, tmp_path):
    before, real, layout = shapes_accuracy(vlm_dir, tmp_path / "real", blank=False)
    _, blank, _ = shapes_accuracy(vlm_dir, tmp_path / "blank", blank=True)
    print(f"held-out reward accuracy: before {before}, real images {real}, blank images {blank}; layout {layout}")
    assert before == 0.0          # policy == reference: every margin is 0, no pair ranked right
    assert real >= 0.8
    assert blank <= 0.65          # chance: the colour cannot be seen
    assert layout == "shared"     # the probe found the shared layout exact for LLaVA


def test_shipped_multimodal_config_trains_two_steps(vlm_dir, tmp_path):
    data = write_shapes(tmp_path / "shapes", 12, seed=0)
    path = ROOT / "configs" / "multimodal" / "dpo.yaml"
    config = load_config(path, [f"model.name_or_path={vlm_dir}", f"output_dir={tmp_path / 'out'}",
                                f"data.train={data}", "train.max_steps=2", "train.per_device_train_batch_size=4",
                                "train.eval_steps=0", "train.progress_bar=false", "train.logging_steps=1"])
    Trainer.from_config(config).train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "final" / "processor_config.json").is_file()


def precomputed_setup(model_dir, data, out, cache):
    trainer = DPOTrainer(str(model_dir), None, train_dataset=str(data), args=DPOConfig(
        output_dir=str(out), max_steps=1, per_device_train_batch_size=2,
        reference={"strategy": "precomputed", "cache_dir": str(cache)}, **RUN))
    job = trainer.setup()
    return [ex.uid for ex in trainer._train_set.examples], job.objective.reference.folder


def test_reference_cache_key_survives_moving_the_data_and_changes_with_the_processor(vlm_dir, tmp_path, caplog):
    """The example ids hash the images' pixels, not their paths, so a moved data folder finds its
    cached reference log-probs; the processor's settings are in the key, so a processor that
    resizes differently (same token ids, other pixel values) does not reuse them."""
    import shutil

    data = write_shapes(tmp_path / "here", 4, seed=0)
    cache = tmp_path / "ref_cache"
    uids, folder = precomputed_setup(vlm_dir, data, tmp_path / "out1", cache)
    shutil.move(str(tmp_path / "here"), str(tmp_path / "moved"))
    with caplog.at_level("INFO", logger="prefopt"):
        moved_uids, moved_folder = precomputed_setup(vlm_dir, tmp_path / "moved" / data.name, tmp_path / "out2", cache)
    assert moved_uids == uids and moved_folder == folder
    assert f"reference log-probs: 4 examples from the cache {folder}" in caplog.messages
    resized = tmp_path / "resized"
    shutil.copytree(vlm_dir, resized)
    config = json.loads((resized / "processor_config.json").read_text())
    images = config["image_processor"]
    assert images["size"] == {"shortest_edge": 32}
    images["size"] = {"shortest_edge": 48}  # resized to 48 then centre-cropped to 32: new pixels, same tokens
    (resized / "processor_config.json").write_text(json.dumps(config))
    resized_uids, resized_folder = precomputed_setup(resized, tmp_path / "moved" / data.name, tmp_path / "out3", cache)
    assert resized_uids == uids                 # the same token ids and images...
    assert resized_folder.parent == folder.parent and resized_folder != folder   # ...but another cache


@pytest.fixture
def image_server(tmp_path):
    """A local HTTP server (a thread) serving tmp_path; yields its base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_images_given_as_urls_are_downloaded_and_unreachable_ones_are_file_line_problems(vlm_dir, tmp_path,
                                                                                          image_server):
    data = write_shapes(tmp_path, 1, seed=0)
    local = json.loads(data.read_text())
    port = closed_port()
    lines = [{**local, "images": [f"{image_server}/{local['images'][0]}"]},
             {**local, "images": [f"http://127.0.0.1:{port}/images/shapes_0000.png"]},
             {**local, "images": [f"{image_server}/images/missing.png"]}]
    remote = tmp_path / "remote.jsonl"
    remote.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(DataError, match=rf"^{remote}:2: \[sharegpt\] images\[0\]: cannot download "
                                        rf"http://127.0.0.1:{port}/images/shapes_0000.png \(Connection refused\)"):
        encoded(vlm_dir, str(remote))
    _, train = encoded(vlm_dir, str(remote), on_error="skip")
    assert dict(train.report.rejected) == {"unreachable_image": 2}
    messages = {r["where"]: r["problem"] for r in train.report.rejects}
    assert messages[f"{remote}:3"] == (f"[sharegpt] images[0]: cannot download {image_server}/images/missing.png "
                                       f"(HTTP 404 File not found)")
    _, from_file = encoded(vlm_dir, str(data))
    (by_url,), (by_path,) = train.examples, from_file.examples
    assert torch.equal(by_url.media["pixel_values"], by_path.media["pixel_values"])
    assert by_url.prompt_ids == by_path.prompt_ids and by_url.uid == by_path.uid   # the same pixels, the same id


VISION = ("model.vision_tower.", "model.multi_modal_projector.")


def setup_vision(vlm_dir, tmp_path, **args):
    """The prepared policy and the gradients one backward pass through a batch of two image pairs gives."""
    from prefopt.logps import score_batch

    data = write_shapes(tmp_path / "shapes", 4, seed=0)
    trainer = DPOTrainer(str(vlm_dir), None, train_dataset=str(data), args=DPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, **RUN, **args))
    job = trainer.setup()
    batch = trainer._collator(trainer._train_set.examples[:2])
    score_batch(job.model, batch, job.objective.scoring).logps.sum().backward()
    params = dict(job.model.named_parameters())
    grads = {n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    return params, grads


def base_names(vlm_dir):
    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(str(vlm_dir))
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    return {n for n, _ in model.named_parameters()}, linear


def lora_params(modules):
    return {f"base_model.model.{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}


def test_train_vision_false_freezes_exactly_the_vision_tower_and_projector(vlm_dir, tmp_path):
    names, _ = base_names(vlm_dir)
    vision = {n for n in names if n.startswith(VISION)}
    assert len(vision) == 27   # CLIP: embeddings 3, pre-norm 2, one layer 16, post-norm 2; projector 4
    params, grads = setup_vision(vlm_dir, tmp_path)
    assert {n for n, p in params.items() if not p.requires_grad} == vision
    assert {n for n, p in params.items() if p.requires_grad} == names - vision
    assert not grads & vision and "model.language_model.layers.0.self_attn.q_proj.weight" in grads


def test_train_vision_true_trains_the_vision_tower_and_projector(vlm_dir, tmp_path):
    names, _ = base_names(vlm_dir)
    params, grads = setup_vision(vlm_dir, tmp_path, train_vision=True)
    assert {n for n, p in params.items() if p.requires_grad} == names
    reached = {n for n in names if n.startswith(VISION)} & grads
    # every vision parameter the features pass through gets a gradient; CLIP's post-layernorm is not
    # read (LLaVA takes the last hidden state before it)
    assert reached == {n for n in names if n.startswith(VISION) and ".post_layernorm." not in n}


def test_lora_adapts_the_language_model_only_unless_train_vision(vlm_dir, tmp_path):
    _, linear = base_names(vlm_dir)
    language = {m for m in linear if m.startswith("model.language_model.")}
    vision = {m for m in linear if m.startswith(VISION)}
    assert linear == language | vision and vision
    params, _ = setup_vision(vlm_dir, tmp_path / "a", lora={"r": 4})
    assert {n for n, p in params.items() if p.requires_grad} == lora_params(language)
    # a list of names is restricted to the language model too (CLIP's attention has a q_proj and v_proj)
    params, _ = setup_vision(vlm_dir, tmp_path / "b", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert {n for n, p in params.items() if p.requires_grad} == \
        lora_params(m for m in language if m.endswith(("q_proj", "v_proj")))
    assert not any(n.startswith("base_model.model.model.vision_tower") and "lora_" in n for n in params)
    # train_vision: adapters on the vision tower's and projector's linear layers too, and they learn
    params, grads = setup_vision(vlm_dir, tmp_path / "c", lora={"r": 4}, train_vision=True)
    assert {n for n, p in params.items() if p.requires_grad} == lora_params(language | vision)
    assert {n for n in grads if n.endswith("lora_B.default.weight")} == \
        {n for n in lora_params(language | vision) if "lora_B" in n}   # lora_A's is 0 while B is 0 (peft's init)


def test_lora_target_lists_take_dotted_and_full_paths_and_refuse_what_is_not_the_language_model(vlm_dir, tmp_path):
    _, linear = base_names(vlm_dir)
    first_q = sorted(m for m in linear if m.startswith("model.language_model.") and m.endswith("q_proj"))[0]
    params, _ = setup_vision(vlm_dir, tmp_path / "a", lora={"r": 4, "target_modules": ["self_attn.v_proj", first_q]})
    assert {n for n, p in params.items() if p.requires_grad} == lora_params(
        {first_q} | {m for m in linear if m.startswith("model.language_model.") and m.endswith("self_attn.v_proj")})
    for target in ("lm_head", "no_such_layer"):  # before: left out without a word when other names matched
        with pytest.raises(ConfigError, match=f"'{target}' names no linear layer of the language model"):
            setup_vision(vlm_dir, tmp_path / target, lora={"r": 4, "target_modules": ["q_proj", target]})


def two_prompts(folder):
    """Two shapes records, the second with a longer question (a left-padded batch)."""
    data = write_shapes(folder, 2, seed=0)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[1]["conversations"][0]["value"] = "<image>What colour is the shape in this picture?"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data, records


def test_generate_from_image_prompts_passes_the_pixels(vlm_dir, tmp_path):
    """``prefopt generate`` on image prompts: each prompt is the processor's (image tokens expanded),
    the batch's pixel values reach ``generate``, and the greedy samples are exactly those of
    transformers' own pipeline on each prompt alone; the records list the images."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from prefopt.cli import main
    from prefopt.generate import finish

    data, records = two_prompts(tmp_path)
    out = tmp_path / "gen"
    assert main(["generate", f"model.name_or_path={vlm_dir}", f"generate.prompts={data}", f"output_dir={out}",
                 "generate.temperature=0", "generate.max_new_tokens=5", "data.max_length=64",
                 "train.progress_bar=false"]) == 0
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    processor = AutoProcessor.from_pretrained(str(vlm_dir))
    model = LlavaForConditionalGeneration.from_pretrained(str(vlm_dir)).eval()
    for line, record in zip(lines, records):
        image = tmp_path / record["images"][0]
        assert line["images"] == [str(image)]
        text = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": record["conversations"][0]["value"]}], tokenize=False,
            add_generation_prompt=True)
        inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt",
                           add_special_tokens=False)
        width = inputs["input_ids"].shape[1]
        assert line["prompt_tokens"] == width == len(processor.tokenizer(text)["input_ids"]) + 15  # 16 image tokens
        with torch.no_grad():
            new = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                                 eos_token_id=processor.tokenizer.eos_token_id)[0, width:].tolist()
        expected = finish(new, processor.tokenizer, processor.tokenizer.eos_token_id, [], 5)
        assert line["completions"] == [{"text": expected.text, "num_tokens": expected.num_tokens,
                                        "finish_reason": expected.finish_reason}]


def test_spin_samples_with_the_images_and_its_pairs_carry_them(vlm_dir, tmp_path):
    from prefopt.cli import main

    data = write_shapes(tmp_path / "shapes", 4, seed=0)
    out = tmp_path / "spin"
    assert main(["spin", f"model.name_or_path={vlm_dir}", f"data.train={data}", f"output_dir={out}", "spin.iterations=1",
                 "data.max_length=64", "train.progress_bar=false", "train.max_steps=1",
                 "train.per_device_train_batch_size=2", "generate.max_new_tokens=4", "generate.seed=5"]) == 0
    records = [json.loads(x) for x in data.read_text().splitlines()]
    gens = [json.loads(x) for x in (out / "iter-1" / "generations.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / "iter-1" / "pairs.jsonl").read_text().splitlines()]
    images = [[str(tmp_path / "shapes" / r["images"][0])] for r in records]
    assert [g["images"] for g in gens] == images
    assert gens[0]["prompt_tokens"] > 16 and pairs
    assert [p["images"] for p in pairs] == [images[p["record_index"]] for p in pairs]
    assert all(p["prompt"][0]["content"] == "<image>What colour is the shape?" for p in pairs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][0]["pairs"] == len(pairs)


def test_methods_that_judge_samples_refuse_image_prompts(vlm_dir, tmp_path, capsys):
    from prefopt.cli import main

    data = write_shapes(tmp_path / "shapes", 2, seed=0)
    common = [f"model.name_or_path={vlm_dir}", "train.progress_bar=false", "data.max_length=64"]
    assert main(["iterative", *common, f"generate.prompts={data}", f"output_dir={tmp_path / 'it'}",
                 "generate.num_samples=2"]) == 2
    assert (f"iterative DPO does not take prompts with images (the first is at {data}:1): its judges read the "
            f"text only") in capsys.readouterr().err
    assert main(["eval", *common, f"reference.name_or_path={vlm_dir}", "eval.generate=true",
                 f"generate.prompts={data}", f"output_dir={tmp_path / 'ev'}"]) == 2
    assert f"eval.generate does not take prompts with images (the first is at {data}:1)" in capsys.readouterr().err
    assert main(["generate", *common, f"generate.prompts={data}", f"output_dir={tmp_path / 'g'}",
                 "generate.backend=vllm", "generate.max_new_tokens=4"]) == 2
    assert (f"generate.backend=vllm does not take prompts with images (the first is at {data}:1): prefopt does not "
            f"pass images to vLLM") in capsys.readouterr().err
