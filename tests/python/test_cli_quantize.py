"""``fourbit quantize`` and ``fourbit inspect``: the 4-bit checkpoint written shard by shard is
the one fourbit's own loader builds (bytes equal), transformers + bitsandbytes load it and
compute what fourbit computes, the report names every layer, and bad inputs fail cleanly
without leaving a destination behind."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
fbt = pytest.importorskip("fourbit.integrations.transformers")

from _cli_helpers import run, save_tiny_llama  # noqa: E402
from _helpers import import_bnb  # noqa: E402

import_bnb()
import bitsandbytes as bnb  # noqa: E402

QLORA = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "llama"
    save_tiny_llama(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_quantize_equals_fourbit_loader_and_loads_in_transformers_bnb(sharded, tmp_path):
    dst = tmp_path / "nf4"
    report = tmp_path / "report.json"
    out = run("quantize", sharded, dst, "--compute-dtype", "float32", "--json", report, "--no-progress").output
    assert "peak RSS" in out and "Per-layer error" in out
    rep = json.loads(report.read_text())
    assert rep["quantized"] == 14 and rep["kept"] == ["lm_head"] and rep["shards"] > 1
    assert rep["peak_rss_bytes"] is not None and all(0 < r["rel_error"] < 0.2 for r in rep["layers"])
    # bytes equal to fourbit's loader quantizing the same float checkpoint
    ours = fbt.from_pretrained(dst).state_dict()
    ref = fbt.from_pretrained(sharded, bnb_4bit_compute_dtype=torch.float32, **QLORA).state_dict()
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    # transformers + bitsandbytes load the directory as it is and compute the same logits
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst, device_map="cpu")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in theirs.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, fbt.from_pretrained(dst)(IDS).logits, atol=1e-2, rtol=0)  # as test_transformers
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in index["weight_map"]


def test_include_exclude_and_fp4(sharded, tmp_path):
    dst = tmp_path / "fp4"
    run("quantize", sharded, dst, "--quant-type", "fp4", "--no-double-quant", "--exclude", "down_proj",
        "--include", "mlp.*", "--no-progress")
    info = json.loads(run("inspect", dst, "--json").output)
    assert info["quant_type"] == "fp4" and info["double_quant"] is False and info["quantized_layers"] == 4
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in cfg["llm_int8_skip_modules"]
    assert "model.layers.1.self_attn.q_proj" in cfg["llm_int8_skip_modules"]
    model = fbt.from_pretrained(dst)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_inspect_float_and_4bit(sharded, tmp_path):
    info = json.loads(run("inspect", sharded, "--json").output)
    assert info["format"] == "full precision" and info["dtypes"] == {"F32": info["tensors"]}
    dst = tmp_path / "q"
    run("quantize", sharded, dst, "--no-progress")
    info = json.loads(run("inspect", dst, "--json").output)
    assert (info["format"], info["quant_type"], info["blocksize"], info["double_quant"], info["dtype"]) == \
        ("bitsandbytes 4-bit", "nf4", 64, True, "float32")
    assert info["full_precision_bytes"] > 2.5 * (info["disk_bytes"] - 128 * 64 * 4 * 2)  # 4x smaller, minus embed/head
    assert "bitsandbytes 4-bit" in run("inspect", dst).output


def test_bad_inputs_fail_cleanly(sharded, tmp_path):
    out = run("quantize", tmp_path / "nope", tmp_path / "d", expect=3).output
    assert "nope" in out and "not a directory" in out
    (tmp_path / "empty").mkdir()
    assert "config.json" in run("quantize", tmp_path / "empty", tmp_path / "d", expect=3).output
    assert "matches no linear layer" in run("quantize", sharded, tmp_path / "d", "--include", "nothing_like_this",
                                            expect=2).output
    run("quantize", sharded, tmp_path / "x", "--blocksize", "63", expect=2)
    assert not (tmp_path / "d").exists()
    (tmp_path / "exists").mkdir()
    assert "--overwrite" in run("quantize", sharded, tmp_path / "exists", expect=6).output
    assert "does not exist" in run("inspect", tmp_path / "nope", expect=3).output
    # a truncated shard: the error names it and no destination (complete or partial) is left
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sharded.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = run("quantize", broken, tmp_path / "out", expect=3)
    assert shard.name in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(sharded, tmp_path):
    # The CLI reads shards through the loader's check (issue 17): ../elsewhere is never opened.
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    for f in sharded.iterdir():
        (escaping / f.name).write_bytes(f.read_bytes())
    index_path = escaping / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../float/llama/" + index["weight_map"][key]
    index_path.write_text(json.dumps(index))
    for args in (("quantize", escaping, tmp_path / "out"), ("inspect", escaping)):
        out = run(*args, expect=3).output
        assert "outside the checkpoint directory" in out and key in out
    assert not (tmp_path / "out").exists()
