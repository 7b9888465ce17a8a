"""4-bit quantize / dequantize throughput: fourbit vs bitsandbytes, side by side in one run.

What is measured: NF4, blocksize 64 (both configurable), bf16 input and output, on the
Llama-3.1-8B projection shapes (N x K = out x in features):

    q_proj 4096x4096, kv_proj 1024x4096, up_proj 14336x4096, down_proj 4096x14336

For each shape and for plain (fp32 absmax) and nested (double-quantized absmax) states:
``quantize_4bit(W)`` and ``dequantize_4bit(packed, state)`` of fourbit and of
bitsandbytes, each library on its own output, plus a torch bf16 copy of the same weight
as the memory-bandwidth reference.

How it is timed:

- CUDA: median of ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
  call), or of a CUDA-event loop when triton is missing. On top of that every timed call
  takes the next of several input buffers (enough that they span twice the L2), so
  no call finds its input in cache.
- CPU: ``time.perf_counter`` around single calls after warm-up calls, median of
  ``--reps``; inputs rotate the same way against the last-level cache.

Reported per row: time, effective bandwidth and speedup = bitsandbytes time / fourbit
time (> 1: fourbit is faster). Effective bandwidth counts the bytes the operation must
move at least, taken from the actual fourbit tensors:

    dequantize:  packed + state read,  bf16 written      (numel/2 + state + 2*numel)
    quantize:    bf16 read,  packed + state written       (2*numel + numel/2 + state)

where state = absmax (fp32 per block, or uint8 when nested) + for nested the nested
absmax, the 256-entry nested code and the offset. The 16-entry codebook is left out.

Correctness guard (once per shape and state kind, outside the timing): fourbit's
dequantized output must equal bitsandbytes' dequantization of the same fourbit state,
bit for bit; and fourbit's packed codes / absmax are compared with bitsandbytes'
quantization of the same input. A mismatch prints a warning and is recorded in the JSON
(the run goes on). When bitsandbytes cannot be imported or fails on the device, the
script says 'bitsandbytes unavailable' and reports fourbit alone.

Output: a markdown table on stdout and a JSON file (default
benchmarks/results/quant_<device>.json) with device name, library versions, date,
command line and one record per measurement.

Run:
    python benchmarks/bench_quant.py                      # cuda if available, else cpu
    python benchmarks/bench_quant.py --device cpu --threads 2 --reps 3
    python benchmarks/bench_quant.py --device cpu --shapes small
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import fourbit
import fourbit.functional as F

# Llama-3.1-8B projection weights: (name, N = out_features, K = in_features).
LLAMA_8B_SHAPES = [
    ("q_proj", 4096, 4096),
    ("kv_proj", 1024, 4096),
    ("up_proj", 14336, 4096),
    ("down_proj", 4096, 14336),
]
# --shapes small divides N by this (for quick CPU runs).
SMALL_ROWS_DIVISOR = 4
# Rotate through enough input buffers to cover this multiple of the cache size.
CACHE_COVER = 2
MAX_ROTATING_BUFFERS = 64
DTYPE = torch.bfloat16
# Warn when other processes keep the CPUs busier than this before a CPU run.
BUSY_WARNING = 0.15


# ----------------------------------------------------------------------------- setup

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu")
    p.add_argument("--shapes", choices=("full", "small"), default="full",
                   help=f"'small' divides the rows of every shape by {SMALL_ROWS_DIVISOR}")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit codebook")
    p.add_argument("--blocksize", type=int, default=64, choices=(32, 64, 128, 256, 512, 1024, 2048, 4096),
                   help="elements per absmax block")
    p.add_argument("--reps", type=int, default=None,
                   help="timed calls per measurement (CPU; CUDA event loop). Default: CPU 3 for "
                        "full shapes, 10 for small; CUDA 100")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: CPU 1, CUDA 10)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-bnb", action="store_true", help="time fourbit only")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON (default: benchmarks/results/quant_<device>.json)")
    args = p.parse_args(argv)
    is_cuda = torch.device(args.device).type == "cuda"
    if args.reps is None:
        args.reps = 100 if is_cuda else (3 if args.shapes == "full" else 10)
    if args.warmup is None:
        args.warmup = 10 if is_cuda else 1
    if args.json is None:
        args.json = Path(__file__).resolve().parent / "results" / f"quant_{torch.device(args.device).type}.json"
    return args


def load_bnb(device: torch.device):
    """bitsandbytes.functional if it imports and quantizes on ``device``, else None."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbF

        x = torch.randn(4, 64, dtype=DTYPE, device=device)
        q, s = bnbF.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        bnbF.dequantize_4bit(q, s)
        return bnbF, bitsandbytes.__version__
    except Exception as e:  # ImportError, missing native library, no kernel for the device
        print(f"bitsandbytes unavailable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); "
              "reporting fourbit only", file=sys.stderr)
        return None, None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_bytes(device: torch.device) -> int:
    """L2 size of the GPU (50 MiB if unknown), or the largest CPU cache (32 MiB if unknown)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best or 32 * 2**20


class OtherCpuLoad:
    """Share of the machine's CPU time used by *other* processes between start() and
    stop(): busy time from /proc/stat minus this process's own CPU time. None where
    /proc/stat is missing. A CPU benchmark on a shared machine is only as good as this."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        own = os.times()
        # /proc/stat counts in USER_HZ ticks; idle + iowait are fields 3 and 4.
        return sum(fields), fields[3] + fields[4], own.user + own.system, time.monotonic()

    def stop(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None:
            return None
        total, idle = end[0] - self._start[0], end[1] - self._start[1]
        if total <= 0:
            return None
        ticks_per_s = total / (end[3] - self._start[3])  # = USER_HZ x number of CPUs
        own_ticks = (end[2] - self._start[2]) * ticks_per_s / (os.cpu_count() or 1)
        return max(0.0, (total - idle - own_ticks) / total)


def other_load_now(seconds: float = 0.5) -> Optional[float]:
    load = OtherCpuLoad()
    time.sleep(seconds)
    return load.stop()


def start_run(args, device: torch.device) -> tuple["Timer", Optional[OtherCpuLoad]]:
    """What every product benchmark does first: CPU threads, a warning if the machine is busy,
    the timer, and (CPU) the meter of other processes' load over the run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        busy = other_load_now()
        if busy is not None and busy > BUSY_WARNING:
            print(f"WARNING: other processes use {busy:.0%} of the CPUs; CPU timings will be noisy", file=sys.stderr)
    return Timer(device, args.reps, args.warmup), (OtherCpuLoad() if device.type == "cpu" else None)


def finish_run(args, argv, device: torch.device, timer: "Timer", load: Optional[OtherCpuLoad], table: str,
               rows: list[dict], **fields) -> int:
    """Prints the markdown table and writes the JSON: the run's common header (device, date,
    command, versions, threads, timer, other CPU load), then ``fields``, then the rows."""
    print(table)
    result = {
        "benchmark": fields.pop("benchmark"), "device": device_name(device), "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "torch": torch.__version__, "fourbit": fourbit.__version__,
        **{k: fields.pop(k) for k in ("bitsandbytes", "peft") if k in fields},
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "timer": timer.name,
        **fields, "other_cpu_load": load.stop() if load else None, "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def n_buffers(bytes_per_buffer: int, cache: int) -> int:
    return max(1, min(MAX_ROTATING_BUFFERS, math.ceil(CACHE_COVER * cache / bytes_per_buffer)))


# ----------------------------------------------------------------------------- timing

class Timer:
    """Seconds per call of ``fns[i]``, cycling i over the rotating buffers: returns
    (median, min). do_bench gives its median only, so there min is None."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.do_bench = None
        if device.type == "cuda":
            try:
                from triton.testing import do_bench

                self.do_bench = do_bench
            except ImportError:
                pass
        self.name = ("triton.testing.do_bench median" if self.do_bench else
                     "CUDA event median" if device.type == "cuda" else "time.perf_counter median")

    def __call__(self, fns: list[Callable[[], object]]) -> tuple[float, Optional[float]]:
        it = itertools.cycle(fns)

        def step():
            return next(it)()

        if self.device.type == "cuda":
            return self._cuda(step)
        for _ in range(self.warmup):
            step()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times)

    def _cuda(self, step) -> tuple[float, Optional[float]]:
        if self.do_bench is not None:
            return self.do_bench(step, warmup=25, rep=100, return_mode="median") / 1e3, None
        for _ in range(self.warmup):
            step()
        torch.cuda.synchronize(self.device)
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times), min(times)


