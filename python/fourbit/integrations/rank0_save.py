"""Saving an FSDP2-sharded fourbit model on rank 0, one tensor at a time.

Two saves, both called on every rank with the same model (``prepare_fsdp``-ed and sharded
with ``fully_shard``, or not sharded at all):

``save_adapter(model, out_dir)``
    The PEFT adapter, as ``PeftModel.save_pretrained(out_dir)`` writes it for the unsharded
    model (``adapter_model.safetensors`` with PEFT's key names, ``adapter_config.json``,
    ``README.md``). PEFT picks the entries (``get_peft_model_state_dict`` on the sharded
    state dict, which only selects and renames); each is gathered on its own
    (``DTensor.full_tensor()``) and rank 0 hands the whole-tensor state dict to PEFT's own
    ``save_pretrained(state_dict=...)``, so the names and bytes are PEFT's.

``save_quantized(model, out_dir, max_shard_size=...)``
    The 4-bit base model as ``fourbit.integrations.transformers.save_pretrained`` writes it
    in one process (the checkpoint transformers + bitsandbytes load): ``config.json`` with
    bitsandbytes' ``quantization_config``, ``generation_config.json``, and
    ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + index, with
    bitsandbytes' keys and bytes (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``,
    ``weight.quant_state.bitsandbytes__nf4``). LoRA layers are left out (their base layers
    are saved under the base model's names); nothing is merged. Layers are gathered one at a
    time in state-dict order and the shards are cut as huggingface_hub's
    ``split_torch_state_dict_into_shards`` cuts them (greedy, in that order): rank 0 holds
    at most one gathered layer plus the output shard being filled (``max_shard_size``), never
    the model. The files are byte for byte those of the one-process save.

Both write into a fresh directory beside ``out_dir`` and move the files into place only once
everything is written: a failure (on any rank, at any point) leaves an existing
``out_dir`` as it was and no partial files. Errors are raised on every rank with the same
type and message, naming the argument, layer or file, instead of leaving the other ranks
waiting in a collective.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nn.linear import Linear4bit
from .distributed import flat_layout

__all__ = ["save_adapter", "save_quantized"]

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_EXCEPTIONS = {e.__name__: e for e in (ValueError, KeyError, TypeError, RuntimeError, OSError, FileNotFoundError,
                                       FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)}


# ---------------------------------------------------------------------------------------- ranks
class _Ranks:
    """This process's rank and the world size (0 of 1 without a process group), and the few
    collectives that keep every rank's view of success and failure the same."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        cuda = self.on and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def agree(self, error: Optional[BaseException]) -> None:
        """Every rank's own check: raise the lowest failing rank's error on every rank."""
        found = [_describe(error)]
        if self.world > 1:
            found = [None] * self.world
            dist.all_gather_object(found, _describe(error))
        for item in found:
            if item is not None:
                _reraise(item, error)

    def share(self, value=None, error: Optional[BaseException] = None):
        """Rank 0's ``value`` on every rank, or rank 0's ``error`` raised on every rank."""
        box = [(value, _describe(error))]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        value, shared = box[0]
        if shared is not None:
            _reraise(shared, error)
        return value

    def failed(self, error: Optional[BaseException]) -> None:
        """A cheap per-tensor check of rank 0's status while streaming: on failure rank 0's
        message is sent and raised on every rank."""
        if self.world > 1:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=self.device)
            dist.broadcast(flag, src=0)
            if flag.item():
                self.share(error=error)
        elif error is not None:
            _reraise(_describe(error), error)


def _describe(error: Optional[BaseException]):
    if error is None:
        return None
    message = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    return type(error).__name__, message


def _reraise(item, local: Optional[BaseException]) -> None:
    """Raises the agreed error; on the rank where it happened, chained to the original."""
    kind, message = item
    raise _EXCEPTIONS.get(kind, RuntimeError)(message) from local


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A (possibly sharded) tensor's whole value on every rank (a collective for a DTensor)."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach()


