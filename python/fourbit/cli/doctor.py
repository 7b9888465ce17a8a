"""``fourbit doctor``: the troubleshooting page as checks. Each prints PASS, WARN, FAIL or SKIP
with what it found and, when it is not a pass, the fix. Exit code 5 if any check fails."""

from __future__ import annotations

import ctypes
import glob
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click
from rich.table import Table

from ._common import EXIT_CHECK_FAILED, CliError, console

STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "red", "SKIP": "dim"}


@dataclass
class Check:
    name: str
    status: str
    found: str
    fix: str = ""


def _load_library(stem: str) -> tuple[Optional[ctypes.CDLL], str]:
    """Loads lib<stem> from the system path or from the nvidia-* wheels torch depends on."""
    import torch

    names = [f"lib{stem}.so"] + [f"lib{stem}.so.{v}" for v in (13, 12, 11)]
    roots = [Path(torch.__file__).parent / "lib"]
    try:
        import nvidia  # the CUDA wheels torch installs

        roots += [Path(p) for p in nvidia.__path__]
    except ImportError:
        pass
    candidates = names + [p for r in roots for n in names for p in glob.glob(str(r / "**" / n), recursive=True)]
    errors = []
    for name in candidates:
        try:
            return ctypes.CDLL(name), name
        except OSError as e:
            errors.append(str(e))
    return None, errors[0] if errors else f"lib{stem} not found"


def cpu_checks() -> list[Check]:
    import torch

    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    avx512 = "avx512f" in flags
    avx2 = {"avx2", "fma", "f16c"} <= flags
    out = [Check("CPU vector unit", "PASS" if avx512 or avx2 or capability.startswith("AVX512") else "WARN",
                 f"torch capability {capability}; avx512f {'yes' if avx512 else 'no'}, "
                 f"avx2+fma+f16c {'yes' if avx2 else 'no'}",
                 "" if avx512 else "fourbit's 4-bit CPU kernels use AVX2 + FMA here (AVX-512 ones are faster)"
                 if avx2 else "no AVX2: fourbit's 4-bit CPU kernels are the portable scalar ones (slow)")]
    bf16 = "avx512_bf16" in flags
    out.append(Check("CPU bf16 (AVX512_BF16)", "PASS" if bf16 else "WARN",
                     "avx512_bf16 present" if bf16 else "no avx512_bf16 flag",
                     "" if bf16 else "bf16 training on this CPU converts in software; prefer float32 compute"))
    out.append(openmp_wait_check(torch.get_num_threads(), os.cpu_count() or 1))
    out.append(cpu_matmul_check())
    return out


# The fused 4-bit kernels each ISA class of fourbit.cpu_isa runs (src/kernel_isa.h).
ISA_KERNELS = {
    "portable": "scalar kernels",
    "avx2": "AVX2 + FMA kernels",
    "avx512": "AVX-512 kernels",
    "avx512_bf16": "AVX-512 kernels, bf16 dot products",
    "amx": "AVX-512 kernels, AMX tiles for bf16 blocked products",
}


def cpu_matmul_check() -> Check:
    """How the CPU 4-bit matmul picks its kernel here (src/torch/cpu_dispatch.cpp): the ISA
    class, FOURBIT_CPU_MATMUL, and the cached per-shape choices for this machine."""
    import json

    import torch

    import fourbit  # noqa: F401  (registers torch.ops.fourbit)

    try:
        info = json.loads(torch.ops.fourbit.cpu_matmul_info())
    except ValueError as e:  # a bad FOURBIT_CPU_MATMUL
        return Check("CPU matmul dispatch", "FAIL", str(e), "unset FOURBIT_CPU_MATMUL or set it to auto, static, "
                     "fused, blas or remeasure")
    cached = 0
    if info["cache_file"] and os.path.exists(info["cache_file"]):
        try:
            entries = json.load(open(info["cache_file"])).get("entries", {})
            cached = sum(k.startswith(info["machine_key"] + "||") for k in entries)
        except (OSError, ValueError, AttributeError):
            cached = -1
    found = (f"ISA class {info['isa']} ({ISA_KERNELS.get(info['isa'], 'unknown')}), {info['threads']} threads, FOURBIT_CPU_MATMUL={info['mode']}; "
             + {"auto": f"measured per shape class, {'corrupt cache' if cached < 0 else f'{cached} cached'} "
                        f"in {info['cache_file'] or '(no cache directory)'}",
                "remeasure": f"measured again per shape class, overwriting {info['cache_file'] or '(no cache directory)'}",
                "static": f"fixed rule: dequantize + GEMM from M = {info['static_blas_min_rows']}",
                "fused": "always the fused kernels", "blas": "always dequantize + GEMM"}[info["mode"]])
    provisional = {k: v["untrusted"] for k, v in info["choices"].items() if v["provisional"]}
    if provisional:
        found += "; provisional (measured under load, not cached): " + ", ".join(
            f"{k} -> {info['choices'][k]['path']} ({why})" for k, why in provisional.items())
    elif info["mode"] in ("auto", "remeasure") and 0 <= info["cores"] < info["loadavg"]:
        found += (f"; load average {info['loadavg']:.2f} above the {info['cores']} cores: a measurement now "
                  "would be provisional (used, not cached)")
    if info["amx_hardware"] and info["isa"] != "amx":
        return Check("CPU matmul dispatch", "WARN", found + "; the CPU has AMX but fourbit does not use it",
                     "unset FOURBIT_DISABLE_AMX; on Linux < 5.16 the kernel cannot grant AMX tile data")
    if info["isa"] == "portable" and os.environ.get("FOURBIT_DISABLE_AVX2") == "1":
        return Check("CPU matmul dispatch", "WARN", found + "; FOURBIT_DISABLE_AVX2=1 forces the scalar kernels",
                     "unset FOURBIT_DISABLE_AVX2 (it is for tests)")
    return Check("CPU matmul dispatch", "PASS", found)


