"""Shared fixtures: a tiny random Llama target and a byte-level ChatML tokenizer.

Both are built in memory from a config, so unit tests take seconds and need no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VOCAB_SIZE = 320
# The repository root: subprocesses that import ``tests`` run from here (PYTHONPATH / cwd).
REPO_ROOT = Path(__file__).resolve().parents[1]


def build_tiny_tokenizer():
    """A byte-level tokenizer: 3 special tokens then the 256 bytes, no merges; ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(specials)}
    for symbol in byte_symbols:
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_llama(seed: int = 0, num_layers: int = 4, hidden: int = 64, model_type: str = "llama"):
    """A randomly initialised causal LM of the given architecture (llama, qwen2, qwen3, mistral)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if model_type in ("qwen3",):
        config.head_dim = hidden // 4
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_llama():
    return build_tiny_llama()


def save_tiny_target(directory: Path, seed: int = 0) -> Path:
    """Write ``build_tiny_llama(seed)`` and the tiny tokenizer as an HF model directory."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_llama(seed=seed).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


def write_chat_data(path: Path, count: int = 24, answer_words: int = 12) -> Path:
    """``count`` two-turn conversations whose answers are ``answer_words`` digits of a fixed pattern."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for i in range(count):
            answer = " ".join(str((i * 7 + j) % 13) for j in range(answer_words))
            messages = [{"role": "user", "content": f"go {i}"}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path
