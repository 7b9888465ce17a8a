"""Where a sharded safetensors checkpoint's shards may live. Shared by every reader of
checkpoint directories (the transformers front door and the ``fourbit`` CLI); it imports
nothing heavy, so a reader can check an index before it loads any library."""

from __future__ import annotations

import os

INDEX_FILE = "model.safetensors.index.json"


def check_shard_names(path: str, weight_map: dict) -> None:
    """Every shard an index names must be a file inside the checkpoint directory: an absolute
    path or one that climbs out (``../elsewhere/x.safetensors``, a symlinked escape) would read
    tensors from anywhere on the machine. ValueError naming the entry otherwise."""
    root = os.path.realpath(path)
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{os.path.join(path, INDEX_FILE)}: weight_map entry {key!r} names shard {name!r}, "
                             "which is not a file name")
        full = os.path.realpath(os.path.join(root, name))
        if os.path.isabs(name) or os.path.commonpath([root, full]) != root:
            raise ValueError(f"{os.path.join(path, INDEX_FILE)}: weight_map entry {key!r} names shard {name!r}, "
                             "which is outside the checkpoint directory; shards must be files inside it")