def openmp_wait_check(threads: int, cores: int) -> Check:
    """OpenMP's idle workers spin by default; on a CPU shared with another job (another torch
    process, a second training run) the spinning pools steal each other's time slices and a
    2-thread step ran 2x slower than 1 thread (docs/BENCHMARKS.md, "Training step under CPU
    load"). libgomp reads its wait settings when it loads, so they can only come from the
    environment the process starts with: this check shows which is in force."""
    policy, spin = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    if policy or spin:
        found = ", ".join(f"{k}={v}" for k, v in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spin)) if v)
        return Check("OpenMP idle wait", "PASS", found)
    if threads <= 1:
        return Check("OpenMP idle wait", "PASS", "default (spin); 1 thread, nothing to spin")
    return Check("OpenMP idle wait", "WARN", f"default (spin), {threads} threads on {cores} cores",
                 "on a CPU shared with other jobs start training with GOMP_SPINCOUNT=1000 "
                 "(or OMP_WAIT_POLICY=passive) in the environment")


def gpu_checks() -> list[Check]:
    import torch

    import fourbit

    checks = []
    built = fourbit.built_with_cuda()
    if torch.version.cuda is None:
        return [Check("torch CUDA build", "SKIP", f"torch {torch.__version__} is a CPU build",
                      "for GPU training install a CUDA build of torch (pip install torch --index-url ...)")]
    checks.append(Check("torch CUDA build", "PASS", f"torch {torch.__version__}, CUDA {torch.version.cuda}"))
    if not torch.cuda.is_available():
        checks.append(Check("GPU visible", "WARN", "torch.cuda.is_available() is False",
                            "no GPU or driver: check nvidia-smi, the driver install and CUDA_VISIBLE_DEVICES "
                            "(CPU training still works)"))
        return checks
    try:
        driver = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(driver))
        dv = f"{driver.value // 1000}.{driver.value % 1000 // 10}"
        ok = driver.value >= int(float(torch.version.cuda) * 1000)
        checks.append(Check("driver", "PASS" if ok else "FAIL", f"driver supports CUDA {dv}",
                            "" if ok else f"torch needs CUDA {torch.version.cuda}: update the NVIDIA driver"))
    except (OSError, AttributeError) as e:
        checks.append(Check("driver", "FAIL", f"libcuda.so.1 does not load ({e})", "install the NVIDIA driver"))
    cudart, where = _load_library("cudart")
    checks.append(Check("libcudart loads", "PASS" if cudart else "FAIL", where,
                        "" if cudart else "install the CUDA runtime (nvidia-cuda-runtime wheel) or add its lib "
                        "directory to LD_LIBRARY_PATH"))
    cublas, where = _load_library("cublas")
    checks.append(Check("cuBLAS loads", "PASS" if cublas else "FAIL", where,
                        "" if cublas else "install cuBLAS (nvidia-cublas wheel) or add it to LD_LIBRARY_PATH"))
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if not built:
        checks.append(Check("fourbit CUDA kernels", "FAIL", "fourbit was built without CUDA",
                            f"rebuild: FOURBIT_CUDA=ON FOURBIT_CUDA_ARCHS={major}{minor} pip install --no-build-isolation ."))
    else:
        try:
            import fourbit.functional as F

            w = torch.randn(64, 64, device="cuda")
            packed, state = F.quantize_4bit(w, quant_type="nf4")
            F.dequantize_4bit(packed, state)
            torch.cuda.synchronize()
            checks.append(Check("fourbit kernels run on this GPU", "PASS", f"{name}, sm_{major}{minor}"))
        except Exception as e:  # "no kernel image is available" when the arch was not compiled
            checks.append(Check("fourbit kernels run on this GPU", "FAIL", f"{name} sm_{major}{minor}: {e}",
                                f"rebuild for this GPU: FOURBIT_CUDA_ARCHS={major}{minor} "
                                "pip install --no-build-isolation ."))
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(Check("GPU bf16", "PASS" if bf16 else "WARN", f"compute capability {major}.{minor}",
                        "" if bf16 else "no bf16 on this GPU: use float16 compute_dtype and fp16 training"))
    free, total = torch.cuda.mem_get_info()
    checks.append(Check("free GPU memory", "PASS" if free > 0.5 * total else "WARN",
                        f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free",
                        "" if free > 0.5 * total else "another process holds GPU memory (nvidia-smi shows which)"))
    if cudart is not None:
        value = ctypes.c_int()
        rc = cudart.cudaDeviceGetAttribute(ctypes.byref(value), 83, torch.cuda.current_device())  # ManagedMemory
        ok = rc == 0 and value.value == 1
        checks.append(Check("managed memory (paged optimizers)", "PASS" if ok else "WARN",
                            "supported" if ok else f"not supported (rc {rc})",
                            "" if ok else "paged optimizers fall back to device memory; use adamw_8bit"))
    return checks


