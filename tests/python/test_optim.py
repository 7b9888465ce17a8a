"""fourbit.optim: AdamW with 32-bit / 8-bit blockwise states, paged or not.

- 32-bit results against torch.optim.AdamW (several steps, weight decay, several groups,
  LR scheduler), bf16/fp16 params against a reference with fp32 states;
- 8-bit: the state bytes equal fourbit's own quantize_blockwise of the updated fp32 states,
  and a small training run stays within a documented tolerance of the 32-bit run;
- paged == unpaged bit for bit; save / reload / resume == uninterrupted; bitsandbytes and
  torch state dicts load; one adamw_step call per group;
- every error path with a message naming the argument and the value;
- CUDA (marked, run on the GPU machine): CUDA == CPU bit for bit, paging through managed
  memory, state dicts CPU <-> GPU, the free-memory check.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import fourbit
import fourbit.functional as F
from fourbit.optim import paging

OPT_CLASSES = {
    "AdamW": fourbit.optim.AdamW,
    "AdamW8bit": fourbit.optim.AdamW8bit,
    "PagedAdamW": fourbit.optim.PagedAdamW,
    "PagedAdamW32bit": fourbit.optim.PagedAdamW32bit,
    "PagedAdamW8bit": fourbit.optim.PagedAdamW8bit,
}

# Shapes with partial 256-blocks, a tiny tensor (< min_8bit_size: 32-bit states even for the
# 8-bit optimizers) and tensors above the paging threshold (1e5 elements).
SHAPES = [(7,), (33, 65), (320, 320), (1000, 129)]


def make_params(shapes=SHAPES, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype)) for s in shapes]


def set_grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(device=p.device, dtype=p.dtype)


def run(opt_factory, params, steps, start=0):
    opt = opt_factory(params)
    for s in range(start, start + steps):
        set_grads(params, s)
        opt.step()
    return opt


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ---------------------------------------------------------------------------- 32-bit vs torch


def test_32bit_matches_torch_adamw_several_groups_and_steps():
    ref = make_params()
    ours = clone_params(ref)
    groups = lambda ps: [  # noqa: E731
        {"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1},
        {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6},
    ]
    t_opt = torch.optim.AdamW(groups(ref), foreach=False)
    f_opt = fourbit.optim.AdamW(groups(ours))
    # Float64 run of the same algorithm: the error of both fp32 implementations against it.
    exact = [torch.nn.Parameter(p.detach().double()) for p in ref]
    e_opt = torch.optim.AdamW(groups(exact), foreach=False)
    for step in range(12):
        for ps in (ref, ours, exact):
            set_grads(ps, step)
        t_opt.step()
        f_opt.step()
        e_opt.step()
    for r, o, e in zip(ref, ours, exact):
        # Tight: identical arithmetic except torch's CPU sqrt (not correctly rounded, 1 ulp).
        torch.testing.assert_close(o, r, rtol=2e-6, atol=2e-7)
        err_torch = (r.double() - e).abs().max().item()
        err_ours = (o.double() - e).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-9, (err_ours, err_torch)
    for r, o in zip(ref, ours):
        st = f_opt.state[o]
        assert st["step"] == 12 and st["state1"].dtype == torch.float32
        torch.testing.assert_close(st["state1"], t_opt.state[r]["exp_avg"], rtol=1e-6, atol=1e-9)


def test_32bit_most_values_bit_identical_to_torch():
    """The first moment follows torch's lerp exactly; only v's sqrt may differ by an ulp."""
    ref = make_params([(4096,)])
    ours = clone_params(ref)
    t_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    f_opt = fourbit.optim.AdamW(ours, lr=1e-2)
    for step in range(3):
        set_grads(ref, step)
        set_grads(ours, step)
        t_opt.step()
        f_opt.step()
    assert torch.equal(f_opt.state[ours[0]]["state1"], t_opt.state[ref[0]]["exp_avg"])
    assert torch.equal(f_opt.state[ours[0]]["state2"], t_opt.state[ref[0]]["exp_avg_sq"])
    same = (ours[0] == ref[0]).float().mean().item()
    assert same > 0.5, same


def test_lr_scheduler_zero_grad_and_add_param_group():
    ref = make_params()
    ours = clone_params(ref)
    t_opt = torch.optim.AdamW(ref[:2], lr=1e-2, foreach=False)
    f_opt = fourbit.optim.AdamW(ours[:2], lr=1e-2)
    t_opt.add_param_group({"params": ref[2:], "lr": 5e-3})
    f_opt.add_param_group({"params": ours[2:], "lr": 5e-3})
    t_sched = torch.optim.lr_scheduler.StepLR(t_opt, step_size=2, gamma=0.5)
    f_sched = torch.optim.lr_scheduler.StepLR(f_opt, step_size=2, gamma=0.5)
    for step in range(6):
        t_opt.zero_grad()
        f_opt.zero_grad()
        assert all(p.grad is None for p in ours)
        set_grads(ref, step)
        set_grads(ours, step)
        t_opt.step()
        f_opt.step()
        t_sched.step()
        f_sched.step()
    assert f_opt.param_groups[1]["lr"] == t_opt.param_groups[1]["lr"] == 5e-3 * 0.125
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_keep_fp32_states(dtype):
    """bf16 / fp16 params: fp32 states, math in fp32, the param rounded once per step."""
    params = make_params(dtype=dtype)
    opt = fourbit.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    master = [p.detach().float().clone() for p in params]
    m = [torch.zeros_like(x) for x in master]
    v = [torch.zeros_like(x) for x in master]
    b1, b2, lr, wd, eps = 0.9, 0.999, 1e-2, 0.1, 1e-8
    for step in range(1, 6):
        set_grads(params, step)
        opt.step()
        for i, p in enumerate(params):
            g = p.grad.float()
            m[i] = m[i].lerp(g, 1 - b1)
            v[i] = v[i] * b2 + (1 - b2) * g * g
            x = master[i] * (1 - lr * wd)
            bc2 = math.sqrt(1 - b2 ** step)
            x = x + (-lr * bc2 / (1 - b1 ** step)) * m[i] / (v[i].sqrt() + eps * bc2)
            master[i] = x.to(dtype).float()  # the stored param is rounded every step
    for i, p in enumerate(params):
        assert opt.state[p]["state1"].dtype == torch.float32
        torch.testing.assert_close(opt.state[p]["state1"], m[i], rtol=1e-5, atol=1e-7)
        # At most one rounding step of the param dtype apart (fp32 ulps can flip a rounding).
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(p.float(), master[i], rtol=2 * ulp, atol=1e-5)


# ---------------------------------------------------------------------------- 8-bit


def test_8bit_state_layout_and_min_8bit_size():
    params = make_params()
    opt = fourbit.optim.AdamW8bit(params, min_8bit_size=4096)
    set_grads(params, 0)
    opt.step()
    for p in params:
        st = opt.state[p]
        if p.numel() < 4096:
            assert st["state1"].dtype == torch.float32 and "absmax1" not in st
        else:
            assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
            assert st["state1"].shape == p.shape
            assert st["absmax1"].shape == ((p.numel() + 255) // 256,)
            assert torch.equal(st["qmap1"], F.create_dynamic_map(signed=True))
            assert torch.equal(st["qmap2"], F.create_dynamic_map(signed=False))
    opt32 = fourbit.optim.AdamW(make_params(), optim_bits=8, min_8bit_size=200_000)
    ps = opt32.param_groups[0]["params"]
    set_grads(ps, 0)
    opt32.step()
    assert [opt32.state[p]["state1"].dtype for p in ps] == [torch.float32] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_state_bytes_equal_quantize_blockwise(dtype):
    """Each step: dequantize (fourbit's dequantize_blockwise), the documented fp32 update,
    requantize (fourbit's quantize_blockwise with the dynamic maps) == the optimizer's bytes."""
    params = make_params([(1000, 129), (300, 257)], dtype=dtype)
    opt = fourbit.optim.AdamW8bit(params, lr=1e-3, betas=(0.9, 0.95))
    qmap1, qmap2 = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
    b1, b2 = 0.9, 0.95
    prev = None
    for step in range(4):
        set_grads(params, step)
        if prev is not None:
            expected = []
            for p, (q1, a1, q2, a2) in zip(params, prev):
                m = torch.ops.fourbit.dequantize_blockwise(q1, a1, qmap1, 256, torch.float32)
                v = torch.ops.fourbit.dequantize_blockwise(q2, a2, qmap2, 256, torch.float32)
                g = p.grad.float()
                m = m * b1 + g * (1 - b1)
                v = v * b2 + (g * g) * (1 - b2)
                expected.append((torch.ops.fourbit.quantize_blockwise(m, qmap1, 256),
                                 torch.ops.fourbit.quantize_blockwise(v, qmap2, 256)))
        opt.step()
        if prev is not None:
            for p, ((eq1, ea1), (eq2, ea2)) in zip(params, expected):
                st = opt.state[p]
                assert torch.equal(st["state1"], eq1) and torch.equal(st["absmax1"], ea1)
                assert torch.equal(st["state2"], eq2) and torch.equal(st["absmax2"], ea2)
        prev = [(opt.state[p]["state1"].clone(), opt.state[p]["absmax1"].clone(),
                 opt.state[p]["state2"].clone(), opt.state[p]["absmax2"].clone()) for p in params]


def _train(opt_cls, steps=150, seed=0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 1))
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(4096, 64, generator=g)
    w = torch.randn(64, 1, generator=g) / 8
    y = torch.sin(2 * X @ w) + 0.1 * torch.randn(4096, 1, generator=g)
    opt = opt_cls(model.parameters(), lr=3e-3, **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


# Documented tolerance (docs/kernels.md): after 150 steps of this run the 8-bit parameters
# stay within 15% of the 32-bit trajectory (|p8 - p32| / |p32 - p0|, measured 6.4%) and the
# final loss within 25% of the 32-bit loss (measured 8%).
EIGHT_BIT_TRAJECTORY_TOL = 0.15
EIGHT_BIT_LOSS_TOL = 0.25


def test_8bit_trajectory_close_to_32bit():
    m0, _ = _train(fourbit.optim.AdamW, steps=0)
    m32, l32 = _train(fourbit.optim.AdamW)
    m8, l8 = _train(fourbit.optim.AdamW8bit, min_8bit_size=4096)
    assert l32[-1] < 0.1 * l32[0]  # it learns
    p0 = torch.cat([p.detach().flatten() for p in m0.parameters()])
    p32 = torch.cat([p.detach().flatten() for p in m32.parameters()])
    p8 = torch.cat([p.detach().flatten() for p in m8.parameters()])
    rel = ((p8 - p32).norm() / (p32 - p0).norm()).item()
    assert rel < EIGHT_BIT_TRAJECTORY_TOL, rel
    assert abs(l8[-1] - l32[-1]) <= EIGHT_BIT_LOSS_TOL * l32[-1], (l8[-1], l32[-1])
    assert not torch.equal(p8, p32)  # the 8-bit path really ran


# ---------------------------------------------------------------------------- paging, resume


@pytest.mark.parametrize("paged,plain", [("PagedAdamW", "AdamW"), ("PagedAdamW32bit", "AdamW"),
                                         ("PagedAdamW8bit", "AdamW8bit")])
def test_paged_equals_unpaged_on_cpu(paged, plain):
    n0, bytes0 = paging.stats()
    a = make_params()
    b = clone_params(a)
    oa = OPT_CLASSES[paged](a, lr=1e-2)
    ob = OPT_CLASSES[plain](b, lr=1e-2)
    for step in range(4):
        set_grads(a, step)
        set_grads(b, step)
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        sa, sb = oa.state[pa], ob.state[pb]
        assert torch.equal(sa["state1"], sb["state1"]) and torch.equal(sa["state2"], sb["state2"])
        assert paging.is_paged(sa["state1"]) == (pa.numel() >= fourbit.optim.PAGED_MIN_NUMEL)
        assert not paging.is_paged(sb["state1"])
    n1, bytes1 = paging.stats()
    big = [p for p in a if p.numel() >= fourbit.optim.PAGED_MIN_NUMEL]
    assert n1 - n0 == 2 * len(big)
    per_elem = 1 if "8bit" in paged else 4
    assert bytes1 - bytes0 == 2 * per_elem * sum(p.numel() for p in big)
    del oa, sa, sb
    import gc
    gc.collect()
    assert paging.stats()[0] == n0  # buffers are freed with their tensors


@pytest.mark.parametrize("name", list(OPT_CLASSES))
def test_save_reload_resume_equals_uninterrupted(name):
    cls = OPT_CLASSES[name]
    a = make_params()
    b = clone_params(a)
    make = lambda ps: cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 2e-3}], lr=1e-2)  # noqa: E731
    oa = make(a)
    for step in range(8):
        set_grads(a, step)
        oa.step()
    ob = make(b)
    for step in range(4):
        set_grads(b, step)
        ob.step()
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in b], "optim": ob.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    c = [torch.nn.Parameter(t.clone()) for t in saved["model"]]
    oc = make(c)
    oc.load_state_dict(saved["optim"])
    for step in range(4, 8):
        set_grads(c, step)
        oc.step()
    for pa, pc in zip(a, c):
        assert torch.equal(pa, pc)
        assert oa.state[pa]["step"] == oc.state[pc]["step"] == 8


def test_state_dict_has_bitsandbytes_layout():
    params = make_params()
    opt = fourbit.optim.AdamW8bit(params)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    for i, p in enumerate(params):
        st = sd["state"][i]
        assert st["step"] == 1
        inner = st["__bnb_optimizer_quant_state__"]
        keys = {"state1", "state2"} | ({"absmax1", "absmax2", "qmap1", "qmap2"} if p.numel() >= 4096 else set())
        assert set(inner) == keys
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)
    assert sd["param_groups"][0]["weight_decay"] == 1e-2


def test_bitsandbytes_state_dicts_load_both_ways():
    bnb = pytest.importorskip("bitsandbytes")
    a = make_params([(64, 128), (10,)])
    b = clone_params(a)
    bo = bnb.optim.AdamW8bit(a, lr=1e-2)
    fo = fourbit.optim.AdamW8bit(b, lr=1e-2)
    for step in range(3):
        set_grads(a, step)
        bo.step()
    fo.load_state_dict(bo.state_dict())
    for pa, pb in zip(a, b):
        sa, sb = bo.state[pa], fo.state[pb]
        assert sb["step"] == 3
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), k
    # and back: bitsandbytes loads fourbit's dict and steps from it
    set_grads(b, 3)
    fo.step()
    bo2 = bnb.optim.AdamW8bit(clone_params(b), lr=1e-2)
    bo2.load_state_dict(fo.state_dict())
    p = bo2.param_groups[0]["params"][0]
    assert bo2.state[p]["step"] == 4
    assert torch.equal(bo2.state[p]["state1"], fo.state[b[0]]["state1"])


def test_torch_adamw_state_dict_loads_as_32bit_states():
    ref = make_params()
    ours = clone_params(ref)
    t_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(3):
        set_grads(ref, step)
        t_opt.step()
    f_opt = fourbit.optim.AdamW(ours, lr=1e-2)
    for r, o in zip(ref, ours):
        o.data.copy_(r.data)
    f_opt.load_state_dict(t_opt.state_dict())
    for step in range(3, 6):
        set_grads(ref, step)
        set_grads(ours, step)
        t_opt.step()
        f_opt.step()
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=2e-6, atol=2e-7)


def test_one_adamw_step_call_per_group(monkeypatch):
    import fourbit.optim.adamw as mod

    calls = []
    real = mod._adamw_step_op

    def counting(*args):
        calls.append(len(args[0]))
        return real(*args)

    monkeypatch.setattr(mod, "_adamw_step_op", counting)
    params = make_params()
    opt = fourbit.optim.AdamW8bit([{"params": params[:3]}, {"params": params[3:]}])
    set_grads(params, 0)
    opt.step()
    # One call per group; the first mixes 32-bit (7 elements) and 8-bit states.
    assert calls == [3, 1]
    assert opt.state[params[0]]["state1"].dtype == torch.float32
    assert opt.state[params[2]]["state1"].dtype == torch.uint8


def test_adamw_step_opcheck():
    params = [torch.randn(300), torch.randn(5000)]
    grads = [torch.randn(300), torch.randn(5000)]
    s1 = [torch.zeros(300), torch.zeros(5000, dtype=torch.uint8)]
    s2 = [torch.zeros(300), torch.zeros(5000, dtype=torch.uint8)]
    a1 = [torch.zeros(20)]
    a2 = [torch.zeros(20)]
    q1, q2 = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
    torch.library.opcheck(torch.ops.fourbit.adamw_step,
                          (params, grads, s1, s2, a1, a2, q1, q2, [1, 1], 1e-3, 0.9, 0.999, 1e-8, 0.01),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,needles", [
    ({"lr": -0.1}, ["lr", "-0.1"]),
    ({"betas": (1.0, 0.999)}, ["betas[0]", "1.0"]),
    ({"betas": (0.9, -0.5)}, ["betas[1]", "-0.5"]),
    ({"eps": 0.0}, ["eps", "0.0"]),
    ({"eps": -1e-8}, ["eps", "-1e-08"]),
    ({"weight_decay": -0.01}, ["weight_decay", "-0.01"]),
    ({"lr": float("nan")}, ["lr", "nan"]),
    ({"amsgrad": True}, ["amsgrad"]),
    ({"optim_bits": 4}, ["optim_bits", "4"]),
])
@pytest.mark.parametrize("name", ["AdamW", "PagedAdamW8bit"])
def test_bad_hyper_parameters_raise_value_error(name, kwargs, needles):
    if name == "PagedAdamW8bit" and "optim_bits" in kwargs:
        needles = ["optim_bits", "4"]
    with pytest.raises(ValueError) as e:
        OPT_CLASSES[name](make_params(), **kwargs)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_tensor_lr_is_accepted_like_torch():
    ref = make_params()
    ours = clone_params(ref)
    t_opt = torch.optim.AdamW(ref, lr=torch.tensor(1e-2), foreach=False)
    f_opt = fourbit.optim.AdamW(ours, lr=torch.tensor(1e-2))
    for step in range(3):
        set_grads(ref, step)
        set_grads(ours, step)
        t_opt.step()
        f_opt.step()
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=2e-6, atol=2e-7)
    with pytest.raises(ValueError, match=r"lr must be a number or a one-element tensor, got shape \(2,\)"):
        fourbit.optim.AdamW(make_params(), lr=torch.tensor([1e-2, 1e-3]))


def test_bad_param_group_raises_value_error():
    opt = fourbit.optim.AdamW(make_params()[:1])
    with pytest.raises(ValueError, match=r"lr = -1"):
        opt.add_param_group({"params": make_params()[1:], "lr": -1.0})
    assert len(opt.param_groups) == 1


def _op_args(**over):
    args = dict(params=[torch.randn(300)], grads=[torch.randn(300)], state1=[torch.zeros(300)],
                state2=[torch.zeros(300)], absmax1=[], absmax2=[], qmap1=torch.empty(0), qmap2=torch.empty(0),
                steps=[1], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    args.update(over)
    return args


def _call(args):
    torch.ops.fourbit.adamw_step(*args.values())


@pytest.mark.parametrize("over,needles", [
    ({"lr": -1.0}, ["lr must be >= 0", "-1"]),
    ({"beta1": 1.0}, ["beta1 must be in [0, 1)", "1"]),
    ({"beta2": -0.1}, ["beta2 must be in [0, 1)", "-0.1"]),
    ({"eps": 0.0}, ["eps must be > 0", "0"]),
    ({"weight_decay": -1.0}, ["weight_decay must be >= 0", "-1"]),
    ({"steps": [0]}, ["tensors[0].step must be >= 1", "0"]),
    ({"grads": [torch.randn(300, dtype=torch.float64)]}, ["grads[0] has dtype Double", "params[0] has dtype Float"]),
    ({"grads": [torch.randn(299)]}, ["grads[0] must have 300 elements", "299"]),
    ({"state1": [torch.zeros(301)]}, ["state1[0] must have 300 elements", "301"]),
    ({"state2": [torch.zeros(300, dtype=torch.uint8)]}, ["state2[0] has dtype Byte", "state1[0] has dtype Float"]),
    ({"state1": [torch.zeros(300, dtype=torch.float16)], "state2": [torch.zeros(300, dtype=torch.float16)]},
     ["state1[0] must be torch.float32", "Half"]),
    ({"params": [torch.randint(0, 3, (300,))]}, ["params[0] must be torch.float32", "Long"]),
    ({"params": [torch.randn(600)[::2]]}, ["params[0] must be contiguous", "2"]),
    ({"grads": []}, ["grads has 0 tensors but params has 1"]),
    ({"steps": [1, 2]}, ["steps has 2 entries", "params has 1"]),
    ({"state1": [torch.zeros(300, dtype=torch.uint8)], "state2": [torch.zeros(300, dtype=torch.uint8)]},
     ["absmax1 has 0 tensors"]),
    ({"state1": [torch.zeros(300, dtype=torch.uint8)], "state2": [torch.zeros(300, dtype=torch.uint8)],
      "absmax1": [torch.zeros(3)], "absmax2": [torch.zeros(2)], "qmap1": torch.zeros(256), "qmap2": torch.zeros(256)},
     ["absmax1[0] must have 2 elements", "3"]),
    ({"state1": [torch.zeros(300, dtype=torch.uint8)], "state2": [torch.zeros(300, dtype=torch.uint8)],
      "absmax1": [torch.zeros(2)], "absmax2": [torch.zeros(2)], "qmap1": torch.zeros(255), "qmap2": torch.zeros(256)},
     ["qmap1 must have 256 elements", "255"]),
])
def test_adamw_step_op_errors_name_argument_and_value(over, needles):
    with pytest.raises(ValueError) as e:
        _call(_op_args(**over))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_load_state_dict_errors():
    params = make_params()
    opt = fourbit.optim.AdamW8bit(params)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][3]["__bnb_optimizer_quant_state__"]["state1"] = torch.zeros(5, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"state1 of parameter 3 has shape \[5\] but the parameter has \[1000, 129\]"):
        fourbit.optim.AdamW8bit(clone_params(params)).load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][3]["__bnb_optimizer_quant_state__"]["qmap1"] = torch.linspace(-1, 1, 256)
    with pytest.raises(ValueError, match="qmap1 of parameter 3 is not bitsandbytes' signed dynamic map"):
        fourbit.optim.AdamW8bit(clone_params(params)).load_state_dict(bad)
    with pytest.raises(ValueError, match="the optimizer has 2"):
        fourbit.optim.AdamW8bit([{"params": params[:1]}, {"params": params[1:]}]).load_state_dict(sd)


def test_page_manager_refuses_more_than_free_host_memory():
    free, total = paging.memory_info("cpu")
    assert 0 < free <= total
    request = (free // 4) + (1 << 40)  # elements of fp32: far above what is free
    with pytest.raises(RuntimeError) as e:
        paging.paged_zeros((request,), torch.float32, "cpu")
    msg = str(e.value)
    assert f"bytes = {4 * request}" in msg and "the host" in msg and "bytes free" in msg


def test_page_manager_host_buffers():
    n0, b0 = paging.stats()
    t = paging.paged_zeros((1000, 3), torch.bfloat16, "cpu")
    assert t.shape == (1000, 3) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
    assert paging.is_paged(t) and torch.count_nonzero(t) == 0
    assert paging.stats() == (n0 + 1, b0 + 6000)
    t.add_(1)
    del t
    assert paging.stats() == (n0, b0)
    with pytest.raises(ValueError, match=r"paged_zeros: size must have non-negative sizes"):
        paging.paged_zeros((-1, 3), torch.float32, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a usable GPU")
def test_paged_cuda_buffer_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError) as e:
        paging.paged_zeros((10,), torch.float32, "cuda")
    assert "CUDA" in str(e.value) or "cuda" in str(e.value)


# ---------------------------------------------------------------------------- CUDA


def _mixed_group(device, seed=0):
    shapes = [(7,), (33, 65), (320, 320), (1000, 129), (4097,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype=d, device=device)) for s, d in zip(shapes, dtypes)]


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(OPT_CLASSES))
def test_cuda_equals_cpu_bit_for_bit(name):
    cls = OPT_CLASSES[name]
    cpu = _mixed_group("cpu")
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    oc, og = cls(cpu, lr=1e-2), cls(gpu, lr=1e-2)
    for step in range(5):
        set_grads(cpu, step)
        set_grads(gpu, step)
        oc.step()
        og.step()
    torch.cuda.synchronize()
    for pc, pg in zip(cpu, gpu):
        assert torch.equal(pc, pg.cpu())
        for k in ("state1", "state2", "absmax1", "absmax2"):
            if k in oc.state[pc]:
                assert torch.equal(oc.state[pc][k], og.state[pg][k].cpu()), k


@pytest.mark.cuda
def test_cuda_32bit_close_to_torch_fused_adamw():
    ref = make_params(device="cuda")
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    t_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    f_opt = fourbit.optim.AdamW(ours, lr=1e-2, weight_decay=0.1)
    for step in range(10):
        set_grads(ref, step)
        set_grads(ours, step)
        t_opt.step()
        f_opt.step()
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("paged,plain", [("PagedAdamW", "AdamW"), ("PagedAdamW8bit", "AdamW8bit")])
def test_cuda_paged_equals_unpaged_and_survives_eviction(paged, plain):
    a = make_params(device="cuda")
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa, ob = OPT_CLASSES[paged](a, lr=1e-2), OPT_CLASSES[plain](b, lr=1e-2)
    for step in range(6):
        set_grads(a, step)
        set_grads(b, step)
        oa.step()
        ob.step()
        if step % 2 == 0:
            oa.evict_states()  # the next step prefetches them back
    torch.cuda.synchronize()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        assert torch.equal(oa.state[pa]["state1"], ob.state[pb]["state1"])
        if pa.numel() >= fourbit.optim.PAGED_MIN_NUMEL:
            assert paging.is_paged(oa.state[pa]["state1"]) and oa.state[pa]["state1"].is_cuda


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["AdamW", "PagedAdamW8bit"])
def test_cuda_state_dict_moves_between_cpu_and_gpu(name):
    cls = OPT_CLASSES[name]
    gpu = make_params(device="cuda")
    og = cls(gpu, lr=1e-2)
    for step in range(3):
        set_grads(gpu, step)
        og.step()
    sd = og.state_dict()
    cpu = [torch.nn.Parameter(p.detach().cpu()) for p in gpu]
    oc = cls(cpu, lr=1e-2)
    oc.load_state_dict(sd)  # GPU -> CPU
    gpu2 = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    og2 = cls(gpu2, lr=1e-2)
    og2.load_state_dict(oc.state_dict())  # CPU -> GPU
    for step in range(3, 5):
        for ps in (gpu, cpu, gpu2):
            set_grads(ps, step)
        og.step()
        oc.step()
        og2.step()
    for pg, pc, pg2 in zip(gpu, cpu, gpu2):
        assert torch.equal(pg.cpu(), pc) and torch.equal(pg, pg2)
        assert og2.state[pg2]["state1"].is_cuda and oc.state[pc]["state1"].device.type == "cpu"


@pytest.mark.cuda
def test_cuda_page_manager_refuses_more_than_free_memory():
    free, total = paging.memory_info("cuda")
    assert 0 < free <= total
    with pytest.raises(RuntimeError) as e:
        paging.paged_zeros((free // 4 + (1 << 20),), torch.float32, "cuda")
    assert "bytes = " in str(e.value) and "cuda:0" in str(e.value)
    t = paging.paged_zeros((1 << 20,), torch.float32, "cuda")  # a small one works
    assert t.is_cuda and torch.count_nonzero(t).item() == 0
