#!/usr/bin/env python3
"""Kernel lint: compile every CUDA kernel for sm_80 and sm_90a and check what ptxas and the
SASS say, on a machine without a GPU (CI runs it; see docs/kernels.md, "Kernel lint").

Each cuda/*.cu file with a __global__ is compiled once (device code only, both archs, the
library's own flags) with `-Xptxas -v --keep`; the script then reads
  - ptxas -v: registers, static shared memory, stack frame and spill bytes per kernel;
  - the PTX: .maxntid (every kernel declares __launch_bounds__, so its CTA size is known);
  - the SASS (nvdisasm on the kept cubins, which names the called subroutines): LDSM, HMMA
    and HGMMA (Hopper's wgmma) counts, and calls to the 64-bit integer division routines.

It fails when
  - a hot kernel spills or keeps a stack frame (local memory on the hot path);
  - any kernel calls a 64-bit integer division / remainder routine (blocksizes are powers
    of two: shift; tile counts come from the host's launch plan);
  - a tensor-core kernel (HMMA) loads its fragments without LDSM;
  - a warpgroup kernel (WGMMA_KERNELS) has no HGMMA in its sm_90a SASS (it fell back to a
    slower path, or its body was compiled out);
  - the CTAs per SM that its registers and shared memory allow fall below the floor
    documented for it below;
  - a kernel has no __launch_bounds__, or is missing from the table below.

--write-docs replaces the table between the kernel-lint markers in docs/kernels.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90a")
DOCS = ROOT / "docs" / "kernels.md"
BEGIN, END = "<!-- kernel-lint:begin -->", "<!-- kernel-lint:end -->"

# Per-SM limits used for the occupancy estimate (CUDA C++ Programming Guide, compute
# capability tables): registers, register allocation unit per warp, shared memory per SM,
# shared memory the driver reserves per CTA, threads and CTAs per SM.
SM_LIMITS = {
    "sm_80": dict(regs=65536, reg_unit=256, smem=167936, smem_reserved=1024, threads=2048, ctas=32),
    "sm_90a": dict(regs=65536, reg_unit=256, smem=233472, smem_reserved=1024, threads=2048, ctas=32),
}

# (pattern on the kernel's short name, hot, floor of CTAs per SM, why that floor).
# Hot kernels run on every step of training or decoding: they must not touch local memory.
# The floor keeps enough warps resident to hide memory latency for that kernel's access
# pattern; a change that drops below it needs a measured reason.
KERNELS = [
    (r"dequantize_4bit_vec_kernel", True, 4,
     "memory bound: >= 32 warps per SM keep enough 16-byte loads in flight for HBM"),
    (r"dequantize_4bit_scalar_kernel", False, 4, "tail / unaligned path, same access pattern"),
    (r"quantize_4bit_kernel", False, 4, "one warp per block; latency bound on the absmax reduction"),
    (r"quantize_blockwise_kernel", False, 4, "one warp per block, as quantize_4bit"),
    (r"dequantize_blockwise_kernel", False, 4, "elementwise, memory bound"),
    (r"gemv_4bit_kernel<float, \w+, 8>", True, 2,
     "fp32 activations, 2..8 rows: 64 activation registers per word (not a QLoRA hot path)"),
    (r"gemv_4bit_kernel", True, 4,
     "memory bound on the packed weight: >= 32 warps per SM to cover HBM latency"),
    (r"tiled_4bit_kernel", True, 2,
     "tensor-core tile: two CTAs per SM overlap one CTA's loads with the other's MMAs"),
    (r"fused_4bit_kernel", True, 2,
     "fused fragment-layout GEMM: 4 warps, a 4-stage cp.async pipeline hides HBM latency "
     "inside one CTA; two CTAs per SM overlap one's epilogue / prologue with the other's MMAs"),
    (r"fused_4bit_grad_input_kernel", True, 2, "input gradient of the fused GEMM, as fused_4bit_kernel"),
    (r"fused_4bit_sm90_kernel", True, 1,
     "Hopper fused GEMM: 2 warpgroups, 84 KB of cp.async ring and 64 fp32 accumulators a thread; "
     "one CTA per SM is the floor (__launch_bounds__(256, 1)), wgmma keeps the tensor cores fed"),
    (r"fused_sm90_probe_kernel", False, 1, "one-time check that the loaded code is sm_90a's"),
    (r"fused_splitk_reduce_kernel", False, 4, "split-K partial sums: elementwise, memory bound"),
    (r"repack_fragments_kernel", False, 4, "one-time weight repack into the fragment layout"),
    (r"repack_scales_kernel", False, 4, "one-time scale transpose for the fragment layout"),
    (r"small_gemm_kernel", False, 2, "LoRA adapter products: small reductions"),
    (r"adamw_multi_tensor_kernel", True, 2,
     "optimizer step: 16 warps per SM x 8 elements per lane saturate HBM (launch bounds)"),
]

# Kernels built on wgmma (sm_90a): their sm_90a SASS must hold HGMMA. On other archs their
# body is compiled out (a trap), so only the sm_90a row is checked.
WGMMA_KERNELS = [r"fused_4bit_sm90_kernel"]

DIV_CALL = re.compile(r"CALL\.[A-Z.]*\s+`\(\$__internal_\d+_\$__cuda_sm\d+_(div|rem)_([su]64)\)")


def find_tool(name: str, env: str) -> str:
    """A CUDA binary utility: $env, PATH, /usr/local/cuda/bin, or the nvidia-* pip packages."""
    if os.environ.get(env):
        return os.environ[env]
    found = shutil.which(name)
    if found:
        return found
    candidates = [pathlib.Path("/usr/local/cuda/bin") / name]
    for site in map(pathlib.Path, sys.path):
        candidates += sorted(site.glob(f"nvidia/cu*/bin/{name}")) + sorted(site.glob(f"nvidia/cuda_*/bin/{name}"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    sys.exit(f"kernel_lint: {name} not found (set {env}, or run scripts/setup.sh, which installs "
             f"the nvidia-cuda-nvdisasm package)")


def kernel_sources() -> list[pathlib.Path]:
    return sorted(p for p in (ROOT / "cuda").glob("*.cu") if "__global__" in p.read_text())


def compile_file(nvcc: str, src: pathlib.Path, out: pathlib.Path) -> str:
    """Compiles src's device code for every arch, keeping the PTX and cubins; returns ptxas -v."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, "-fatbin", "-O3", "-std=c++17", "-fmad=false", "-Xptxas", "-v", "--keep",
           "--keep-dir", str(out), f"-I{ROOT / 'include'}", f"-I{ROOT / 'cuda'}",
           "-o", str(out / (src.stem + ".fatbin")), str(src)]
    for arch in ARCHS:
        virtual = arch.replace("sm_", "compute_")
        cmd.append(f"-gencode=arch={virtual},code={arch}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kernel_lint: nvcc failed on {src.name}:\n{r.stdout}{r.stderr}")
    return r.stderr


