"""Integrations with the Hugging Face stack, imported on demand (each needs its library):

- ``fourbit.integrations.peft``: PEFT's LoRA on fourbit ``Linear4bit`` layers (fused LoRA op),
  standard PEFT adapters that move both ways with bitsandbytes + PEFT models.
- ``fourbit.integrations.transformers``: load a Hugging Face checkpoint directory straight into
  fourbit 4-bit layers (``BitsAndBytesConfig`` options), and save one transformers +
  bitsandbytes can load.
"""
