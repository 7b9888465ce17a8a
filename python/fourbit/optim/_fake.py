"""Fake (meta) kernels of the optimizer and page-manager ops, so torch.compile and
FakeTensor tracing see through them. adamw_step mutates its lists in place (the schema says
so) and returns nothing."""

import torch

lib = "fourbit"


@torch.library.register_fake(f"{lib}::adamw_step")
def _(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, steps, lr, beta1, beta2, eps,
      weight_decay):
    if not (len(grads) == len(state1) == len(state2) == len(steps) == len(params)):
        raise ValueError("adamw_step: params, grads, state1, state2 and steps must have the same length")
    for i, p in enumerate(params):
        for name, t in (("grads", grads[i]), ("state1", state1[i]), ("state2", state2[i])):
            if t.device != p.device:
                raise ValueError(f"adamw_step: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
    return None


@torch.library.register_fake(f"{lib}::paged_zeros")
def _(size, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)


@torch.library.register_fake(f"{lib}::paged_prefetch")
def _(tensors, device):
    return None
