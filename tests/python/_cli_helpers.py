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


WORDS = ("the a cat dog sat ran on mat log fire disk full error warn ok boot fail retry stop start net down up "
         "write read file open close user root kernel panic time out mem low high cpu hot fan spin slow fast").split()


def save_word_tokenizer(path, words=WORDS):
    """A word-level tokenizer (ids < 64) saved beside a tiny model, as real model directories have one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(path))
    return fast


def text_rows(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(4, 12, (1,),
                                                                                                         generator=g)),),
                                                                  generator=g))}
            for _ in range(n)]
