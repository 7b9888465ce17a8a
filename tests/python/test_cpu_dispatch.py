"""The CPU matmul's kernel choice (src/torch/cpu_dispatch.cpp): the override variables
and their errors, the measured mode's on-disk cache (a second process makes the first one's
choices and gets bit-identical results; a corrupt or unwritable cache), no measurement
while tracing with fake tensors, and the choice visible in ``torch.ops.fourbit.cpu_matmul_info``
and the debug log; untrusted (provisional) measurements, FOURBIT_CPU_MATMUL=remeasure and
fourbit.cpu_matmul_cache_clear. Measured-mode tests run in subprocesses with their own cache
directory, and judge every measurement trusted (FOURBIT_CPU_MATMUL_TEST_FORCE=trusted, a
test-only switch) unless a test says otherwise, so a loaded CI machine does not change what
gets cached."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fourbit
import fourbit.functional as F


def info():
    return json.loads(torch.ops.fourbit.cpu_matmul_info())


def weight(n=256, k=256, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")


@pytest.mark.parametrize("var, value", [("FOURBIT_CPU_MATMUL", "fast"), ("FOURBIT_CPU_MATMUL_LOG", "yes"),
                                        ("FOURBIT_CPU_MATMUL_TEST_FORCE", "maybe")])
def test_bad_values_are_value_errors_naming_variable_and_value(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    q, qs = weight()
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"{var}.*'{value}'"):
        fourbit.matmul_4bit(x, q.t(), qs)
    with pytest.raises(ValueError, match=f"{var}.*'{value}'") if var == "FOURBIT_CPU_MATMUL" else _nothing():
        torch.ops.fourbit.cpu_matmul_info()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("mode", ["fused", "blas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_override_forces_the_path_and_both_agree(monkeypatch, mode, dtype):
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", mode)
    q, qs = weight(96, 200, dtype=dtype)
    x = torch.randn(40, 200, dtype=dtype, requires_grad=True)
    y = fourbit.matmul_4bit(x, q.t(), qs)
    (dx,) = torch.autograd.grad(y.float().sum(), x)
    last = info()["last"]
    assert (last["forward"], last["grad_input"]) == (mode, mode)
    w = F.dequantize_4bit(q, qs).to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, x.detach() @ w.t(), **tol)
    torch.testing.assert_close(dx, torch.ones(40, 96, dtype=dtype) @ w, **tol)


def test_static_mode_is_the_fixed_rule(monkeypatch):
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", "static")
    q, qs = weight()
    i = info()
    assert i["mode"] == "static" and i["isa"] in ("portable", "avx2", "avx512", "avx512_bf16", "amx")
    for m, want in ((8, "fused"), (i["static_blas_min_rows"], "blas")):
        fourbit.matmul_4bit(torch.randn(m, 256, dtype=torch.bfloat16), q.t(), qs)
        assert info()["last"]["forward"] == want, m


SCRIPT = textwrap.dedent("""
    import json, sys, torch, fourbit, fourbit.functional as F
    torch.manual_seed(0)
    torch.set_num_threads(2)
    w = torch.randn(512, 1024, dtype=torch.bfloat16) * 0.02
    q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    out = []
    for m in (3, 64, 300):
        x = torch.randn(m, 1024, dtype=torch.bfloat16, requires_grad=True)
        y = fourbit.matmul_4bit(x, q.t(), qs)
        (dx,) = torch.autograd.grad(y.float().sum(), x)
        out.append((y.view(torch.int16).sum().item(), y.view(torch.int16).square().sum().item(),
                    dx.view(torch.int16).sum().item(), dx.view(torch.int16).square().sum().item()))
    info = json.loads(torch.ops.fourbit.cpu_matmul_info())
    print(json.dumps({"out": out, "info": info}))