def demangle(names: list[str]) -> dict[str, str]:
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    short = {}
    for mangled, full in zip(names, r.stdout.splitlines()):
        name = re.sub(r"^void |\(anonymous namespace\)::|fourbit::(cuda::)?", "", full)
        depth, cut = 0, len(name)
        for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside <>
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
                break
        short[mangled] = name[:cut]
    return short


def parse_ptxas(log: str) -> dict[tuple[str, str], dict]:
    info, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            info[current] = dict(regs=0, smem=0, stack=0, spill_st=0, spill_ld=0)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            info[current]["smem"] = int(s.group(1)) if s else 0
    return info


def parse_ptx(text: str) -> dict[str, int]:
    """Kernel name -> .maxntid (threads per CTA), from a PTX file."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\S+)\s*\((.*?)\)\s*(.*?)\{", text, re.S):
        t = re.search(r"\.maxntid\s+(\d+),\s*(\d+),\s*(\d+)", m.group(3))
        out[m.group(1)] = math.prod(int(x) for x in t.groups()) if t else 0
    return out


def parse_sass(text: str) -> dict[str, dict]:
    """Kernel name -> LDSM / HMMA / HGMMA counts and 64-bit division calls, from nvdisasm -c output."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\.text\.(\S+):$", line.strip())
        if m:
            current = out.setdefault(m.group(1), dict(ldsm=0, hmma=0, hgmma=0, div64=0))
            continue
        if current is None:
            continue
        current["ldsm"] += "LDSM" in line
        current["hmma"] += "HMMA" in line
        current["hgmma"] += bool(re.search(r"\bHGMMA\b", line))
        current["div64"] += bool(DIV_CALL.search(line))
    return out