# ----------------------------------------------------------------------------- benchmark

def state_nbytes(state: F.QuantState) -> int:
    """absmax + (nested absmax, nested code, offset) bytes; the 16-entry codebook is left out."""
    n = state.absmax.nbytes
    if state.nested:
        n += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
    return n


def compare_with_bnb(W, fb_packed, fb_state, fb_deq, bnbF, quantize, label) -> dict:
    """The correctness guard: fourbit dequantize == bnb dequantize of the same state, and
    fourbit's quantized bytes vs bnb's quantization of the same input."""
    bnb_deq = bnbF.dequantize_4bit(fb_packed, fb_state)
    deq_equal = torch.equal(fb_deq, bnb_deq)
    if not deq_equal:
        diff = (fb_deq.float() - bnb_deq.float()).abs()
        print(f"WARNING {label}: fourbit dequantize != bitsandbytes dequantize of the same state "
              f"({int((diff != 0).sum())} of {diff.numel()} values differ, max {diff.max().item():.3e})",
              file=sys.stderr)
    bnb_packed, bnb_state = quantize(bnbF, W)
    mismatch = {"packed": int((fb_packed.view(torch.uint8) != bnb_packed.view(torch.uint8)).sum())}
    mismatch["absmax"] = (int((fb_state.absmax != bnb_state.absmax).sum())
                          if fb_state.absmax.shape == bnb_state.absmax.shape else -1)
    if fb_state.nested:
        mismatch["nested_absmax"] = int((fb_state.state2.absmax != bnb_state.state2.absmax).sum())
        mismatch["offset"] = int(fb_state.offset.item() != bnb_state.offset.item())
    bytes_equal = not any(mismatch.values())
    if not bytes_equal:
        print(f"WARNING {label}: fourbit quantize differs from bitsandbytes quantize of the same input "
              f"(differing elements: {mismatch}; absmax has {fb_state.absmax.numel()})", file=sys.stderr)
    return {"dequant_equal_bnb": deq_equal, "quant_bytes_equal_bnb": bytes_equal, "quant_mismatch": mismatch}