def config_checks(path: Path) -> list[Check]:
    """The training config's precision settings: compute dtype vs training precision, and
    whether the model is prepared for k-bit training."""
    from .train_config import load_config

    cfg = load_config(path, {})
    checks = []
    if cfg.compute_dtype != cfg.precision:
        checks.append(Check("compute dtype vs precision", "WARN",
                            f"compute_dtype={cfg.compute_dtype} but precision={cfg.precision}",
                            f"set compute_dtype: {cfg.precision} (a mismatch casts every 4-bit matmul's input and "
                            "output, slower and less precise)"))
    else:
        checks.append(Check("compute dtype vs precision", "PASS", f"both {cfg.precision}"))
    if cfg.task == "causal_lm" and not cfg.prepare_kbit:
        checks.append(Check("prepare_model_for_kbit_training", "WARN", "prepare_kbit: false",
                            "set prepare_kbit: true (float32 norms/embeddings, input grads for checkpointing); "
                            "without it training may diverge or checkpointing may give no gradients"))
    else:
        checks.append(Check("prepare_model_for_kbit_training", "PASS",
                            "applied" if cfg.task == "causal_lm" else "not needed (contrastive encoder task)"))
    return checks


def run_checks(config: Optional[Path]) -> list[Check]:
    import torch

    checks = [Check("python / torch", "PASS", f"Python {platform.python_version()}, torch {torch.__version__}")]
    try:
        import fourbit

        checks.append(Check("fourbit extension", "PASS",
                            f"fourbit {fourbit.__version__}, CUDA kernels {'built' if fourbit.built_with_cuda() else 'not built'}"))
    except ImportError as e:
        checks.append(Check("fourbit extension", "FAIL", str(e), "reinstall: pip install --no-build-isolation ."))
        return checks
    checks += gpu_checks() + cpu_checks()
    try:  # the installed version, without importing it (its import probes for kernels)
        from importlib.metadata import PackageNotFoundError, version

        checks.append(Check("bitsandbytes (optional)", "PASS", version("bitsandbytes")))
    except PackageNotFoundError:
        checks.append(Check("bitsandbytes (optional)", "SKIP", "not installed",
                            "only needed to load checkpoints with transformers + bitsandbytes"))
    if config is not None:
        checks += config_checks(config)
    return checks


@click.command("doctor")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="a training YAML to check too (precision settings)")
@click.option("--remeasure-cpu-matmul", is_flag=True, default=False,
              help="drop this machine's cached CPU matmul choices (other machines' kept); the next run measures again")
def doctor_cmd(config, remeasure_cpu_matmul):
    """Check this machine (and optionally a training config) for what QLoRA training needs."""
    if config is not None and not Path(config).is_file():
        raise CliError(f"--config {str(config)!r} does not exist")
    if remeasure_cpu_matmul:
        import fourbit

        try:
            dropped = fourbit.cpu_matmul_cache_clear()
        except ValueError as e:
            raise CliError(f"--remeasure-cpu-matmul: {e}")
        console.print(f"dropped {dropped} cached CPU matmul choice(s) for this machine; the next run measures again")
    checks = run_checks(config)
    table = Table(title="fourbit doctor")
    for col in ("check", "status", "found"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{STYLE[c.status]}]{c.status}[/]", c.found)
    console.print(table)
    for c in checks:
        if c.status in ("FAIL", "WARN") and c.fix:
            console.print(f"[{STYLE[c.status]}]{c.status}[/] {c.name}: {c.fix}", soft_wrap=True)
    failed = [c.name for c in checks if c.status == "FAIL"]
    if failed:
        raise CliError(f"{len(failed)} check(s) failed: {', '.join(failed)}", EXIT_CHECK_FAILED)
    console.print(f"{sum(c.status == 'PASS' for c in checks)} passed, {sum(c.status == 'WARN' for c in checks)} "
                  "warnings, no failures")