# ---------------------------------------------------------------------------------------- output directory
class _Staging:
    """Rank 0's output: a new directory beside ``out_dir`` that is moved into place on success
    (renamed when ``out_dir`` does not exist; else its files replace their namesakes and
    ``stale`` files of the previous checkpoint are removed) and deleted on failure."""

    def __init__(self, out_dir, argument: str = "out_dir"):
        try:
            path = os.fspath(out_dir)
        except TypeError:
            raise ValueError(f"{argument} must be a path (str or os.PathLike), got {type(out_dir).__name__}") from None
        if not path:
            raise ValueError(f"{argument} must be a directory path, got {out_dir!r}")
        self.out_dir = os.path.abspath(path)
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise NotADirectoryError(f"{argument} {path!r} is a file, not a directory; pass a directory to save into")
        parent = os.path.dirname(self.out_dir)
        above = parent
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise NotADirectoryError(f"{argument} {path!r}: {above!r} is a file, not a directory")
        try:
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out_dir)}.partial-", dir=parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # what os.makedirs gives, not mkdtemp's 0o700
        except OSError as e:
            raise type(e)(f"{argument} {path!r}: cannot write in {parent!r} ({e.strerror or e})") from None

    def commit(self, stale) -> list:
        files = sorted(os.path.relpath(os.path.join(d, f), self.tmp) for d, _, fs in os.walk(self.tmp) for f in fs)
        if not os.path.exists(self.out_dir):
            os.rename(self.tmp, self.out_dir)
            return files
        _move_into(self.tmp, self.out_dir)
        for name in os.listdir(self.out_dir):
            if name not in files and stale(name) and os.path.isfile(os.path.join(self.out_dir, name)):
                os.remove(os.path.join(self.out_dir, name))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return files

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _move_into(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and os.path.isdir(d):
            _move_into(s, d)
        else:
            if os.path.isdir(d):
                shutil.rmtree(d)
            os.replace(s, d)


# ---------------------------------------------------------------------------------------- PEFT adapter
def save_adapter(model: nn.Module, out_dir, **kwargs) -> dict:
    """Writes the PEFT adapter of ``model`` (a ``peft.PeftModel``, sharded with FSDP2 or not)
    to ``out_dir`` on rank 0: exactly what ``model.save_pretrained(out_dir, **kwargs)`` writes
    for the same model unsharded. Every rank calls it; each adapter tensor is gathered on its
    own, so rank 0 holds the adapter (not the model).

    ``kwargs`` go to PEFT's ``save_pretrained`` (``selected_adapters``, ``safe_serialization``,
    ``save_embedding_layers``, ...); ``state_dict`` and ``is_main_process`` are set here.
    Returns ``{"files": [...], "tensors": n}`` (the same on every rank). Raises on every rank:
    ValueError for a model that is not a PeftModel or a reserved keyword,
    NotADirectoryError when ``out_dir`` is a file, OSError when it cannot be written.
    """
    ranks = _Ranks()
    error = sharded = keys = None
    try:
        _check_peft(model, kwargs)
        sharded = model.state_dict()
        keys = _adapter_keys(model, sharded, kwargs)
    except Exception as e:  # the same on every rank for the same model; agreed all the same
        error = e
    ranks.agree(error)

    staging = None
    if ranks.rank == 0:
        try:
            staging = _Staging(out_dir)
        except Exception as e:
            error = e
    ranks.share(error=error)
    whole, error = {}, None
    try:
        for key in keys:
            value = _whole(sharded[key])  # a collective: every rank, the same order
            if ranks.rank == 0 and error is None:
                whole[key] = value.cpu()
            del value
        report = None
        if ranks.rank == 0:
            try:
                model.save_pretrained(staging.tmp, state_dict=whole, is_main_process=True, **kwargs)
                del whole
                files = staging.commit(lambda name: name in _ADAPTER_WEIGHTS)
                staging = None
                report = {"files": files, "tensors": len(keys)}
            except Exception as e:
                error = e
                staging.abort()  # before any rank hears of the failure
                staging = None
        return ranks.share(report, error)
    finally:
        if staging is not None:
            staging.abort()


def _adapter_keys(model, sharded: dict, kwargs) -> list:
    """The model's state-dict keys PEFT saves for the selected adapters, in PEFT's order:
    ``get_peft_model_state_dict`` on the sharded state dict only selects and renames."""
    from peft.utils import get_peft_model_state_dict
    name_of = {id(v): k for k, v in sharded.items()}
    keys = []
    for adapter in kwargs.get("selected_adapters") or list(model.peft_config):
        picked = get_peft_model_state_dict(model, state_dict=sharded, adapter_name=adapter,
                                           save_embedding_layers=kwargs.get("save_embedding_layers", "auto"))
        for k, v in picked.items():
            if id(v) not in name_of:
                raise ValueError(f"adapter {adapter!r}: PEFT computes entry {k!r} instead of taking it from the "
                                 "model's state_dict; save_adapter gathers stored tensors only")
            if name_of[id(v)] not in keys:
                keys.append(name_of[id(v)])
    return keys


def _check_peft(model, kwargs) -> None:
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ImportError(f"save_adapter needs peft: {e}") from e
    if not isinstance(model, PeftModel):
        raise ValueError(f"model must be a peft.PeftModel (get_peft_model(...)), got {type(model).__name__}")
    for reserved in ("state_dict", "is_main_process"):
        if reserved in kwargs:
            raise ValueError(f"{reserved}={kwargs[reserved]!r}: save_adapter sets {reserved} itself (rank 0 "
                             "writes the gathered adapter)")
    unknown = [a for a in kwargs.get("selected_adapters") or () if a not in model.peft_config]
    if unknown:
        raise ValueError(f"selected_adapters={kwargs['selected_adapters']!r}: {unknown[0]!r} is not an adapter of "
                         f"model (it has {list(model.peft_config)})")


# ---------------------------------------------------------------------------------------- 4-bit base model
class _Entry:
    """One state-dict entry of the base model: its saved name, the model's tensor, and the
    FlatLayout when it is a prepared 4-bit weight (saved as bitsandbytes' entries)."""

    __slots__ = ("key", "tensor", "layout")

    def __init__(self, key, tensor, layout):
        self.key, self.tensor, self.layout = key, tensor, layout


def _base_model(model: nn.Module):
    """The transformers model under a PeftModel (or ``model`` itself)."""
    import transformers
    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and not isinstance(model, transformers.PreTrainedModel):
        base = get_base()
    if not isinstance(base, transformers.PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel (or a PeftModel around one), got "
                         f"{type(model).__name__}")
    return base


def _wrappers(base: nn.Module) -> dict:
    """{prefix: inner child name} of adapter wrappers: a LoRA layer saves its base layer's
    entries under the base model's names (``x.base_layer.weight`` -> ``x.weight``) and drops
    its own (``x.lora_A...``); PEFT's ``modules_to_save`` keeps ``original_module``."""
    out = {}
    for name, m in base.named_modules():
        children = dict(m.named_children())
        for inner in ("base_layer", "original_module"):
            if inner in children and name:
                out[name] = inner
                break
    return out


def _saved_name(key: str, wrappers: dict) -> Optional[str]:
    """The base model's name of state-dict entry (or module) ``key``; None for an adapter's own."""
    parts, out, i = key.split("."), [], 0
    while i < len(parts):
        out.append(parts[i])
        inner = wrappers.get(".".join(parts[:i + 1]))
        i += 1
        if inner is not None:
            if i < len(parts) and parts[i] != inner:
                return None
            i += 1  # the wrapper's inner module: not in the base model's names
    return ".".join(out)


def _check_prepared(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit) and flat_layout(m) is None:
            raise ValueError(f"{name or 'model'}: a Linear4bit not prepared for FSDP; call "
                             "fourbit.integrations.distributed.prepare_fsdp(model) (then fully_shard) before "
                             "save_quantized, or save an unsharded model with "
                             "fourbit.integrations.transformers.save_pretrained")


def _plan(base: nn.Module) -> list:
    """The entries of the base model's checkpoint, in state-dict order, without adapters and
    tied duplicates."""
    layouts = {f"{n}.weight" if n else "weight": flat_layout(m) for n, m in base.named_modules()
               if isinstance(m, Linear4bit)}
    wrappers = _wrappers(base)
    ignore = set(getattr(base, "_keys_to_ignore_on_save", None) or ())
    entries, seen = [], set()
    for key, t in base.state_dict(keep_vars=True).items():
        saved = _saved_name(key, wrappers)
        if saved is None or saved in ignore or id(t) in seen:
            continue
        seen.add(id(t))
        entries.append(_Entry(saved, t, layouts.get(key)))
    return entries


def _config_fields(base: nn.Module, entries: list) -> tuple:
    """(dtype, total_parameters) that transformers' ``save_pretrained`` reads from the
    unsharded, unprepared model: its first floating parameter's dtype (a 4-bit weight has its
    storage dtype) and ``num_parameters()`` (a 4-bit weight counts its packed elements, or
    its real ones on a model loaded by fourbit, whose ``num_parameters`` counts those)."""
    logical = "num_parameters" in base.__dict__
    params = {id(p) for p in base.parameters()}
    dtype, total = None, 0
    for e in entries:
        if id(e.tensor) not in params:
            continue
        if e.layout is not None:
            storage = e.layout.quant_storage
            itemsize = torch.empty(0, dtype=storage).element_size()
            codes = next(numel for name, _, numel, _ in e.layout.segments if name == "codes")
            total += e.layout.shape[0] * e.layout.shape[1] if logical else codes // itemsize
            kind = storage
        else:
            total += e.tensor.numel()
            kind = e.tensor.dtype
        if dtype is None and kind.is_floating_point:
            dtype = kind
    return dtype, total


def _bnb_entries(key: str, flat: torch.Tensor, layout) -> dict:
    """A whole flat weight as bitsandbytes' state-dict entries (each its own tensor)."""
    codes, qs = layout.views(flat)
    prefix = key[:-len("weight")]
    out = {key: codes.clone()}
    for k, v in qs.as_dict(packed=True).items():
        out[f"{prefix}weight.{k}"] = v.clone()
    return out


class _ShardWriter:
    """huggingface_hub's ``split_torch_state_dict_into_shards``, fed one tensor at a time: a
    shard is written (under a provisional name) as soon as it is complete, so only the shard
    being filled is held. A size is the tensor's bytes (the hub counts its storage's: the
    same for the model's own tensors, but a gathered DTensor of uneven shards is a view of
    a padded buffer)."""

    def __init__(self, folder: str, max_shard_size: int, metadata: dict):
        self.folder, self.max, self.metadata = folder, max_shard_size, metadata
        self.current, self.current_size, self.total_size = {}, 0, 0
        self.shards = []  # [[keys] per shard, in the hub's order]

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.nbytes
        self.total_size += size
        if size > self.max:
            self._write({key: tensor})
            return
        if self.current_size + size > self.max:
            self._write(self.current)
            self.current, self.current_size = {}, 0
        self.current[key] = tensor
        self.current_size += size

    def _write(self, tensors: dict) -> None:
        from safetensors.torch import save_file
        save_file(tensors, os.path.join(self.folder, f"shard-{len(self.shards)}.partial"), metadata=self.metadata)
        self.shards.append(list(tensors))

    def finish(self, total_parameters: int) -> None:
        if self.current:
            self._write(self.current)
            self.current = {}
        n = len(self.shards)
        if n == 1:
            os.rename(os.path.join(self.folder, "shard-0.partial"), os.path.join(self.folder, _WEIGHTS))
            return
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.folder, f"shard-{i}.partial"), os.path.join(self.folder, name))
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total_size},
                 "weight_map": weight_map}
        with open(os.path.join(self.folder, _INDEX), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_configs(base: nn.Module, folder: str, dtype: torch.dtype) -> None:
    """config.json (with bitsandbytes' quantization_config) and generation_config.json, as
    ``fourbit.integrations.transformers.save_pretrained`` writes them; the config is left
    as it was."""
    from .transformers import quantization_options_of
    config = base.config
    wrappers = _wrappers(base)
    opts = quantization_options_of(base, module_name=lambda n: _saved_name(n, wrappers) if n else n)
    fields = ("quantization_config", "dtype", "architectures")
    saved = {k: config.__dict__[k] for k in fields if k in config.__dict__}
    try:
        config.quantization_config = opts.to_bnb_dict()
        config.dtype = str(dtype).split(".")[1]
        config.architectures = [type(base).__name__.removeprefix("FSDP")]
        config.save_pretrained(folder)
        if base.can_generate():
            base.generation_config.save_pretrained(folder)
    finally:
        for k in fields:
            if k in saved:
                setattr(config, k, saved[k])
            elif k in config.__dict__:
                delattr(config, k)


def _parse_size(max_shard_size) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (int, str)):
        raise ValueError(f"max_shard_size must be a number of bytes or a size such as '5GB', got {max_shard_size!r}")
    try:
        size = max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(max_shard_size)
    except ValueError:
        raise ValueError(f"max_shard_size must be a number of bytes or a size such as '5GB', got "
                         f"{max_shard_size!r}") from None
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return size