# dequantize_into: the same dequantize writing into a preallocated output (out=).
OPS = ("quantize", "dequantize", "dequantize_into")


def bench_shape(name, N, K, args, device, timer, bnbF, cache) -> list[dict]:
    numel = N * K
    gen = torch.Generator(device=device).manual_seed(0)
    n_src = n_buffers(numel * DTYPE.itemsize, cache)
    W = torch.randn(N, K, dtype=DTYPE, device=device, generator=gen) * 0.02
    # Copies, not new random draws: only distinct addresses matter, and randn is slow on CPU.
    sources = [W] + [W.clone() for _ in range(n_src - 1)]

    copy_dst = torch.empty_like(sources[0])
    t_copy, _ = timer([lambda W=W: copy_dst.copy_(W) for W in sources])
    copy_GBps = 2 * numel * DTYPE.itemsize / t_copy / 1e9
    rows = []
    for nested in (False, True):
        def quantize(lib, W):
            return lib.quantize_4bit(W, blocksize=args.blocksize, compress_statistics=nested,
                                     quant_type=args.quant_type)

        label = f"{name} {N}x{K} nested={nested}"
        fb_packed, fb_state = quantize(F, sources[0])
        fb_deq = F.dequantize_4bit(fb_packed, fb_state)
        packed_b, state_b = fb_packed.nbytes, state_nbytes(fb_state)
        op_bytes = numel * DTYPE.itemsize + packed_b + state_b  # same for both directions
        check = {}
        if bnbF is not None:
            try:
                check = compare_with_bnb(sources[0], fb_packed, fb_state, fb_deq, bnbF, quantize, label)
            except Exception as e:
                print(f"WARNING {label}: correctness guard failed to run: {e!r}", file=sys.stderr)
                check = {"check_error": repr(e)[:300]}
        del fb_deq

        # Rotating dequantize inputs: the 4-bit form is ~4x smaller than bf16, so more copies.
        n_q = n_buffers(packed_b + state_b, cache)
        libs = {"fourbit": F} if bnbF is None else {"fourbit": F, "bitsandbytes": bnbF}
        times: dict[str, dict[str, tuple]] = {}
        errors = {}
        out_buf = torch.empty(N, K, dtype=DTYPE, device=device)
        for lib_name, lib in libs.items():
            states = [quantize(lib, sources[0])]
            states += [copy.deepcopy(states[0]) for _ in range(n_q - 1)]
            calls = {
                "quantize": [lambda W=W: quantize(lib, W) for W in sources],
                "dequantize": [lambda p=p, s=s: lib.dequantize_4bit(p, s) for p, s in states],
                # Into one reused output buffer (how a training step calls it): the kernel
                # alone, without allocating and first-touching a new output.
                "dequantize_into": [lambda p=p, s=s: lib.dequantize_4bit(p, s, out=out_buf)
                                    for p, s in states],
            }
            times[lib_name] = {}
            for op in OPS:
                try:
                    times[lib_name][op] = timer(calls[op])
                except Exception as e:  # one library or op failing must not end the run
                    print(f"WARNING {label}: {lib_name} {op} failed: {str(e).splitlines()[0][:200]}",
                          file=sys.stderr)
                    errors[f"{lib_name} {op}"] = repr(e)[:300]
                    times[lib_name][op] = (None, None)
            del states, calls
        del out_buf
        for op in OPS:
            t_fb, t_fb_min = times["fourbit"][op]
            t_bnb, t_bnb_min = times.get("bitsandbytes", {}).get(op, (None, None))
            rows.append({
                "shape": name, "N": N, "K": K, "nested": nested, "op": op,
                "bytes": op_bytes, "packed_bytes": packed_b, "state_bytes": state_b,
                "fourbit_s": t_fb, "fourbit_GBps": op_bytes / t_fb / 1e9 if t_fb else None,
                "bnb_s": t_bnb, "bnb_GBps": op_bytes / t_bnb / 1e9 if t_bnb else None,
                "speedup_vs_bnb": t_bnb / t_fb if t_fb and t_bnb else None,
                "fourbit_min_s": t_fb_min, "bnb_min_s": t_bnb_min,
                "copy_bf16_s": t_copy, "copy_bf16_GBps": copy_GBps,
                "rotating_buffers": n_src if op == "quantize" else n_q,
                **check, **({"errors": errors} if errors else {}),
            })
    return rows


