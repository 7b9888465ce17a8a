"""Helpers shared by the fourbit test files: input generators, the bitsandbytes reference
(imported lazily and run eagerly), the 8-bit "at least as near" comparison and a tiny
in-memory tokenizer for the recipes."""

from __future__ import annotations

import contextlib
import math
import zlib

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_TYPES = ("nf4", "fp4")


def seed_for(*params) -> int:
    """A deterministic per-case seed, independent of test order."""
    return zlib.crc32(repr(params).encode())


def numel(shape) -> int:
    return math.prod(shape)


def import_bnb():
    """bitsandbytes.functional (its CPU backend); prints a harmless warning about 'kernels'."""
    import bitsandbytes.functional as bnbf

    return bnbf


@contextlib.contextmanager
def bnb_eager():
    """Runs bitsandbytes' torch.compile-wrapped fallbacks (odd-width dequantize_4bit) eagerly.

    bitsandbytes wraps its pure-torch dequantize in torch.compile(dynamic=False), which
    recompiles with inductor for every new shape: far too slow for a parameter sweep on a
    CPU, and it computes the same fp32 product either way.
    """
    with torch.compiler.set_stance("force_eager"):
        yield


def bnb_cpu_dequantize_4bit_is_reliable(shape, blocksize: int) -> bool:
    """False where bitsandbytes' CPU C kernel for dequantize_4bit applies the wrong absmax.

    That kernel (used for an even last dim and blocksize < 2048) walks the tensor as
    rows of shape[-1] and goes wrong when blocks straddle rows: several rows and a row
    length that is not a multiple of blocksize, e.g. (16, 48) or (8, 32) with blocksize 64
    (found while writing these tests; bitsandbytes' portable kernel and its CUDA kernel
    treat the data as flat, as fourbit does). Elsewhere the CPU kernel is compared as is.
    """
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return len(shape) <= 1 or rows == 1 or shape[-1] % 2 == 1 or shape[-1] % blocksize == 0