""")


def run(tmp_path, script=SCRIPT, **env):
    e = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), FOURBIT_CPU_MATMUL="auto",
             FOURBIT_CPU_MATMUL_TEST_FORCE="trusted")
    e.update(env)
    r = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def cache_file(tmp_path):
    return tmp_path / "cache" / "fourbit" / "cpu_matmul.json"


def test_measured_choices_are_cached_and_a_second_process_repeats_them(tmp_path):
    first, log = run(tmp_path, FOURBIT_CPU_MATMUL_LOG="1")
    assert first["info"]["measurements"] == 6  # 3 shape classes x (forward, input gradient)
    assert "fourbit: CPU matmul fwd/bfloat16/m4/n512/k1024 ->" in log and "measured" in log
    entries = json.loads(cache_file(tmp_path).read_text())["entries"]
    assert len(entries) == 6 and set(entries.values()) <= {"fused", "blas"}
    assert all(k.startswith(first["info"]["machine_key"] + "||") for k in entries)
    # A resumed run: another process, the same cache: no measurement, the same choices,
    # bit-identical outputs.
    second, _ = run(tmp_path)
    assert second["info"]["measurements"] == 0
    assert {k: v["path"] for k, v in second["info"]["choices"].items()} == \
           {k: v["path"] for k, v in first["info"]["choices"].items()}
    assert all(v["source"].startswith("cache") for v in second["info"]["choices"].values())
    assert second["out"] == first["out"]


def test_choices_written_to_the_cache_are_obeyed(tmp_path):
    """The cache decides, not a new measurement: flip every entry and a process follows it."""
    run(tmp_path)
    path = cache_file(tmp_path)
    data = json.loads(path.read_text())
    flipped = {k: ("fused" if v == "blas" else "blas") for k, v in data["entries"].items()}
    path.write_text(json.dumps({"version": 1, "entries": flipped}))
    again, _ = run(tmp_path)
    assert again["info"]["measurements"] == 0
    got = {again["info"]["machine_key"] + "||" + k: v["path"] for k, v in again["info"]["choices"].items()}
    assert got == flipped


@pytest.mark.parametrize("text", ["not json", '{"version": 1, "entries": {"k": "maybe"}}',
                                  '{"version": 1, "entries": {"k": "fused"}} trailing', ""])
def test_corrupt_cache_is_reported_ignored_and_rewritten(tmp_path, text):
    path = cache_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    out, log = run(tmp_path)
    if text:
        assert "corrupt CPU matmul cache" in log and str(path) in log
    assert out["info"]["measurements"] == 6
    assert len(json.loads(path.read_text())["entries"]) == 6


def test_unwritable_cache_warns_and_still_computes(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fourbit").write_text("a file where the directory should be")
    out, log = run(tmp_path)
    assert "could not write the CPU matmul cache" in log
    assert out["info"]["measurements"] == 6


def test_no_measurement_while_tracing_with_fake_tensors(tmp_path):
    script = textwrap.dedent("""
        import json, torch, fourbit, fourbit.functional as F
        from torch._subclasses.fake_tensor import FakeTensorMode
        w = torch.randn(256, 512, dtype=torch.bfloat16)
        q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            y = fourbit.matmul_4bit(mode.from_tensor(torch.randn(64, 512, dtype=torch.bfloat16)), q.t(), qs)
            assert y.shape == (64, 256)
        traced = json.loads(torch.ops.fourbit.cpu_matmul_info())["measurements"]
        compiled = torch.compile(lambda x: fourbit.matmul_4bit(x, q.t(), qs), fullgraph=True)
        compiled(torch.randn(64, 512, dtype=torch.bfloat16))
        ran = json.loads(torch.ops.fourbit.cpu_matmul_info())["measurements"]
        print(json.dumps({"traced": traced, "ran": ran}))
    """)
    out, _ = run(tmp_path, script)
    assert out == {"traced": 0, "ran": 1}


@pytest.mark.parametrize("var", ["FOURBIT_DISABLE_AMX", "FOURBIT_DISABLE_AVX2"])
def test_bad_disable_switch_value_is_a_value_error(tmp_path, var):
    script = textwrap.dedent("""
        import torch, fourbit, fourbit.functional as F
        q, qs = F.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4")
        try:
            fourbit.matmul_4bit(torch.randn(64, 64, dtype=torch.bfloat16), q.t(), qs)
        except ValueError as e:
            print("ValueError:", e)
    """)
    e = dict(os.environ, **{var: "yes"})
    r = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, timeout=120)
    assert "ValueError:" in r.stdout and var in r.stdout and "'yes'" in r.stdout, r.stdout + r.stderr


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The switches choose the kernels' ISA class (cpu_matmul_info's "isa"), and every class's
# fused kernels agree with dequantize + matmul in fp32 (forward and input gradient, nested
# FP4, a ragged shape that takes both the gemv and the blocked paths).
@pytest.mark.parametrize("switches, isa", [({"FOURBIT_DISABLE_AVX512": "1"}, "avx2"),
                                           ({"FOURBIT_DISABLE_AVX2": "1"}, "portable")])
def test_disable_switches_pick_the_class_and_its_kernels_agree(switches, isa):
    if isa == "avx2" and not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2 + FMA + F16C")
    script = textwrap.dedent("""
        import json, torch, fourbit, fourbit.functional as F
        torch.manual_seed(0)
        w = torch.randn(70, 131)
        q, qs = F.quantize_4bit(w, blocksize=32, compress_statistics=True, quant_type="fp4")
        deq = F.dequantize_4bit(q, qs).float()
        worst = 0.0
        for m in (1, 3, 33):
            x = torch.randn(m, 131, requires_grad=True)
            y = fourbit.matmul_4bit(x, q.t(), qs)
            y.backward(torch.ones_like(y))
            ref = x.detach() @ deq.t()
            worst = max(worst, ((y - ref).abs().max() / ref.abs().max()).item(),
                        ((x.grad - deq.sum(0)).abs().max() / deq.sum(0).abs().max()).item())
        print(json.dumps({"isa": json.loads(torch.ops.fourbit.cpu_matmul_info())["isa"], "worst": worst}))
    """)
    e = dict(os.environ, FOURBIT_CPU_MATMUL="fused", **switches)
    r = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["isa"] == isa
    assert out["worst"] < 1e-5, out


@pytest.mark.parametrize("mode", ["auto", "static", "fused", "blas"])
def test_fp16_is_fused_in_every_mode(monkeypatch, mode):
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", mode)
    q, qs = weight(64, 128, dtype=torch.float16)
    fourbit.matmul_4bit(torch.randn(2048, 128, dtype=torch.float16), q.t(), qs)
    assert info()["last"]["forward"] == "fused"


# The LoRA op's base product takes the gemm ops' choice (src/torch/cpu_dispatch.h): the same
# shape classes, measurements and cache entries. Per M: the op's outputs as int16 sums (bit
# patterns) and the path each direction took.
LORA_SCRIPT = textwrap.dedent("""
    import json, torch, fourbit.functional as F
    torch.manual_seed(0)
    torch.set_num_threads(2)
    w = torch.randn(512, 1024, dtype=torch.bfloat16) * 0.02
    q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    W, *args = F._weight_args(q, qs)
    A = torch.randn(16, 1024, dtype=torch.bfloat16) / 32
    B = torch.randn(512, 16, dtype=torch.bfloat16)

    def bits(t):
        return [t.view(torch.int16).sum().item(), t.view(torch.int16).square().sum().item()]

    def last():
        return json.loads(torch.ops.fourbit.cpu_matmul_info())["last"]

    # The blas path's products, replayed with ATen's ops on the dequantized weight: the op's
    # Y (dX) equals this bit for bit exactly when its forward (backward) took blas.
    wd = F.dequantize_4bit(q, qs)

    def dense(x, dy):
        y = torch.mm(x, wd.t()).addmm_(torch.mm(x, A.t()), B.t(), alpha=0.5)
        g = torch.addmm(torch.empty(x.shape[0], 16, dtype=x.dtype), dy, B, beta=0, alpha=0.5)
        return y, torch.mm(dy, wd).addmm_(g, A)

    out, paths, is_dense = [], {}, {}
    for m in (3, 64, 300):
        x = torch.randn(m, 1024, dtype=torch.bfloat16)
        y, xa = torch.ops.fourbit.lora_4bit(x, W, *args[:4], None, *args[4:], A, B, 0.5, None)  # no bias
        fwd = last()["lora_forward"]
        dy = torch.randn(m, 512, dtype=torch.bfloat16)
        # XA from ATen, not the forward: the backward's outputs then depend on its own path only.
        grads = torch.ops.fourbit.lora_4bit_backward(dy, W, *args, A, B, 0.5, x, torch.mm(x, A.t()), False,
                                                     [True, False, True, True])
        paths[m] = [fwd, last()["lora_backward"]]
        y_dense, dx_dense = dense(x, dy)
        is_dense[m] = [torch.equal(y, y_dense), torch.equal(grads[0], dx_dense)]
        out.append(bits(y) + bits(xa) + bits(grads[0]) + bits(grads[2]) + bits(grads[3]))
    info = json.loads(torch.ops.fourbit.cpu_matmul_info())
    print(json.dumps({"out": out, "paths": paths, "is_dense": is_dense, "info": info}))
