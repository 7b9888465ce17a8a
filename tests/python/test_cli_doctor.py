"""``fourbit doctor``: every check reports, a failing check gives exit code 5 and its fix, and a
training config's precision mismatch and a missing prepare_model_for_kbit_training are caught."""

import pytest
import yaml

import fourbit.cli.doctor as doctor
from _cli_helpers import run


def test_runs_on_this_machine():
    out = run("doctor").output
    assert "fourbit extension" in out and "CPU vector unit" in out and "torch CUDA build" in out
    assert "no failures" in out


def test_a_failed_check_exits_5_with_its_fix(monkeypatch):
    monkeypatch.setattr(doctor, "gpu_checks", lambda: [doctor.Check("libcudart loads", "FAIL", "not found",
                                                                    "install the CUDA runtime")])
    out = run("doctor", expect=5).output
    assert "FAIL" in out and "install the CUDA runtime" in out and "libcudart loads" in out


def test_config_checks(tmp_path):
    cfg = dict(model="m", output_dir="o", data="d", compute_dtype="float16", precision="bfloat16", prepare_kbit=False)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = run("doctor", "--config", tmp_path / "c.yaml").output
    assert "set compute_dtype: bfloat16" in out and "set prepare_kbit: true" in out
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(dict(cfg, compute_dtype="bfloat16", prepare_kbit=True)))
    out = run("doctor", "--config", tmp_path / "ok.yaml").output
    assert "both bfloat16" in out and "set compute_dtype" not in out and "set prepare_kbit" not in out
    assert "does not exist" in run("doctor", "--config", tmp_path / "none.yaml", expect=3).output
    (tmp_path / "bad.yaml").write_text("lora_rank: 3\n")
    assert "lora_rank" in run("doctor", "--config", tmp_path / "bad.yaml", expect=2).output


@pytest.mark.cuda
def test_gpu_checks_pass_on_a_gpu():
    checks = {c.name: c for c in doctor.gpu_checks()}
    assert checks["libcudart loads"].status == "PASS" and checks["cuBLAS loads"].status == "PASS"
    assert checks["fourbit kernels run on this GPU"].status == "PASS"


def test_openmp_wait_check(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    warn = doctor.openmp_wait_check(threads=2, cores=2)
    assert warn.status == "WARN" and "GOMP_SPINCOUNT=1000" in warn.fix and "2 threads on 2 cores" in warn.found
    assert doctor.openmp_wait_check(threads=1, cores=2).status == "PASS"
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    ok = doctor.openmp_wait_check(threads=2, cores=2)
    assert ok.status == "PASS" and "GOMP_SPINCOUNT=1000" in ok.found


def test_cpu_matmul_check(monkeypatch):
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", "static")
    ok = doctor.cpu_matmul_check()
    assert ok.status in ("PASS", "WARN") and "ISA class" in ok.found and "fixed rule" in ok.found
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", "auto")
    assert "measured per shape class" in doctor.cpu_matmul_check().found
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", "quick")
    bad = doctor.cpu_matmul_check()
    assert bad.status == "FAIL" and "FOURBIT_CPU_MATMUL" in bad.found and "'quick'" in bad.found


def test_cpu_matmul_check_shows_provisional_choices(monkeypatch, tmp_path):
    """A measurement judged untrusted in this process (forced by the test-only switch) is
    listed as provisional, with its reason."""
    import torch

    import fourbit
    import fourbit.functional as F

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("FOURBIT_CPU_MATMUL", "auto")
    monkeypatch.setenv("FOURBIT_CPU_MATMUL_TEST_FORCE", "noisy")
    q, qs = F.quantize_4bit(torch.randn(192, 320, dtype=torch.bfloat16), blocksize=64, quant_type="nf4")
    fourbit.matmul_4bit(torch.randn(5, 320, dtype=torch.bfloat16), q.t(), qs)  # a class no other test uses
    found = doctor.cpu_matmul_check().found
    assert "provisional (measured under load, not cached): fwd/bfloat16/m8/n256/k512 ->" in found, found
    assert "FOURBIT_CPU_MATMUL_TEST_FORCE=noisy" in found
    assert not (tmp_path / "fourbit" / "cpu_matmul.json").exists()


def test_remeasure_cpu_matmul_drops_this_machines_entries(monkeypatch, tmp_path):
    import json

    import torch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = json.loads(torch.ops.fourbit.cpu_matmul_info())["machine_key"]
    path = tmp_path / "fourbit" / "cpu_matmul.json"
    path.parent.mkdir()
    other = {"Other CPU|avx2|threads=2|torch=0.0||fwd/bfloat16/m4/n512/k1024": "fused"}
    path.write_text(json.dumps({"version": 1, "entries": dict(other, **{key + "||fwd/bfloat16/m4/n8/k8": "blas",
                                                                        key + "||grad/float32/m4/n8/k8": "fused"})}))
    out = run("doctor", "--remeasure-cpu-matmul").output
    assert "dropped 2 cached CPU matmul choice(s) for this machine" in out
    assert json.loads(path.read_text())["entries"] == other
