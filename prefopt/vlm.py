"""Vision-language models (multi-modal DPO): images with the data, a processor with the tokenizer.

* Data: any paired/unpaired format with an ``images`` list (paths relative to the data file,
  absolute paths, or http(s) URLs, downloaded at load time) and ``<image>`` placeholders in the
  prompt text (ShareGPT as LLaMA-Factory writes it, or TRL's ``images`` column on conversational
  / plain records; TRL's content parts ``[{"type": "image"}, {"type": "text", "text": ...}]``
  become ``<image>...``). ``load_images``
  opens and checks every file at load time; a missing or unreadable file, an unreachable URL, or
  a placeholder count that differs from the number of images, is a ``RecordProblem`` (file:line,
  counted under ``data.on_error=skip``).
* Encoding (prefopt.data.tokenize): each ``<image>`` becomes what the model's processor expects
  (``image_markup``: its ``image_token``, wrapped as its chat template renders an image part,
  e.g. Qwen2-VL's ``<|vision_start|><|image_pad|><|vision_end|>``); the *processor* then expands
  it into the model's image tokens and makes the pixel values; nothing is expanded by hand.
  Image tokens belong to the prompt and are never scored.
* Batches carry the processor's image tensors (``Batch.media``) in the order the image tokens
  appear row-major, so every layout can pass them to the model.
* Models: a config with a ``vision_config`` loads with ``AutoModelForImageTextToText``; LoRA
  targets the language model's linear layers only, the vision tower stays frozen unless
  ``model.train_vision``.

``build_tiny_vlm`` makes a small random LLaVA (CLIP vision tower + Llama language model) with its
processor for the tests and the demo: no hub.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from prefopt.data.schema import RecordProblem

IMAGE_PLACEHOLDER = "<image>"
IMAGE_EXTRAS = "images"          # PreferenceExample.extras: the loaded PIL images
IMAGE_PATHS = "image_paths"      # ... and where they came from (generation writes them with its records)
PROCESSOR_ATTR = "_prefopt_processor"
VISION_MODULES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "image_newline")


# ----------------------------------------------------------------------------- data

def has_images(record: dict) -> bool:
    return isinstance(record, dict) and record.get("images") not in (None, [])


def flatten_parts(record: dict) -> dict:
    """TRL's message content parts as text: ``{"type": "image"}`` -> ``<image>``, text parts joined."""
    out = dict(record)
    for key in ("prompt", "chosen", "rejected", "completion", "conversations", "messages"):
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [_flat_message(m) for m in value]
    return out


def _flat_message(message: Any) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    text = []
    for part in message["content"]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            text.append(str(part.get("text", "")))
        else:
            raise RecordProblem("wrong_type", f"message content part {part!r:.60} is neither "
                                              f"{{'type': 'image'}} nor {{'type': 'text', 'text': ...}}")
    return {**message, "content": "".join(text)}


def load_images(paths: Any, base: Path) -> tuple[list, list[str]]:
    """The record's images opened with Pillow (RGB), checked; and where they came from (resolved
    paths, or the URLs of images given as http(s) URLs, downloaded here: ``fetch_image``)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise RecordProblem("wrong_type", f"images must be a list of file paths or URLs, got {paths!r:.80}")
    images, resolved = [], []
    for i, name in enumerate(paths):
        if name.startswith(URL_SCHEMES):
            source, where = io.BytesIO(fetch_image(name, i)), name
        else:
            source = where = Path(name) if Path(name).is_absolute() else base / name
            if not source.is_file():
                raise RecordProblem("missing_image", f"images[{i}]: no such file {source}")
        try:
            with Image.open(source) as img:
                img.load()
                images.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise RecordProblem("unreadable_image", f"images[{i}]: cannot read {where} as an image "
                                                    f"({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
        resolved.append(str(where))
    return images, resolved


URL_SCHEMES = ("http://", "https://")
URL_TIMEOUT_S = 10.0            # per connection attempt and per read of an image URL
MAX_IMAGE_BYTES = 64 * 2**20    # a URL that serves more is not an image a record means


def fetch_image(url: str, i: int) -> bytes:
    """The bytes an image URL serves (urllib, ``URL_TIMEOUT_S``). An unreachable host, an HTTP
    error, a timeout or an oversized answer is a ``RecordProblem`` (``unreachable_image``): the
    record's file:line in the message, counted under ``data.on_error=skip``."""
    import http.client
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "prefopt"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as answer:
            data = answer.read(MAX_IMAGE_BYTES + 1)
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        why = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else str(e.reason)
    except (TimeoutError, OSError, ValueError, http.client.HTTPException) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}" if str(e) else type(e).__name__
    else:
        if len(data) > MAX_IMAGE_BYTES:
            raise RecordProblem("unreachable_image", f"images[{i}]: {url} serves more than "
                                                     f"{MAX_IMAGE_BYTES >> 20} MiB")
        return data
    raise RecordProblem("unreachable_image", f"images[{i}]: cannot download {url} ({why})")