""")


def lora_run(tmp_path, **env):
    return run(tmp_path, LORA_SCRIPT, **env)[0]


def test_lora_op_measures_caches_and_a_second_process_repeats_it(tmp_path):
    first = lora_run(tmp_path)
    # The base products' shape classes: 3 M classes x (forward, input gradient), each
    # measured once and written as the gemm ops' entries.
    assert first["info"]["measurements"] == 6
    entries = json.loads(cache_file(tmp_path).read_text())["entries"]
    key = first["info"]["machine_key"] + "||"
    assert sorted(entries) == sorted(key + f"{d}/bfloat16/m{mc}/n512/k1024"
                                     for d in ("fwd", "grad") for mc in (4, 64, 512))
    for m, mc in ((3, 4), (64, 64), (300, 512)):
        want = [entries[key + f"fwd/bfloat16/m{mc}/n512/k1024"], entries[key + f"grad/bfloat16/m{mc}/n512/k1024"]]
        assert first["paths"][str(m)] == want, m
        assert first["is_dense"][str(m)] == [p == "blas" for p in want], m
    second = lora_run(tmp_path)
    assert second["info"]["measurements"] == 0
    assert second["paths"] == first["paths"]
    assert second["out"] == first["out"]  # bit-identical Y, XA, dX, dA, dB


def test_lora_op_obeys_a_flipped_cache_and_computes_that_path(tmp_path):
    """Flip every cached choice: the LoRA op takes the flipped path in each direction: its
    Y and dX are bit for bit ATen's products on the dequantized weight exactly where the
    entry says blas, and all its outputs are bit for bit those of that path forced (which
    differ between the two paths, so the comparison can tell them apart)."""
    lora_run(tmp_path)
    path = cache_file(tmp_path)
    entries = json.loads(path.read_text())["entries"]
    flipped = {k: ("fused" if v == "blas" else "blas") for k, v in entries.items()}
    path.write_text(json.dumps({"version": 1, "entries": flipped}))
    got = lora_run(tmp_path)
    assert got["info"]["measurements"] == 0
    forced = {mode: lora_run(tmp_path / mode, FOURBIT_CPU_MATMUL=mode) for mode in ("fused", "blas")}
    assert forced["fused"]["out"] != forced["blas"]["out"]
    key = got["info"]["machine_key"] + "||"
    for i, (m, mc) in enumerate(((3, 4), (64, 64), (300, 512))):
        fwd, grad = flipped[key + f"fwd/bfloat16/m{mc}/n512/k1024"], flipped[key + f"grad/bfloat16/m{mc}/n512/k1024"]
        assert got["paths"][str(m)] == [fwd, grad], m
        assert got["is_dense"][str(m)] == [fwd == "blas", grad == "blas"], m
        for mode in ("fused", "blas"):
            assert forced[mode]["is_dense"][str(m)] == [mode == "blas"] * 2, (mode, m)
        # Y, XA follow the forward's path; dX, dA, dB the backward's.
        assert got["out"][i][:4] == forced[fwd]["out"][i][:4], m
        assert got["out"][i][4:] == forced[grad]["out"][i][4:], m


# ------------------------------------------------------------ untrusted measurements, remeasure

def test_untrusted_measurement_is_used_but_not_cached_and_measured_again_later(tmp_path):
    """A measurement judged untrusted (forced here; src/torch/cpu_dispatch_trust.h judges a
    real one) decides this process's path but is not written; the next process measures
    that class again, and a trusted measurement then is cached."""
    first, log = run(tmp_path, FOURBIT_CPU_MATMUL_TEST_FORCE="noisy", FOURBIT_CPU_MATMUL_LOG="1")
    i = first["info"]
    assert i["measurements"] == 6 and i["provisional"] == 6
    assert all(c["provisional"] and "FOURBIT_CPU_MATMUL_TEST_FORCE=noisy" in c["untrusted"]
               and c["source"].startswith("measured") and c["path"] in ("fused", "blas")
               for c in i["choices"].values())
    assert log.count("provisional, not cached: forced by FOURBIT_CPU_MATMUL_TEST_FORCE=noisy") == 6
    assert not cache_file(tmp_path).exists()
    # The choice is used within the process: the last call (M=300's input gradient) took it.
    assert i["last"]["grad_input"] == i["choices"]["grad/bfloat16/m512/n512/k1024"]["path"]
    # A later process measures again; trusted this time, so it is cached.
    second, _ = run(tmp_path)
    assert second["info"]["measurements"] == 6 and second["info"]["provisional"] == 0
    assert not any(c["provisional"] for c in second["info"]["choices"].values())
    assert len(json.loads(cache_file(tmp_path).read_text())["entries"]) == 6


def flip(entries):
    return {k: ("fused" if v == "blas" else "blas") for k, v in entries.items()}


def test_remeasure_overwrites_planted_entries_and_keeps_other_machines(tmp_path):
    run(tmp_path)
    path = cache_file(tmp_path)
    other = "Other CPU|avx2|threads=2|torch=0.0||fwd/bfloat16/m4/n512/k1024"
    planted = dict(flip(json.loads(path.read_text())["entries"]), **{other: "blas"})
    planted_text = json.dumps({"version": 1, "entries": planted})
    path.write_text(planted_text)
    again, _ = run(tmp_path, FOURBIT_CPU_MATMUL="remeasure")
    i = again["info"]
    assert i["mode"] == "remeasure" and i["measurements"] == 6
    assert all(c["source"].startswith("measured") for c in i["choices"].values())
    # Every entry of this machine is the new measurement's (rewritten in fourbit's format);
    # another machine's entry is untouched.
    text = path.read_text()
    assert text != planted_text
    entries = json.loads(text)["entries"]
    assert entries == dict({i["machine_key"] + "||" + k: c["path"] for k, c in i["choices"].items()},
                           **{other: "blas"})


CLEAR_SCRIPT = textwrap.dedent("""
    import json, torch, fourbit, fourbit.functional as F
    torch.set_num_threads(2)
    w = torch.randn(512, 1024, dtype=torch.bfloat16) * 0.02
    q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    fourbit.matmul_4bit(torch.randn(3, 1024, dtype=torch.bfloat16), q.t(), qs)
    before = json.loads(torch.ops.fourbit.cpu_matmul_info())
    dropped = [fourbit.cpu_matmul_cache_clear(), fourbit.cpu_matmul_cache_clear()]
    after_clear = json.loads(torch.ops.fourbit.cpu_matmul_info())
    fourbit.matmul_4bit(torch.randn(3, 1024, dtype=torch.bfloat16), q.t(), qs)
    after = json.loads(torch.ops.fourbit.cpu_matmul_info())
    print(json.dumps({"before": before, "dropped": dropped, "after_clear": after_clear, "after": after}))