def ctas_per_sm(arch: str, regs: int, smem: int, threads: int) -> int:
    lim = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by_regs = (lim["regs"] // regs_per_warp) // warps
    by_smem = lim["smem"] // (smem + lim["smem_reserved"])
    by_threads = lim["threads"] // (warps * 32)
    return min(by_regs, by_smem, by_threads, lim["ctas"])


def rule_for(name: str):
    for pattern, hot, floor, why in KERNELS:
        if re.match(pattern, name):
            return hot, floor, why
    return None


def lint(jobs: int, only: list[str] | None = None) -> tuple[list[dict], list[str]]:
    nvcc = find_tool("nvcc", "NVCC")
    nvdisasm = find_tool("nvdisasm", "NVDISASM")
    sources = [s for s in kernel_sources() if not only or s.name in only or s.stem in only]
    if only and not sources:
        sys.exit(f"kernel_lint: no kernel file matches --only {' '.join(only)}")
    with tempfile.TemporaryDirectory(prefix="kernel_lint_") as tmp:
        tmp = pathlib.Path(tmp)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            logs = list(pool.map(lambda s: compile_file(nvcc, s, tmp / s.stem), sources))
        rows, errors = [], []
        for src, log in zip(sources, logs):
            ptxas = parse_ptxas(log)
            for arch in ARCHS:
                virtual = arch.replace("sm_", "compute_")
                ptx = parse_ptx((tmp / src.stem / f"{src.stem}.{virtual}.ptx").read_text())
                cubin = tmp / src.stem / f"{src.stem}.{virtual}.cubin"
                sass = parse_sass(subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True,
                                                 text=True, check=True).stdout)
                names = sorted(k for (k, a) in ptxas if a == arch)
                short = demangle(names)
                for k in names:
                    p, s = ptxas[(k, arch)], sass.get(k, dict(ldsm=0, hmma=0, hgmma=0, div64=0))
                    threads = ptx.get(k, 0)
                    row = dict(file=src.name, arch=arch, name=short[k], threads=threads, **p, **s)
                    where = f"{src.name} {arch} {short[k]}"
                    rule = rule_for(short[k])
                    if rule is None:
                        errors.append(f"{where}: not in kernel_lint.py's KERNELS table (add it with "
                                      f"its hot flag and CTA floor)")
                        continue
                    hot, floor, _ = rule
                    if threads == 0:
                        errors.append(f"{where}: no __launch_bounds__ (its CTA size must be known)")
                        continue
                    row["ctas"] = ctas_per_sm(arch, p["regs"], p["smem"], threads)
                    row["floor"] = floor
                    if hot and (p["spill_st"] or p["spill_ld"] or p["stack"]):
                        errors.append(f"{where}: hot kernel uses local memory (stack {p['stack']} B, "
                                      f"spill stores {p['spill_st']} B, loads {p['spill_ld']} B)")
                    if s["div64"]:
                        errors.append(f"{where}: {s['div64']} call(s) to a 64-bit integer division "
                                      f"routine (use a shift or a host-planned count)")
                    if s["hmma"] and not s["ldsm"]:
                        errors.append(f"{where}: tensor-core kernel ({s['hmma']} HMMA) loads its "
                                      f"fragments without LDSM")
                    if (arch == "sm_90a" and any(re.match(w, short[k]) for w in WGMMA_KERNELS)
                            and not s["hgmma"]):
                        errors.append(f"{where}: warpgroup kernel without HGMMA in its sm_90a SASS")
                    if row["ctas"] < floor:
                        errors.append(f"{where}: {row['ctas']} CTAs/SM ({p['regs']} registers, "
                                      f"{p['smem']} B smem, {threads} threads) below the floor {floor}")
                    rows.append(row)
    return rows, errors


def table(rows: list[dict]) -> str:
    lines = [BEGIN,
             "| file | kernel | arch | threads | registers | smem (B) | stack / spill (B) | LDSM | "
             "HMMA | HGMMA | CTAs/SM (floor) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["file"], r["name"], r["arch"])):
        lines.append(f"| {r['file']} | `{r['name']}` | {r['arch']} | {r['threads']} | {r['regs']} | "
                     f"{r['smem']} | {r['stack']} / {r['spill_st'] + r['spill_ld']} | {r['ldsm']} | "
                     f"{r['hmma']} | {r['hgmma']} | {r['ctas']} ({r['floor']}) |")
    lines.append(END)
    return "\n".join(lines)


def write_docs(rows: list[dict]) -> None:
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"kernel_lint: {DOCS} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(head + table(rows) + tail)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/kernels.md")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc runs")
    ap.add_argument("--only", nargs="+", metavar="FILE",
                    help="lint only these cuda/ files (e.g. gemm_4bit_fused.cu); not with --write-docs")
    args = ap.parse_args()
    if args.only and args.write_docs:
        ap.error("--write-docs needs every kernel: drop --only")
    rows, errors = lint(args.jobs, args.only)
    worst = {}
    for r in rows:
        worst[r["arch"]] = max(worst.get(r["arch"], 0), r["regs"])
    print(f"kernel_lint: {len(rows)} kernel instances checked on {', '.join(ARCHS)} "
          f"(max registers: {worst})")
    if args.write_docs:
        write_docs(rows)
        print(f"kernel_lint: table written to {DOCS.relative_to(ROOT)}")
    for e in errors:
        print(f"kernel_lint: FAIL {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
