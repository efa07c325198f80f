"""Loading models and tokenizers, and building small ones locally.

``load_model``/``load_tokenizer`` are the real hub paths: ``from_pretrained`` with a hub
id or a local directory. ``train_tokenizer`` and ``build_tiny_model`` make a BPE
tokenizer and a randomly initialised Llama/Qwen2/GPT-2-shaped model from a config, so
the demo and the tests run without any hub.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from prefopt.config import ModelConfig
from prefopt.errors import ConfigError
from prefopt.lora import quantization_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

# ChatML: the template the demo tokenizer ships with; also selectable as model.chat_template.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_TEMPLATES = {"chatml": CHATML}


def _quiet_transformers() -> None:
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_model(name_or_path: str, dtype: str = "float32", model_cfg: ModelConfig | None = None, kind: str = "causal"):
    """AutoModelForCausalLM.from_pretrained for a hub id or a local directory; ``kind="reward"``:
    AutoModelForSequenceClassification with one output (a reward model; a causal LM checkpoint
    gets a new, randomly initialised ``score`` head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet_transformers()
    model_cfg = model_cfg or ModelConfig()
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.trust_remote_code:
        logging.getLogger("prefopt").warning("model.trust_remote_code: running the modelling code that comes with %s",
                                             name_or_path)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    quantization = quantization_config(model_cfg.load_in_4bit)  # checked before anything loads
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if kind == "reward":
        kwargs["num_labels"] = 1
    try:
        if (Path(name_or_path) / "adapter_config.json").is_file():
            return load_adapter(name_or_path, kind, kwargs)
        auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
        if kind != "reward" and _is_vlm_checkpoint(name_or_path, kwargs):
            from transformers import AutoModelForImageTextToText
            auto = AutoModelForImageTextToText  # a vision-language model (prefopt.vlm)
        return auto.from_pretrained(name_or_path, **kwargs)
    except OSError as e:
        raise ConfigError(f"cannot load model '{name_or_path}': {str(e).splitlines()[0]}") from None


def _is_vlm_checkpoint(name_or_path: str, kwargs: dict) -> bool:
    """Whether the checkpoint's config is a vision-language model's (it has a vision_config)."""
    from transformers import AutoConfig

    from prefopt.vlm import is_vlm_config
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=kwargs.get("trust_remote_code", False))
    except (OSError, ValueError):
        return False  # from_pretrained then says what is wrong
    return is_vlm_config(config)


def load_adapter(path: str, kind: str, kwargs: dict):
    """A saved LoRA adapter (a run's final/ without save.merge_lora): its base loaded and the
    adapter merged in (a reward model's score head, saved whole as a module to save, included)."""
    try:
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    except ImportError:
        raise ConfigError(f"{path} holds a LoRA adapter: loading it needs peft (pip install 'prefopt[lora]')") from None
    auto = AutoPeftModelForSequenceClassification if kind == "reward" else AutoPeftModelForCausalLM
    return auto.from_pretrained(path, **kwargs).merge_and_unload()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: with it, policy (train mode) and reference (eval mode) would
    differ at step 0 and every log-ratio would carry sampling noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_p"):  # attention modules keep a float rate
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def load_tokenizer(name_or_path: str, chat_template: str | None = None):
    """AutoTokenizer.from_pretrained, with a pad token and an optional chat template override. A
    checkpoint with a processor (a vision-language model) gives the processor's tokenizer, which
    keeps the processor for the data layer (prefopt.vlm.processor_of)."""
    from transformers import AutoProcessor, AutoTokenizer

    from prefopt.vlm import has_processor, with_processor
    _quiet_transformers()
    try:
        if has_processor(name_or_path):
            return prepare_tokenizer(with_processor(AutoProcessor.from_pretrained(name_or_path)), chat_template)
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load tokenizer '{name_or_path}': {str(e).splitlines()[0]}") from None
    except ImportError as e:  # a processor part whose backend is missing (Qwen2-VL's needs torchvision)
        first = " ".join(str(e).split()).split(". ")[0]
        raise ConfigError(f"cannot load the processor of '{name_or_path}': {first} (install what it names)") from None
    return prepare_tokenizer(tok, chat_template)


def prepare_tokenizer(tok, chat_template: str | None = None):
    if hasattr(tok, "image_processor") and hasattr(tok, "tokenizer"):  # a processor (TRL's processing_class)
        from prefopt.vlm import with_processor
        tok = with_processor(tok)
    if chat_template:
        tok.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
    if tok.pad_token is None:
        # Padding never enters the loss (masks are explicit), so EOS is a safe pad token.
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- local builders

SPECIAL_TOKENS = ("<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens.

    EOS is ``<|im_end|>`` (it ends every assistant turn and every completion), PAD is
    ``<|pad|>``; there is no BOS, like Qwen's tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHATML
    return tok


ARCHITECTURES = ("llama", "qwen2", "gpt2")


def build_tiny_model(vocab_size: int, arch: str = "llama", hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int | None = None, intermediate_size: int | None = None,
                     max_positions: int = 1024, seed: int = 0, tie_embeddings: bool = False):
    """A small randomly initialised causal LM of a real architecture (GPT-2 keeps its 0.1 dropout,
    as the real one has; prefopt's model.disable_dropout turns it off for training)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    _quiet_transformers()
    kv_heads = kv_heads or max(1, heads // 2)
    intermediate_size = intermediate_size or 4 * hidden_size
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads,
                         n_positions=max_positions, tie_word_embeddings=tie_embeddings)
    else:
        raise ConfigError(f"unknown tiny architecture '{arch}'; one of {ARCHITECTURES}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def save_pretrained(model, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    from prefopt.vlm import processor_of
    (processor_of(tokenizer) or tokenizer).save_pretrained(path)
    return path
