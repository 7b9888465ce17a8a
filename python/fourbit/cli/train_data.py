"""Training data of ``fourbit train``: JSONL rows to token batches for causal LMs (a ``text``
field, or instruction/input/response with the Alpaca template), and the deterministic,
resumable order of examples (a function of the seed and the micro-batch index alone)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ._common import EXIT_INPUT, CliError

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
IGNORE = -100


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"data file {str(path)!r} does not exist", EXIT_INPUT)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CliError(f"{path}:{lineno}: not JSON ({e})", EXIT_INPUT) from None
                if not isinstance(row, dict):
                    raise CliError(f"{path}:{lineno}: a row must be a JSON object", EXIT_INPUT)
                rows.append(row)
    if not rows:
        raise CliError(f"{path}: no rows", EXIT_INPUT)
    return rows


def prompt_and_target(row: dict, template: str, where: str) -> tuple[str, str]:
    """(prompt, text to learn) of one row: ("", text) for a ``text`` row; the template filled
    with instruction/input and the response for an instruction row."""
    if isinstance(row.get("text"), str):
        return "", row["text"]
    if isinstance(row.get("instruction"), str) and isinstance(row.get("response", row.get("output")), str):
        response = row.get("response", row.get("output"))
        inp = row.get("input") or ""
        if template == "alpaca":
            prompt = (ALPACA if inp else ALPACA_NO_INPUT).format(instruction=row["instruction"], input=inp)
        else:
            prompt = template.format(instruction=row["instruction"], input=inp)
        return prompt, response
    raise CliError(f"{where}: a row needs a string `text`, or `instruction` and `response` (and optional "
                   f"`input`); got keys {sorted(row)}", EXIT_INPUT)


def tokenize_rows(rows: list[dict], tokenizer, *, seq_len: int, template: str, train_on_prompt: bool,
                  source: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row, truncated to ``seq_len``; prompt labels are IGNORE unless
    ``train_on_prompt``; an end-of-sequence token ends each example when the tokenizer has one."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i, row in enumerate(rows, 1):
        prompt, target = prompt_and_target(row, template, f"{source}:{i}")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        t_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + eos
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = (bos + p_ids + t_ids)[:seq_len]
        n_prompt = len(bos) + len(p_ids)
        labels = [t if (train_on_prompt or j >= n_prompt) else IGNORE for j, t in enumerate(ids)]
        if all(x == IGNORE for x in labels[1:]):
            raise CliError(f"{source}:{i}: nothing to learn after truncation to seq_len={seq_len} "
                           f"(prompt of {n_prompt} tokens)", EXIT_INPUT)
        out.append((ids, labels))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Order:
    """Which examples micro-batch ``m`` holds: passes over the data in a seeded random order,
    each pass cut into ``len // batch_size`` full batches (the remainder is dropped). A pure
    function of (seed, m), so a resumed run continues with exactly the next batch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise CliError(f"config key 'batch_size': {batch_size} is more than the {n} training examples", 2)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_pass = n // batch_size
        self._perm: tuple[int, list[int]] = (-1, [])

    def batch(self, m: int) -> list[int]:
        epoch, k = divmod(m, self.per_pass)
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1][k * self.batch_size:(k + 1) * self.batch_size]