def count_placeholders(value: Any) -> int:
    if isinstance(value, str):
        return value.count(IMAGE_PLACEHOLDER)
    if isinstance(value, list):
        return sum(count_placeholders(m.get("content") if isinstance(m, dict) else m) for m in value)
    return 0


def attach_images(example, record: dict, origin) -> None:
    """Load ``record["images"]`` into ``example.extras`` after checking the placeholders: as many
    ``<image>`` in the prompt as images, none in a completion."""
    base = Path(origin.source).parent if Path(str(origin.source)).is_file() else Path.cwd()
    for name in ("chosen", "rejected", "completion"):
        if count_placeholders(getattr(example, name, None)):
            raise RecordProblem("image_placeholders", f"{name} holds an {IMAGE_PLACEHOLDER} placeholder; "
                                                      f"images belong to the prompt")
    images, paths = load_images(record["images"], base)
    found = count_placeholders(example.prompt)
    if found != len(images):
        raise RecordProblem("image_placeholders", f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) "
                                                  f"but the record lists {len(images)} image(s)")
    example.extras[IMAGE_EXTRAS] = images
    example.extras[IMAGE_PATHS] = paths


def image_digest(images: list) -> str:
    """A hash of the pixels (the example id must change when an image does)."""
    digest = hashlib.blake2b(digest_size=8)
    for img in images:
        digest.update(repr(img.size).encode() + img.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- processor

def processor_of(tokenizer) -> Any | None:
    """The processor a tokenizer was loaded with (None for a text-only model)."""
    return getattr(tokenizer, PROCESSOR_ATTR, None)


def with_processor(processor):
    """The processor's tokenizer, remembering the processor (the data layer finds it there)."""
    tok = processor.tokenizer
    setattr(tok, PROCESSOR_ATTR, processor)
    return tok


def image_markup(processor) -> str:
    """What the model's processor expects where the data writes ``<image>``.

    Data is written with one portable ``<image>`` per image, but processors look for their own
    token (``processor.image_token``: LLaVA's ``<image>``, Qwen2-VL's ``<|image_pad|>``) and some
    expect it wrapped (Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``) or start from
    another marker they expand themselves. What the processor's chat template renders for a
    ``{"type": "image"}`` content part (between two text parts, whitespace stripped) is taken when
    the processor, given it and one image, makes image tokens; else the bare image token. The
    processor then expands it into the right number of image tokens: nothing is counted here."""
    token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    before, after = "PREFOPT_TEXT_BEFORE", "PREFOPT_TEXT_AFTER"
    parts = [{"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after}]
    try:
        rendered = processor.apply_chat_template([{"role": "user", "content": parts}], tokenize=False)
    except Exception:  # noqa: BLE001 - no template, or one without content parts: the bare token
        rendered = ""
    if isinstance(rendered, list):
        rendered = rendered[0] if rendered else ""
    start, end = rendered.find(before), rendered.find(after)
    if 0 <= start < end and (between := rendered[start + len(before):end].strip()) and \
            makes_image_tokens(processor, between, token):
        return between
    return token


def makes_image_tokens(processor, text: str, token: str) -> bool:
    """Whether ``processor`` takes ``text`` with one (blank) image and gives image tokens."""
    from PIL import Image

    try:
        out = processor(text=[text], images=[Image.new("RGB", (64, 64), "white")], return_tensors="pt")
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
    except Exception:  # noqa: BLE001 - whatever a processor raises: it does not take this text
        return False
    return token_id in out["input_ids"][0].tolist()


def processor_digest(processor) -> str | None:
    """A hash of the processor's settings (the image processor's size, crop, mean, std, ...; the
    image token, patch size): what turns an image into pixel values and image tokens. Caches of
    values computed from them (the precomputed reference log-probs) are keyed on it, since a
    resize can change every pixel value and no token id. None without a processor."""
    if processor is None:
        return None
    settings = processor.to_dict()  # the tokenizer is not in it (the token ids cover it)
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def has_processor(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


# ----------------------------------------------------------------------------- model

def is_vlm_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def is_vlm(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return is_vlm_config(getattr(base, "config", None))


# Models whose language model reads 3-D multi-modal RoPE positions, for configs that do not spell
# out an ``mrope_section`` (the usual sign, read first).
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni_moe",
                     "glm4v", "glm4v_moe")


def mrope(config) -> str | None:
    """Why ``config``'s model reads multi-modal RoPE (None when it does not).

    Such a model (Qwen2-VL and its successors) gives each token three position ids (time, height,
    width): an image token's come from its place in the image grid, the text after an image
    continues from the grid's extent, not from the token count. The model computes them itself
    (``get_rope_index``) from the ids, ``image_grid_thw`` and the padding mask; position ids that
    prefopt writes (one per token: packed and prompt-shared rows restart and share them) would be
    plain 1-D RoPE, silently different from what the model was trained with."""
    for cfg in (config, getattr(config, "text_config", None)):
        for name in ("rope_parameters", "rope_scaling"):
            rope = getattr(cfg, name, None)
            if isinstance(rope, dict) and rope.get("mrope_section") is not None:
                return f"its {name} has mrope_section {rope['mrope_section']}"
    kind = getattr(config, "model_type", None)
    return f"model type {kind}" if kind in MROPE_MODEL_TYPES else None


def mrope_inputs(model, inputs: dict) -> dict:
    """The forward inputs of a padded batch for a multi-modal RoPE model (others: unchanged): no
    position ids, so the model computes its own 3-D ones (``get_rope_index``, right padding read
    from the mask), and the per-token modality (``mm_token_type_ids``: 1 at image tokens) that
    computation needs, read from the ids. Packed and shared rows are refused (the layout choice
    never gives them to such a model: prefopt.scoring)."""
    config = getattr(model, "config", None)
    if config is None or mrope(config) is None:
        return inputs
    mask = inputs.get("attention_mask")
    if inputs.get("prefopt_units") is not None or mask is None or mask.dim() != 2:
        raise ValueError("a multi-modal RoPE model reads only padded rows (its 3-D positions are its own)")
    return {**inputs, "position_ids": None, **modality_ids(model, inputs["input_ids"], inputs)}


def modality_ids(model, input_ids: torch.Tensor, media: dict) -> dict:
    """``{"mm_token_type_ids": 1 at image tokens, else 0}`` for a multi-modal RoPE model given images
    (its position computation reads them; the processor makes them per text, prefopt's rows are
    assembled, so they are read from the ids), else ``{}``."""
    config = getattr(model, "config", None)
    image_token = getattr(config, "image_token_id", None)
    if config is None or "image_grid_thw" not in media or image_token is None or mrope(config) is None:
        return {}
    return {"mm_token_type_ids": (input_ids == image_token).int()}


def language_lora_targets(model, names=None) -> str:
    """A peft ``target_modules`` regex: the language model's linear layers (not the vision tower,
    not the projector, not the LM head); all of them, or those ``names`` names (module names or
    dotted suffixes, as peft reads a list: the vision tower often has layers of the same names,
    e.g. CLIP's ``q_proj``, which a bare list would adapt too)."""
    language = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                and not any(v in name for v in VISION_MODULES) and "language_model" in name]
    if names is None:
        names = {name.rsplit(".", 1)[-1] for name in language}
    if not names:
        raise ValueError("no linear layer found under the model's language_model")
    # a name is a module name or dotted suffix under the language model, or a full module path
    suffixes = sorted(re.escape(n) for n in names if "language_model" not in n)
    full = sorted(re.escape(n) for n in names if "language_model" in n)
    pattern = "|".join(([rf".*language_model.*\.({'|'.join(suffixes)})"] if suffixes else [])
                       + ([f"({'|'.join(full)})"] if full else []))
    unmatched = sorted(n for n in names if not any(
        re.fullmatch(rf"(.*language_model.*\.)?{re.escape(n)}", m) and "language_model" in m for m in language))
    if unmatched:
        from prefopt.errors import ConfigError
        raise ConfigError(f"model.lora target_modules: {', '.join(map(repr, unmatched))} names no linear layer of "
                          f"the language model (a vision-language model's LoRA adapts the language model only: "
                          f"not the LM head, the vision tower or the projector, unless model.train_vision)")
    return pattern


def freeze_vision(model) -> int:
    """Freeze the vision tower and projector; returns the number of parameters frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(v in name for v in VISION_MODULES) and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def build_tiny_vlm(tokenizer, *, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                   layers: int = 2, vision_layers: int = 1, heads: int = 4, seed: int = 0):
    """A small random LLaVA: a CLIP vision tower (``image_size``/``patch_size`` squared image tokens)
    and a Llama language model, with its LlavaProcessor (``tokenizer`` gets an ``<image>`` token).
    Returns (model, processor); save both with ``save_pretrained`` to make a local 'hub' folder."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                              patch_size=patch_size, projection_dim=hidden_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=256)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_PLACEHOLDER, chat_template=tokenizer.chat_template)
    return model, processor