def bnb_dequantize_4bit(A: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit with its portable (default-backend) kernel.

    Same as bitsandbytes.functional.dequantize_4bit (nested absmax decoded with bnb's
    dequantize_blockwise plus the offset, then code value * absmax in fp32, rounded once,
    and the [1, n] transpose shim), but with the per-element work done by bnb's own
    pure-torch kernel instead of its CPU C kernel, which is wrong for some 2-D shapes (see
    bnb_cpu_dequantize_4bit_is_reliable).
    """
    bnbf = import_bnb()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    with bnb_eager():
        out = _dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax.float(),
                                       state.code.float(), state.blocksize, state.shape,
                                       state.dtype)
    if A.shape[0] == 1:
        out = out.t()
    return out


def sorted_midpoints(code: torch.Tensor) -> torch.Tensor:
    """fp32 midpoints between consecutive sorted codebook values."""
    s = code.float().sort().values
    return (s[:-1] + s[1:]) / 2


INPUT_KINDS = ("normal", "uniform", "student_t", "zero_blocks", "outlier", "midpoints")


def make_input(kind: str, shape, dtype: torch.dtype, blocksize: int, code: torch.Tensor,
               seed: int) -> torch.Tensor:
    """A test input of `shape`/`dtype`; the adversarial kinds are built per block.

    - normal / uniform / student_t (heavy tails, StudentT(2); clamped to fp16 range for fp16)
    - zero_blocks: every other block (blocks 0, 2, 4, ...) is all zeros
    - outlier: one huge value (random sign and position) per block
    - midpoints: the codebook midpoints, their fp32 neighbours one ulp away and the codes
      themselves, tiled, with 1.0 at every block start so absmax is exactly 1 and x / absmax
      lands exactly on the midpoints (in fp32; fp16/bf16 round them first)
    """
    torch.manual_seed(seed)
    n = numel(shape)
    blocks = (n + blocksize - 1) // blocksize
    if kind == "normal":
        x = torch.randn(n)
    elif kind == "uniform":
        x = torch.rand(n) * 6 - 3
    elif kind == "student_t":
        x = torch.distributions.StudentT(2.0).sample((n,))
        if dtype == torch.float16:
            x = x.clamp(-3e4, 3e4)
    elif kind == "zero_blocks":
        x = torch.randn(n)
        for b in range(0, blocks, 2):
            x[b * blocksize:(b + 1) * blocksize] = 0
    elif kind == "outlier":
        x = torch.randn(n)
        huge = 1e4 if dtype == torch.float16 else 1e30
        for b in range(blocks):
            start, stop = b * blocksize, min((b + 1) * blocksize, n)
            pos = start + int(torch.randint(stop - start, ()))
            sign = 1.0 if torch.rand(()) < 0.5 else -1.0
            x[pos] = sign * huge * (1 + float(torch.rand(())))
    elif kind == "midpoints":
        mids = sorted_midpoints(code)
        values = torch.cat([mids, torch.nextafter(mids, torch.tensor(math.inf)),
                            torch.nextafter(mids, torch.tensor(-math.inf)), code.float()])
        x = values.repeat(n // values.numel() + 1)[:n].clone()
        x[::blocksize] = 1.0
    else:
        raise AssertionError(f"unknown input kind {kind}")
    return x.to(dtype).reshape(shape)


def assert_8bit_codes_nearest(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int, fourbit_q: torch.Tensor, bnb_q: torch.Tensor,
                              max_fraction: float | None = 0.01) -> int:
    """Compares fourbit's and bitsandbytes' 8-bit blockwise codes for the same input.

    bitsandbytes' CPU quantize_blockwise finds the code with an approximate binary search
    (BinSearch "Direct2") that sometimes returns the farther of two neighbouring codes
    (about 0.2% of values), and it maps an exact 0.0 to a non-zero code; fourbit always
    returns the nearest code (ties to the lower index). So the codes must be equal
    everywhere except where bitsandbytes' choice is not strictly nearer than fourbit's:

    - at every position where they differ, fourbit's code value must be at least as near
      to the fp32 value x / absmax as bitsandbytes' (distances measured in fp64);
    - where x / absmax is NaN (0 / 0 of an all-zero block) they must be equal;
    - the fraction of positions where fourbit's code is strictly nearer must be below
      `max_fraction`. Exact zeros are left out (bitsandbytes gets every one of those
      wrong), and so are exact ties (x / absmax on a midpoint between two codes, common
      with coarse bf16 inputs), where either code is as near and the two libraries just
      break the tie differently. That rate is only asserted when
      the sample is large enough for it to mean something (at least 10 differences
      allowed); below that one extra mismatch would exceed it, and the per-position
      check above still applies. Pass max_fraction=None for inputs whose values mostly
      land near zero (heavy tails, one huge outlier per block): bitsandbytes' search is
      mostly wrong for |x / absmax| below about 0.02, where the map is dense (measured:
      1.7% of StudentT(2) values, 98% of values in outlier blocks), so only the
      per-position rule is asserted there.

    x must be finite (NaN/Inf inputs are excluded from 8-bit parity: bitsandbytes' CPU
    kernel gives them arbitrary codes). Returns the number of differing positions.
    """
    x = x.detach().float().flatten().cpu()
    assert torch.isfinite(x).all(), "8-bit parity is only defined for finite inputs"
    n = x.numel()
    fq = fourbit_q.flatten().cpu().long()
    bq = bnb_q.flatten().cpu().long()
    assert fq.numel() == n and bq.numel() == n
    scale = absmax.detach().float().cpu().repeat_interleave(blocksize)[:n]
    scaled = x / scale
    code64 = code.detach().double().cpu()
    s64 = scaled.double()
    dist_fourbit = (s64 - code64[fq]).abs()
    dist_bnb = (s64 - code64[bq]).abs()
    differ = fq != bq
    nan = torch.isnan(scaled)
    bad = (differ & nan) | (differ & ~nan & ~(dist_fourbit <= dist_bnb))
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        detail = [(i, float(scaled[i]), int(fq[i]), float(code64[fq[i]]), int(bq[i]),
                   float(code64[bq[i]])) for i in idx]
        raise AssertionError(
            f"{int(bad.sum())} positions where bitsandbytes' code is strictly nearer than "
            f"fourbit's (index, x/absmax, fourbit code, value, bnb code, value): {detail}")
    counted = differ & (scaled != 0) & (dist_fourbit < dist_bnb)
    if max_fraction is not None and n * max_fraction >= 10:
        fraction = float(counted.sum()) / n
        assert fraction < max_fraction, (
            f"{int(counted.sum())} of {n} codes differ from bitsandbytes' with fourbit's "
            f"strictly nearer ({fraction:.4%}), more than expected of bnb's approximate search")
    return int(differ.sum())


def char_tokenizer():
    """A character-level fast tokenizer built in memory (no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = list("abcdefghijklmnopqrstuvwxyz .,")
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")
