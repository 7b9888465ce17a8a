"""fourbit: QLoRA building blocks in C++/CUDA with bitsandbytes-compatible 4-bit formats.

Importing the package loads the native extension, which registers ``torch.ops.fourbit.*``.
A missing or broken extension is an ImportError here, never a silent fallback.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.fourbit.*)
from . import _ops  # noqa: F401  (fake kernels for torch.compile)
from . import functional
from .functional import QuantState, matmul_4bit

__version__ = "0.1.0"

from . import optim  # noqa: E402  (paged AdamW, 32-bit and 8-bit states; after _C)


def built_with_cuda() -> bool:
    """True if the native library was compiled with the CUDA kernels."""
    return _C.built_with_cuda()


def cpu_matmul_cache_clear() -> int:
    """Drop this machine's measured CPU matmul choices (src/torch/cpu_dispatch.cpp): its
    entries in $XDG_CACHE_HOME/fourbit/cpu_matmul.json (rewritten atomically; other
    machines' entries are kept) and this process's, so each shape class is measured again at
    its next use. Returns the number of cache entries dropped. FOURBIT_CPU_MATMUL=remeasure
    re-measures without dropping anything first."""
    return int(torch.ops.fourbit.cpu_matmul_cache_clear())


__all__ = ["functional", "QuantState", "matmul_4bit", "built_with_cuda", "cpu_matmul_cache_clear",
           "__version__"]

from . import nn  # noqa: E402  (Params4bit, Linear4bit, LinearNF4, LinearFP4)
from .nn import replace_linear  # noqa: E402  (nn.Linear -> Linear4bit, streaming)
from .training import prepare_model_for_kbit_training  # noqa: E402  (PEFT's function of that name)
from . import utils  # noqa: E402,F401  (bitsandbytes.utils' helpers)
from . import integrations  # noqa: E402,F401  (its submodules import their library on first use)

__all__ += ["nn", "replace_linear", "prepare_model_for_kbit_training"]


def __getattr__(name):
    # fourbit.FourbitConfig and fourbit.optimizer_cls_and_kwargs need transformers: imported
    # (and registered with it) on first use. Together they make the two-line switch of a
    # bitsandbytes QLoRA script (docs/transformers.md).
    if name == "FourbitConfig":
        from .integrations.hf_quantizer import FourbitConfig

        return FourbitConfig
    if name == "optimizer_cls_and_kwargs":
        from .integrations.trainer import optimizer_cls_and_kwargs

        return optimizer_cls_and_kwargs
    raise AttributeError(f"module 'fourbit' has no attribute {name!r}")
