"""The contrastive sentence-embedding recipe of the main job (all-MiniLM-L6-v2 on the
paraphrase pairs of data/paraphrases): the pairs, mean-pooled embeddings, the symmetric
in-batch-negatives loss and held-out retrieval metrics. Used by ``fourbit train`` (task
``contrastive``) and by examples/finetune_minilm.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Pair:
    technical: str  # the query: a log line or error code
    plain: str      # its positive: the same failure in plain words
    error: str      # error family (for analysis only; never seen by the model)
    system: str     # the failing system (train and held-out systems are disjoint)


def load_pairs(path: Path) -> list[Pair]:
    """Pairs from a JSON-lines file with the keys technical, plain, error, system."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append(Pair(*(str(row[k]) for k in ("technical", "plain", "error", "system"))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a pair with technical/plain/error/system ({e})") from None
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def embed(model, tokenizer, sentences: list[str], max_length: int = 64) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: mean of the last
    hidden states over real (non-padding) tokens, then L2-normalised. Differentiable."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch).last_hidden_state                     # [B, T, H]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)


@torch.no_grad()
def embed_all(model, tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    """``embed`` in eval mode (no dropout), in batches; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([embed(model, tokenizer, sentences[i:i + batch_size], max_length)
                          for i in range(0, len(sentences), batch_size)])
    finally:
        model.train(was_training)


def retrieval_metrics(query_emb: torch.Tensor, cand_emb: torch.Tensor) -> dict:
    """Query i's positive is candidate i; every other candidate is a negative. Returns top-1
    accuracy, MRR (mean of 1 / rank of the positive) and each query's rank (1 = best)."""
    sim = query_emb @ cand_emb.T                               # [Q, C] cosine similarities
    positive = sim.diagonal().unsqueeze(1)
    ranks = (sim > positive).sum(dim=1) + 1                    # ties count in the query's favour
    return {
        "top1": (ranks == 1).float().mean().item(),
        "mrr": (1.0 / ranks.float()).mean().item(),
        "ranks": ranks.tolist(),
    }


def evaluate(model, tokenizer, pairs: list[Pair]) -> dict:
    """Held-out retrieval, technical line -> plain description, over all held-out candidates."""
    q = embed_all(model, tokenizer, [p.technical for p in pairs])
    c = embed_all(model, tokenizer, [p.plain for p in pairs])
    return retrieval_metrics(q, c)


def in_batch_loss(q: torch.Tensor, c: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives: row i of q must pick row i of c among all
    rows of c, and the other way round. q, c: [B, H], unit vectors."""
    logits = scale * (q @ c.T)
    target = torch.arange(q.shape[0], device=q.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, target) + ce(logits.T, target))
