"""Multi-modal DPO on a model whose processor does not use ``<image>``: a tiny Qwen2-VL built here.

Qwen2-VL differs from LLaVA in the two ways prefopt must respect: its processor looks for
``<|image_pad|>`` wrapped in ``<|vision_start|>...<|vision_end|>`` (the data writes ``<image>``),
and its language model reads 3-D multi-modal RoPE positions (``get_rope_index``), which prefopt's
packed and prompt-shared rows do not compute.

transformers 5.23 cannot build a ``Qwen2VLProcessor`` without torchvision (not installed here): its
``__init__`` checks the ``video_processor`` argument against ``VideoProcessorMixin``, which
transformers only exports with torchvision, and the Qwen2-VL video processor needs torchvision
itself. ``ImageOnlyQwen2VLProcessor`` accepts ``video_processor=None`` (and saves its image processor
and tokenizer); everything else (the PIL image processor, the token expansion, the model) is
transformers' own.
"""
import json

import pytest
import torch

from prefopt.config import DataConfig
from prefopt.data.collate import make_collator
from prefopt.data.pipeline import prepare_datasets
from prefopt.demo.shapes import write_shapes
from prefopt.models import prepare_tokenizer, train_tokenizer
from prefopt.vlm import image_markup

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
# Qwen2-VL's chat template, reduced: ChatML whose image content parts render as the wrapped pad token.
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
            "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen2_vl(seed: int = 0):
    """(model, processor): a 1-block Qwen2-VL vision tower (4x4 patches, 2x2 merge: a 32x32 image is
    an 8x8 grid, 16 image tokens) and a 2-layer 32-wide Qwen2 language model with mRoPE sections
    [2, 1, 1] (head dim 8); the PIL image processor; a locally trained tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

        def save_pretrained(self, path, **kwargs):  # ProcessorMixin's reads every part's class
            self.image_processor.save_pretrained(path)
            self.tokenizer.save_pretrained(path)

    tok = train_tokenizer(["What colour is the shape? red green blue square circle"] * 20, vocab_size=300)
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    tok.chat_template = TEMPLATE
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                      min_pixels=16 * 16, max_pixels=32 * 32)
    processor = ImageOnlyQwen2VLProcessor(image_processor=images, tokenizer=tok, chat_template=TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, mlp_ratio=2),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config), processor


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_vl()


def encoded(processor, records, **data):
    tok = prepare_tokenizer(processor)
    train, _ = prepare_datasets(DataConfig(max_length=64, **data), tok, "paired", train_source=records)
    return tok, train


def test_image_placeholder_becomes_what_the_qwen2_vl_processor_expects(qwen, tmp_path):
    """``<image>`` in the data becomes the wrapped ``<|image_pad|>`` the chat template renders for an
    image part, and the processor expands it: the prompt ids are exactly those of transformers'
    own pipeline (chat template with an image content part, then the processor)."""
    from PIL import Image

    _, processor = qwen
    assert image_markup(processor) == "<|vision_start|><|image_pad|><|vision_end|>"
    data = write_shapes(tmp_path, 1, seed=0)
    tok, train = encoded(processor, str(data))
    (ex,) = train.examples
    record = json.loads(data.read_text())
    image = Image.open(tmp_path / record["images"][0]).convert("RGB")
    native = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
        tokenize=False, add_generation_prompt=True)
    expected = processor(text=[native], images=[image], return_tensors="pt")
    assert ex.prompt_ids == expected["input_ids"][0].tolist()
    start, pad, end = (tok.convert_tokens_to_ids(t) for t in VISION_TOKENS[:3])
    i = ex.prompt_ids.index(start)
    assert ex.prompt_ids[i:i + 18] == [start] + [pad] * 16 + [end]   # 8x8 patches merged 2x2
    assert sorted(ex.media) == ["image_grid_thw", "pixel_values"]      # no per-token tensors
    assert ex.media["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert torch.equal(ex.media["pixel_values"], expected["pixel_values"])  # (64 patches, 3*2*4*4)
    assert ex.media["pixel_values"].shape == (64, 96)
    for role in ("chosen", "rejected"):
        assert tok.decode(ex.completions[role]) == record[role]["value"] + "<|im_end|>"
    padded = make_collator("padded", tok.pad_token_id, ("chosen", "rejected"))([ex])
    assert padded.media["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]   # the pair's image in each row
    assert padded.media["pixel_values"].shape == (128, 96)


class FakeProcessor:
    """A processor whose image token is ``<|image|>`` and which expands a ``<boi>`` marker itself."""
    image_token = "<|image|>"

    class tokenizer:
        @staticmethod
        def convert_tokens_to_ids(token):
            return 7

    def __init__(self, render=None):
        self.render = render

    def apply_chat_template(self, messages, **kwargs):
        if self.render is None:
            raise ValueError("no chat template")
        return self.render(messages[0]["content"])

    def __call__(self, text, images, **kwargs):
        (text,) = text
        if text.count("<boi>") + text.count("<|image|>") != len(images):
            raise ValueError("image markers and images differ")
        return {"input_ids": torch.tensor([[7] * 4 * len(images)])}


def test_image_markup_is_what_the_template_renders_when_the_processor_takes_it_else_the_image_token():
    def render(parts, image="<boi>"):
        return "".join(p["text"] if p["type"] == "text" else f"\n{image}\n" for p in parts)

    assert image_markup(FakeProcessor(render)) == "<boi>"                        # a marker it expands
    assert image_markup(FakeProcessor(lambda parts: render(parts, "<|image|>"))) == "<|image|>"
    assert image_markup(FakeProcessor()) == "<|image|>"                          # no template
    assert image_markup(FakeProcessor(str)) == "<|image|>"   # a text-only template writes the parts' repr


def own_token_logps(model, ex, role) -> torch.Tensor:
    """transformers' own path, one unpadded sequence: no position ids given, so the model computes
    its 3-D mRoPE positions from the ids, ``image_grid_thw`` and ``mm_token_type_ids``."""
    config = model.config
    ids = torch.tensor([ex.prompt_ids + ex.completions[role]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ex.media["pixel_values"],
                       image_grid_thw=ex.media["image_grid_thw"],
                       mm_token_type_ids=(ids == config.image_token_id).int()).logits[0]
    p, targets = len(ex.prompt_ids), ids[0, len(ex.prompt_ids):]
    return logits[p - 1:-1].float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def test_padded_rows_score_with_the_models_own_mrope_positions(qwen, tmp_path):
    """A padded batch of two pairs (right padding) scores every completion token exactly as the
    model scores that sequence alone with its own 3-D positions. prefopt's 1-D positions (what it
    would give) are measurably different on this model. Before, the padded forward raised
    (Qwen2-VL needs ``mm_token_type_ids``, which the batch did not carry)."""
    from prefopt.logps import Scoring, score_batch

    model, processor = qwen
    model.eval()
    data = write_shapes(tmp_path, 2, seed=3)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[0]["rejected"]["value"] = "the shape is a square"   # rows of different lengths
    tok, train = encoded(processor, [{**r, "images": [str(tmp_path / r["images"][0])]} for r in records])
    batch = make_collator("padded", tok.pad_token_id, ("chosen", "rejected"))(train.examples)
    assert batch.input_ids.shape[0] == 4 and bool((batch.attention.padding == 0).any())   # padding present
    rows, width = batch.input_ids.shape
    with torch.no_grad():
        scores = score_batch(model, batch, Scoring("sdpa", "full"))
        one_d = model(input_ids=batch.input_ids, attention_mask=batch.attention.padding,
                      position_ids=torch.arange(width).expand(rows, -1), **batch.media).logits
    assert batch.example_ids.tolist() == [ex.uid for ex in train.examples]
    for i, ex in enumerate(train.examples):
        for role in ("chosen", "rejected"):
            mine = scores.token_logps[batch.token_sequence == batch.index[role][i]]
            assert torch.allclose(mine, own_token_logps(model, ex, role), atol=1e-5, rtol=0)
    one_d = one_d[batch.token_row, batch.token_pos].float().log_softmax(-1)
    one_d = one_d.gather(-1, batch.token_target[:, None])[:, 0]
    assert (one_d - scores.token_logps).abs().max() > 1e-4   # the test tells 1-D from 3-D positions


def test_layout_falls_back_to_padded_for_mrope_and_refuses_an_explicit_shared(qwen, tmp_path, caplog):
    from prefopt import DPOConfig, DPOTrainer
    from prefopt.errors import ConfigError

    _, processor = qwen
    model, _ = tiny_qwen2_vl()   # trained below: not the shared one
    data = write_shapes(tmp_path, 4, seed=0)
    args = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, max_length=64,
                progress_bar=False, save_steps=0, logging_steps=1)
    with caplog.at_level("INFO", logger="prefopt"):
        trainer = DPOTrainer(model, None, train_dataset=str(data), processing_class=processor,
                             args=DPOConfig(**args))
        trainer.setup()
    assert trainer._collator.layout == "padded"
    why = ("the model reads multi-modal RoPE (its rope_parameters has mrope_section [2, 1, 1]): 3-D position ids "
           "it computes itself (get_rope_index), which prefopt's packed and prompt-shared rows do not reproduce")
    assert f"policy: layout shared: {why}" in caplog.messages
    assert f"policy: layout packed: {why}" in caplog.messages
    trainer.train()   # one DPO step on padded rows: policy == reference, so the loss is ln 2
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [pytest.approx(0.693147, abs=1e-5)]
    with pytest.raises(ConfigError, match=r"data.layout=shared: the policy model cannot take it: the model reads "
                                          r"multi-modal RoPE .*; use data.layout=padded"):
        DPOTrainer(model, None, train_dataset=str(data), processing_class=processor,
                   args=DPOConfig(**args, layout="shared")).setup()


def test_greedy_generation_from_image_prompts_equals_transformers_own(qwen, tmp_path):
    """A left-padded batch of two image prompts sampled by prefopt gives, token for token, what
    ``generate`` gives on each prompt alone from the processor's own inputs (mm_token_type_ids
    included: the 3-D positions of the prompt and the decoded tokens)."""
    from PIL import Image

    from prefopt.config import GenerateConfig
    from prefopt.data.report import DataReport
    from prefopt.generate import TransformersSampler, encode_prompts, generate, load_prompts

    model, processor = qwen
    model.eval()
    data = write_shapes(tmp_path, 2, seed=0)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[1]["conversations"][0]["value"] = "<image>What colour is the shape in this picture?"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = prepare_tokenizer(processor)
    report = DataReport("prompts")
    gens = encode_prompts(load_prompts(str(data), DataConfig(), report), tok, 96, 6, report)
    assert len(gens[0].prompt_ids) != len(gens[1].prompt_ids)          # the batch is left-padded
    cfg = GenerateConfig(temperature=0, max_new_tokens=6, num_samples=1)
    generate(TransformersSampler(model, tok), gens, cfg, seed=0, progress=False)
    # the 16 image tokens of each prompt span a 4x4 grid, 4 positions: the text after them continues 12
    # positions below its token index (1-D positions, which generate falls back to without
    # mm_token_type_ids, and whose greedy tokens happen to agree on this tiny model, give 0)
    assert model.model.rope_deltas.flatten().tolist() == [-12, -12]
    for g, record in zip(gens, records):
        question = record["conversations"][0]["value"].replace("<image>", "")
        native = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[native], images=[Image.open(tmp_path / record["images"][0]).convert("RGB")],
                           return_tensors="pt")
        assert g.prompt_ids == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id) + 1]
        assert g.samples[0].token_ids == new


def test_a_saved_qwen2_vl_processor_without_torchvision_is_a_clear_config_error(qwen, tmp_path):
    """transformers loads Qwen2-VL's video processor with its processor, and that needs torchvision."""
    from prefopt.errors import ConfigError
    from prefopt.models import load_tokenizer

    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: the processor loads")
    except ImportError:
        pass
    _, processor = qwen
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "processor_class": "Qwen2VLProcessor"}))
    with pytest.raises(ConfigError, match=rf"^cannot load the processor of '{tmp_path}': Qwen2VLVideoProcessor "
                                          r"requires the Torchvision library but it was not found in your environment "
                                          r"\(install what it names\)$"):
        load_tokenizer(str(tmp_path))
