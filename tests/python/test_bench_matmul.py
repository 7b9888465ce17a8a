"""benchmarks/bench_matmul.py's CPU-side logic: the grid of rows and kernel columns that
``--algos`` times on a GPU (issue 14: every kernel vs bitsandbytes, torch bf16 and
dequantize + cuBLAS, M in {1, ..., 4096}, fwd and fwd+bwd, one run), and --dry-run."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_matmul.py"


def load_bench():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_matmul", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_algos_grid_covers_every_kernel_shape_m_and_mode():
    bench = load_bench()
    args = bench.parse_args(["--device", "cuda", "--algos", "--json", "/dev/null"])
    assert tuple(args.ms) == (1, 8, 16, 32, 64, 128, 512, 4096)
    rows = bench.plan_rows(args, "cuda", bnb_available=True)
    assert len(rows) == 4 * 8 * 2
    assert {r["shape"] for r in rows} == {"q_proj", "kv_proj", "up_proj", "down_proj"}
    for r in rows:
        for base in ("torch_bf16", "deq+linear", "bitsandbytes", "fourbit"):
            assert base in r["labels"]
        for algo in ("fused", "fused_sm90", "tensor_core", "dequant_cublas"):
            assert f"fourbit[{algo}]" in r["labels"]
        assert ("fourbit[gemv]" in r["labels"]) == (r["mode"] == "fwd")  # no gradient kernel


def test_algos_are_cuda_only_and_dry_run_runs_nothing(capsys):
    bench = load_bench()
    args = bench.parse_args(["--device", "cpu", "--algos", "--json", "/dev/null"])
    assert all(not label.startswith("fourbit[") for r in bench.plan_rows(args, "cpu", False) for label in r["labels"])
    assert bench.main(["--device", "cuda", "--algos", "--dry-run", "--no-bnb", "--shapes", "q_proj"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 8 * 2 and "fourbit[fused]" in out[0]
