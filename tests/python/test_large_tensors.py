"""Tensors past 2**31 elements: every index in the kernels is 64-bit.

The packed codes and scales are made directly (no quantize pass over 2**31 inputs), so the
test costs about 1 GiB of codes plus the 4 GiB bf16 output and a few seconds on the CPU.
"""

import pytest
import torch

import fourbit.functional as F

BIG = 2**31 + 2 * 64 + 6  # past the int32 range, with a partial last block


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 12 * 2**30:
        devs.append("cuda")
    return devs


@pytest.mark.parametrize("device", _devices())
def test_dequantize_past_int32_range(device):
    """The last blocks of a >2**31-element tensor decode with their own codes and scales."""
    blocksize = 64
    blocks = (BIG + blocksize - 1) // blocksize
    packed = torch.full(((BIG + 1) // 2, 1), 0x7F, dtype=torch.uint8, device=device)  # codes 7 (0.0), 15 (1.0)
    absmax = torch.ones(blocks, dtype=torch.float32, device=device)
    absmax[-2:] = torch.tensor([3.0, 5.0])
    state = F.QuantState(absmax=absmax, shape=torch.Size([BIG]), code=F.get_4bit_type("nf4", device),
                         blocksize=blocksize, quant_type="nf4", dtype=torch.bfloat16)
    out = F.dequantize_4bit(packed, state)
    assert out.shape == (BIG,)
    second_last = out[(blocks - 2) * blocksize:(blocks - 1) * blocksize].float().cpu()  # scale 3
    assert torch.equal(second_last[1::2], torch.full_like(second_last[1::2], 3.0))
    assert torch.equal(second_last[0::2], torch.zeros_like(second_last[0::2]))
    partial = out[(blocks - 1) * blocksize:].float().cpu()  # the partial last block, scale 5
    assert partial.numel() == BIG % blocksize
    assert torch.equal(partial[1::2], torch.full_like(partial[1::2], 5.0))
    assert torch.equal(partial[0::2], torch.zeros_like(partial[0::2]))
    assert torch.equal(out[:4].float().cpu(), torch.tensor([0.0, 1.0, 0.0, 1.0]))
