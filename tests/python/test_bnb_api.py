"""The rest of bitsandbytes' QLoRA API, compared with bitsandbytes on the CPU:
functional.gemv_4bit, matmul_4bit's deprecated [K, N] weight orientation, QuantState.from_dict
of 8-bit blockwise states, torch.chunk / torch.split of Params4bit (bitsandbytes #1424), the Adam
optimizers, GlobalOptimManager overrides, fourbit.utils, and torch.compile(optimizer.step,
fullgraph=True) from the first step."""

import warnings

import pytest
import torch
from torch import nn

import fourbit
import fourbit.functional as F
from fourbit.nn import Params4bit

from _helpers import import_bnb

bnbf = import_bnb()
import bitsandbytes as bnb  # noqa: E402

ADAMS = ("Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit")


def weight(shape=(48, 64), seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- 4-bit functional

@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("nested", [False, True])
def test_gemv_4bit_matches_bitsandbytes_definition(rows, nested):
    W = weight()
    packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=nested)
    b_packed, b_state = bnbf.quantize_4bit(W, quant_type="nf4", compress_statistics=nested)
    A = weight((rows, 64), seed=1)
    ours = F.gemv_4bit(A, packed.t(), state=state)
    # bitsandbytes' CPU gemv_4bit needs its CPU-repacked weight layout (it aborts the process on
    # the standard one), so its reference here is its own definition: A @ dequantize_4bit(B)^T.
    theirs = A.double() @ bnbf.dequantize_4bit(b_packed, b_state).double().t()
    assert ours.shape == theirs.shape == (rows, 48)
    torch.testing.assert_close(ours.double(), theirs, atol=1e-4, rtol=1e-5)
    out = torch.empty(rows, 48)
    assert F.gemv_4bit(A, packed.t(), out=out, state=state) is out and torch.equal(out, ours)
    with pytest.raises(ValueError, match=r"state cannot be None"):
        F.gemv_4bit(A, packed.t())


def test_matmul_4bit_accepts_kn_weights_with_a_deprecation_warning():
    # [K, N] = [64, 128]: rows of 128, whole blocks, where bitsandbytes' CPU dequantize is exact
    # (_helpers.bnb_cpu_dequantize_4bit_is_reliable).
    W_kn = weight((64, 128))  # quantized from [K, N]: A @ W, not A @ W^T
    packed, state = F.quantize_4bit(W_kn, quant_type="nf4")
    b_packed, b_state = bnbf.quantize_4bit(W_kn, quant_type="nf4")
    A, bias = weight((5, 64), seed=2), weight((128,), seed=3)
    with pytest.warns(DeprecationWarning, match=r"weight was quantized from a \[K, N\] tensor \(quant_state.shape="
                                                r"\[64, 128\]\)"):
        ours = fourbit.matmul_4bit(A, packed.t(), state, bias=bias)
    with pytest.warns(DeprecationWarning):
        theirs = bnb.matmul_4bit(A, b_packed.t(), b_state, bias=bias)
    assert ours.shape == theirs.shape == (5, 128)
    torch.testing.assert_close(ours, A @ F.dequantize_4bit(packed, state) + bias)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    # The usual [N, K] orientation (and square weights, which are ambiguous) stay silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fourbit.matmul_4bit(weight((5, 128)), packed.t(), state)
        sq, sq_state = F.quantize_4bit(weight((64, 64)), quant_type="nf4")
        fourbit.matmul_4bit(A, sq.t(), sq_state)


@pytest.mark.parametrize("nested", [False, True])
def test_8bit_blockwise_quant_state_from_dict_both_ways(nested):
    x = weight((1000,), seed=4)
    q, theirs = bnbf.quantize_blockwise(x, blocksize=256, nested=nested)
    state = F.QuantState.from_dict(theirs.as_dict(), device="cpu")
    assert state.quant_type is None and state.blocksize == 256 and state.nested == nested
    torch.testing.assert_close(F.dequantize_blockwise(q, state), bnbf.dequantize_blockwise(q, theirs))
    oq, ours = F.quantize_blockwise(x, blocksize=256, nested=nested)
    back = bnbf.QuantState.from_dict(ours.as_dict(), device="cpu")
    torch.testing.assert_close(bnbf.dequantize_blockwise(oq, back), F.dequantize_blockwise(oq, ours))
    bad = dict(theirs.as_dict(), quant_type="int8")
    with pytest.raises(ValueError, match=r"quant_state key 'quant_type' must be 'nf4' or 'fp4', got 'int8' \(None "
                                         r"only in an unpacked 8-bit blockwise state\)"):
        F.QuantState.from_dict(bad, device="cpu")
    packed = F.quantize_4bit(x, quant_type="nf4")[1].as_dict(packed=True)
    packed["quant_state.bitsandbytes__nf4"] = fourbit.utils.pack_dict_to_tensor(
        dict(fourbit.utils.unpack_tensor_to_dict(packed["quant_state.bitsandbytes__nf4"]), quant_type=None))
    with pytest.raises(ValueError, match=r"quant_state key 'quant_type' must be 'nf4' or 'fp4', got None"):
        F.QuantState.from_dict(packed, device="cpu")
    shaped = dict(theirs.as_dict(), shape=[1000], quant_map=torch.zeros(16))
    with pytest.raises(ValueError, match=r"quant_state key 'quant_map' must have 256 elements, got 16"):
        F.QuantState.from_dict(shaped, device="cpu")