# ----------------------------------------------------------------------------- report

def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "n/a"
    return f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def fmt(x: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + suffix


def match_cell(row: dict) -> str:
    key = "quant_bytes_equal_bnb" if row["op"] == "quantize" else "dequant_equal_bnb"
    if key not in row:
        return "n/a"
    return "yes" if row[key] else "NO"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| weight | N x K | nested | op | fourbit | fourbit GB/s | bnb | bnb GB/s | speedup | matches bnb |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['N']}x{r['K']} | {r['nested']} | {r['op']} | {fmt_time(r['fourbit_s'])} "
                     f"| {fmt(r['fourbit_GBps'], '.1f')} | {fmt_time(r['bnb_s'])} | {fmt(r['bnb_GBps'], '.1f')} "
                     f"| {fmt(r['speedup_vs_bnb'], '.2f', 'x')} | {match_cell(r)} |")
    copies = {(r["shape"], r["N"], r["K"]): r for r in rows}
    lines += ["", "Reference, torch bf16 copy of the weight (read + write):", "",
              "| weight | time | GB/s |", "|---|---|---|"]
    for (shape, N, K), r in copies.items():
        lines.append(f"| {shape} {N}x{K} | {fmt_time(r['copy_bf16_s'])} | {r['copy_bf16_GBps']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if device.type == "cuda" and not fourbit.built_with_cuda():
        print("fourbit was built without CUDA; use --device cpu", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    bnbF, bnb_version = (None, None) if args.no_bnb else load_bnb(device)
    timer = Timer(device, args.reps, args.warmup)
    cache = cache_bytes(device)
    divisor = SMALL_ROWS_DIVISOR if args.shapes == "small" else 1
    shapes = [(name, N // divisor, K) for name, N, K in LLAMA_8B_SHAPES]
    meta = {
        "benchmark": "quantize_4bit / dequantize_4bit",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": str(device), "device_name": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "fourbit": fourbit.__version__, "bitsandbytes": bnb_version,
        "python": platform.python_version(),
        "quant_type": args.quant_type, "blocksize": args.blocksize, "dtype": str(DTYPE).removeprefix("torch."),
        "shapes": args.shapes, "timer": timer.name,
        "reps": None if timer.do_bench else args.reps, "warmup": None if timer.do_bench else args.warmup,
        "cache_bytes": cache,
        "other_cpu_load_before_run": other_load_now() if device.type == "cpu" else None,
    }
    print(f"# {meta['device_name']} ({device}{', %d threads' % meta['threads'] if meta['threads'] else ''}), "
          f"torch {torch.__version__}, fourbit {fourbit.__version__}, bitsandbytes {bnb_version or 'unavailable'}; "
          f"{args.quant_type} blocksize {args.blocksize}, {meta['dtype']}; {timer.name}", flush=True)

    busy = meta["other_cpu_load_before_run"]
    if busy is not None and busy > BUSY_WARNING:
        print(f"WARNING: other processes used {busy:.0%} of the CPUs just before the run; "
              "CPU timings will be distorted", file=sys.stderr)

    rows = []
    for name, N, K in shapes:
        t0 = time.perf_counter()
        load = OtherCpuLoad()
        shape_rows = bench_shape(name, N, K, args, device, timer, bnbF, cache)
        other = load.stop() if device.type == "cpu" else None
        for r in shape_rows:
            r["other_cpu_load"] = other
        rows += shape_rows
        print(f"# {name} {N}x{K} done in {time.perf_counter() - t0:.1f} s"
              + (f", other processes used {other:.0%} of the CPUs meanwhile" if other is not None else ""),
              file=sys.stderr, flush=True)
        if other is not None and other > BUSY_WARNING:
            print(f"WARNING: {name} timings are distorted by other processes ({other:.0%} of the CPUs)",
                  file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    table = markdown_table(rows)
    print()
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": rows, "markdown": table}, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    mismatches = [r for r in rows if r.get("dequant_equal_bnb") is False]
    if mismatches:
        print(f"WARNING: fourbit dequantize differed from bitsandbytes on {len(mismatches)} configurations",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