def save_quantized(model: nn.Module, out_dir, *, max_shard_size="50GB") -> dict:
    """Writes the 4-bit base of ``model`` (a transformers model, or a PeftModel around one,
    its ``Linear4bit`` layers ``prepare_fsdp``-ed, sharded with FSDP2 or not) to ``out_dir``
    on rank 0, byte for byte as ``fourbit.integrations.transformers.save_pretrained`` writes
    the same model unsharded in one process (with ``max_shard_size``, transformers' default
    "50GB"): a checkpoint transformers + bitsandbytes, and fourbit, load. Adapters are not
    saved or merged (``save_adapter`` writes them).

    Every rank calls it. Each tensor is gathered on its own; rank 0 holds one gathered layer
    plus the output shard being filled (at most ``max_shard_size``, or one tensor larger than
    that), so ``max_shard_size`` bounds its memory. Returns ``{"files": [...], "tensors": n,
    "quantized": n}`` (the same on every rank). Raises on every rank: ValueError for a model
    that is not a transformers model, a ``Linear4bit`` not prepared for FSDP, mixed 4-bit
    formats or a bad ``max_shard_size``; NotADirectoryError when ``out_dir`` is a file;
    OSError when it cannot be written.
    """
    ranks = _Ranks()
    error = entries = None
    try:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        limit = _parse_size(max_shard_size)
        base = _base_model(model)
        _check_prepared(model)
        entries = _plan(base)
        dtype, total_parameters = _config_fields(base, entries)
    except Exception as e:
        error = e
    ranks.agree(error)

    staging = writer = None
    if ranks.rank == 0:
        try:
            staging = _Staging(out_dir)
            _write_configs(base, staging.tmp, dtype)
            writer = _ShardWriter(staging.tmp, limit, {"format": "pt"})
        except Exception as e:
            error = e
    ranks.share(error=error)
    try:
        for e in entries:
            value = _whole(e.tensor)  # a collective: every rank, the same order
            error = None
            if ranks.rank == 0:
                try:
                    pieces = _bnb_entries(e.key, value, e.layout) if e.layout is not None else {e.key: value.cpu()}
                    del value
                    for k, v in pieces.items():
                        writer.add(k, v)
                    del pieces
                except Exception as ex:
                    error = RuntimeError(f"{e.key}: {type(ex).__name__}: {ex}") if not isinstance(ex, OSError) \
                        else type(ex)(f"{e.key}: {ex}")
                    staging.abort()  # before any rank hears of the failure
                    staging = None
            else:
                del value
            ranks.failed(error)
        report = None
        if ranks.rank == 0:
            try:
                writer.finish(total_parameters)
                files = staging.commit(lambda name: name == _INDEX or name == _WEIGHTS or _SHARD_RE.fullmatch(name))
                staging = None
                report = {"files": files, "tensors": len(entries),
                          "quantized": sum(e.layout is not None for e in entries)}
            except Exception as ex:
                error = ex
                staging.abort()
                staging = None
        return ranks.share(report, error)
    finally:
        if staging is not None:
            staging.abort()