@pytest.mark.parametrize("split", ["chunk", "split"])
def test_chunk_and_split_of_params4bit_keep_the_type(split):
    ours = Params4bit(weight(), quant_type="nf4").quantize()
    theirs = bnb.nn.Params4bit(weight(), quant_type="nf4").to("cpu")
    cut = (lambda t: torch.chunk(t, 4)) if split == "chunk" else (lambda t: torch.split(t, 500))
    pieces, ref = cut(ours), cut(theirs)
    assert [type(p).__name__ for p in pieces] == [type(p).__name__ for p in ref] == ["Params4bit"] * len(ref)
    assert [p.shape for p in pieces] == [p.shape for p in ref]
    for piece in pieces:
        assert piece.quant_state is ours.quant_state and piece.bnb_quantized and piece.quant_type == "nf4"
        assert not piece.requires_grad
    assert torch.equal(torch.cat(pieces), ours.data)
    assert type(ours + 0).__name__ == "Tensor"  # other functions are not re-wrapped (as in bitsandbytes)


# ----------------------------------------------------------------------------- optimizers

def run(opt_cls, steps=6, shape=(64, 128), **kwargs):
    p = nn.Parameter(weight(shape))
    g = torch.Generator().manual_seed(1)
    opt = opt_cls([p], lr=1e-2, **kwargs)
    for _ in range(steps):
        p.grad = torch.randn(shape, generator=g)
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("name", ADAMS)
def test_adam_family_matches_bitsandbytes(name):
    """bitsandbytes' Adam is its AdamW update with weight_decay=0 by default (decay decoupled:
    read in bitsandbytes 0.50's backends/default/ops.py); fourbit's matches it."""
    ours, opt = run(getattr(fourbit.optim, name), weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: paged optimizers fall back on the CPU
        theirs, ref = run(getattr(bnb.optim, name), weight_decay=0.1)
        theirs32, _ = run(bnb.optim.Adam32bit, weight_decay=0.1)
    eight = "8bit" in name
    assert opt.optim_bits == (8 if eight else 32) and opt.is_paged == name.startswith("Paged")
    assert opt.defaults["weight_decay"] == 0.1 and getattr(fourbit.optim, name)([nn.Parameter(
        torch.zeros(2))]).defaults["weight_decay"] == ref.__class__([nn.Parameter(torch.zeros(2))]).defaults[
        "weight_decay"] == 0
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["state1"].dtype == (torch.uint8 if eight else torch.float32)
    if eight:  # 8-bit moments: both libraries' error against their 32-bit run is of the same size
        assert (ours - theirs).abs().max() <= 2 * (theirs - theirs32).abs().max()
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, run(fourbit.optim.AdamW8bit if eight else fourbit.optim.AdamW,
                                         weight_decay=0.1)[0], rtol=0, atol=0)


def test_adam_rejects_what_it_does_not_implement():
    p = [nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match=r"percentile_clipping=5 is not supported"):
        fourbit.optim.Adam(p, percentile_clipping=5)
    with pytest.raises(ValueError, match=r"block_wise=False is not supported"):
        fourbit.optim.Adam8bit(p, block_wise=False)
    with pytest.raises(ValueError, match=r"Adam8bit fixes its state width; optim_bits must stay 32, got 8"):
        fourbit.optim.Adam8bit(p, optim_bits=8)


@pytest.fixture
def manager():
    mng = fourbit.optim.GlobalOptimManager.get_instance()
    mng.initialize()
    yield mng
    mng.initialize()