""")


def test_cache_clear_drops_this_machines_entries_only(tmp_path):
    first, _ = run(tmp_path)
    path = cache_file(tmp_path)
    entries = json.loads(path.read_text())["entries"]
    key = first["info"]["machine_key"]
    prefix = key[:key.index("|threads=") + 1]
    others = {"Other CPU|avx2|threads=2|torch=0.0||fwd/bfloat16/m4/n512/k1024": "blas",
              "Other CPU|amx|threads=8|torch=0.0||grad/bfloat16/m64/n512/k1024": "fused"}
    # The same CPU at another thread count is this machine too.
    mine = dict(entries, **{prefix + "threads=99|torch=0.0||fwd/bfloat16/m4/n512/k1024": "fused"})
    path.write_text(json.dumps({"version": 1, "entries": dict(mine, **others)}))
    out, _ = run(tmp_path, CLEAR_SCRIPT)
    assert out["before"]["measurements"] == 0 and len(out["before"]["choices"]) == 1  # from the cache
    assert out["dropped"] == [len(mine), 0]
    assert out["after_clear"]["choices"] == {}
    assert out["after"]["measurements"] == 1  # this process measured that class again
    left = json.loads(path.read_text())["entries"]
    assert left == dict(others, **{key + "||fwd/bfloat16/m4/n512/k1024":
                                   out["after"]["choices"]["fwd/bfloat16/m4/n512/k1024"]["path"]})
    assert not list(path.parent.glob("*.tmp.*"))  # the rewrite's temporary file is gone


def test_cache_clear_on_a_corrupt_or_missing_cache(tmp_path):
    script = "import json, fourbit; print(json.dumps({'dropped': fourbit.cpu_matmul_cache_clear()}))"
    out, _ = run(tmp_path, script)
    assert out == {"dropped": 0} and not cache_file(tmp_path).exists()
    cache_file(tmp_path).parent.mkdir(parents=True)
    cache_file(tmp_path).write_text("not json")
    out, log = run(tmp_path, script)
    assert out == {"dropped": 0} and "corrupt CPU matmul cache" in log
