"""Helpers for the ``fourbit`` CLI tests: the click runner and tiny models saved from configs."""

from __future__ import annotations

import json
import os

import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fourbit.cli import main  # noqa: E402


def run(*args, expect: int = 0):
    """Runs ``fourbit ARGS`` in-process; asserts the exit code; returns the result."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, f"exit {result.exit_code} != {expect}; output:\n{result.output}"
    return result


def tiny_llama_config(layers: int = 2, hidden: int = 64, vocab: int = 128):
    import transformers

    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                    max_position_embeddings=128, tie_word_embeddings=False)


def save_tiny_llama(path, dtype=torch.float32, seed: int = 0, **save_kwargs):
    """A random tiny LlamaForCausalLM saved as a Hugging Face checkpoint; returns the model."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()
    model.save_pretrained(str(path), **save_kwargs)
    return model


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