def test_global_optim_manager_overrides(manager):
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 128), nn.Linear(128, 64))
    manager.register_module_override(model[0], "weight", {"optim_bits": 32})
    manager.override_config(model[2].weight, "min_8bit_size", 100_000)
    opt = fourbit.optim.AdamW8bit(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    dtypes = {name: opt.state[p]["state1"].dtype for name, p in model.named_parameters()}
    assert dtypes == {"0.weight": torch.float32, "1.weight": torch.uint8, "1.bias": torch.float32,
                      "2.weight": torch.float32, "2.bias": torch.float32}
    # bitsandbytes: register while on the CPU, the override follows the parameter's position.
    manager.initialize()
    fresh = nn.Linear(64, 128)
    manager.override_config(fresh.weight, key_value_dict={"optim_bits": 8})
    manager.register_parameters(fresh.parameters())
    moved = [nn.Parameter(t.detach().clone()) for t in fresh.parameters()]  # what .cuda() makes
    opt = fourbit.optim.AdamW(moved)
    for p in moved:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[moved[0]]["state1"].dtype == torch.uint8 and opt.state[moved[1]]["state1"].dtype == torch.float32


def test_global_optim_manager_errors(manager):
    with pytest.raises(RuntimeError, match=r"Call get_instance\(\) instead"):
        fourbit.optim.GlobalOptimManager()
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"override has key\(s\) \['lr'\] fourbit cannot override per parameter"):
        manager.override_config(p, "lr", 0.1)
    with pytest.raises(ValueError, match=r"override\['optim_bits'\] must be 8 or 32, got 4"):
        manager.override_config(p, "optim_bits", 4)
    with pytest.raises(ValueError, match=r"config\['min_8bit_size'\] must be an int >= 0, got -1"):
        manager.register_module_override(nn.Linear(2, 2), "weight", {"min_8bit_size": -1})
    with pytest.raises(ValueError, match=r"module Linear has no tensor attribute 'wieght'"):
        manager.register_module_override(nn.Linear(2, 2), "wieght", {"optim_bits": 32})


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "AdamW"])
def test_compiled_step_works_from_the_first_step(name):
    """State creation (8-bit maps, paged buffers) traces: no eager warm-up step needed."""
    params = [nn.Parameter(weight((64, 128))), nn.Parameter(weight((10,), seed=5))]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    opt, ref_opt = getattr(fourbit.optim, name)(params, lr=1e-2), getattr(fourbit.optim, name)(ref, lr=1e-2)
    step = torch.compile(opt.step, fullgraph=True)
    for i in range(2):
        for a, b in zip(params, ref):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(i))
            b.grad = a.grad.clone()
        step()
        ref_opt.step()
    for a, b in zip(params, ref):
        assert torch.equal(a, b)
    assert opt.state[params[0]]["state1"].dtype == (torch.float32 if name == "AdamW" else torch.uint8)


# ----------------------------------------------------------------------------- utils

def test_utils_match_bitsandbytes():
    d = {"quant_type": "nf4", "blocksize": 64, "shape": [3, 4], "nested_offset": 0.25}
    packed = fourbit.utils.pack_dict_to_tensor(d)
    assert torch.equal(packed, bnb.utils.pack_dict_to_tensor(d))
    assert fourbit.utils.unpack_tensor_to_dict(packed) == bnb.utils.unpack_tensor_to_dict(packed) == d
    with pytest.raises(ValueError, match=r"quant_state key 'tensor_data' does not hold valid JSON"):
        fourbit.utils.unpack_tensor_to_dict(torch.tensor([1, 2, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"source_dict must be a dict, got list"):
        fourbit.utils.pack_dict_to_tensor([1])

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.ReLU()), nn.Linear(4, 2))

    ours = fourbit.utils.replace_linear(model(), lambda i, o, b: fourbit.nn.LinearNF4(i, o, b), skip_modules=("2",),
                                        copy_weights=True)
    theirs = bnb.utils.replace_linear(model(), lambda i, o, b: bnb.nn.LinearNF4(i, o, b), skip_modules=("2",),
                                      copy_weights=True)
    assert [type(m).__name__ for m in ours.modules()] == [type(m).__name__ for m in theirs.modules()]
    assert torch.equal(ours[1][0].weight, theirs[1][0].weight)
    with pytest.raises(ValueError, match=r"linear_replacement must be callable"):
        fourbit.utils.replace_linear(model(), None)
    fourbit.utils.sync_gpu(torch.zeros(1))  # a no-op on the CPU
