"""Integrations with the Hugging Face stack, imported on demand (each needs its library):

- ``fourbit.integrations.peft``: PEFT's LoRA on fourbit ``Linear4bit`` layers (fused LoRA op),
  standard PEFT adapters that move both ways with bitsandbytes + PEFT models.
- ``fourbit.integrations.transformers``: load a Hugging Face checkpoint directory straight into
  fourbit 4-bit layers (``BitsAndBytesConfig`` options), and save one transformers +
  bitsandbytes can load.
- ``fourbit.integrations.hf_quantizer``: ``FourbitConfig`` and fourbit's quantizer, registered
  with transformers, so ``AutoModel*.from_pretrained(..., quantization_config=FourbitConfig(...))``
  is transformers' own loader building fourbit layers (``fourbit.FourbitConfig`` imports it).
- ``fourbit.integrations.trainer``: ``optimizer_cls_and_kwargs(args)``, fourbit's optimizer for
  a ``TrainingArguments.optim`` name, for the Trainer's ``optimizer_cls_and_kwargs`` argument.
- ``fourbit.integrations.distributed``: ``prepare_fsdp(model)`` before FSDP2's ``fully_shard``
  (the 4-bit weights and their quantization state sharded as bytes); docs/distributed.md.
- ``fourbit.integrations.rank0_load`` / ``rank0_save``: fill a sharded model from a checkpoint
  that rank 0 streams; save its PEFT adapter and export its 4-bit base (bitsandbytes format)
  with rank 0 writing, one tensor gathered at a time.
"""


def __getattr__(name):
    # fourbit.integrations.<name> after a plain ``import fourbit``: each submodule on first use.
    if name in ("peft", "transformers", "trainer", "hf_quantizer", "distributed", "rank0_load", "rank0_save"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
