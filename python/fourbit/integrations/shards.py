"""Where a sharded safetensors checkpoint's shards may live. Shared by every reader of
checkpoint directories (the transformers front door and the ``fourbit`` CLI); it imports
nothing heavy, so a reader can check an index before it loads any library."""

from __future__ import annotations

import json
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


def read_weight_map(path: str) -> dict:
    """The ``weight_map`` (tensor key -> shard file) of the index in checkpoint directory
    ``path``, its shard names checked (``check_shard_names``). ValueError naming the index file
    when it cannot be read or is not a safetensors index."""
    index = os.path.join(path, INDEX_FILE)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    check_shard_names(path, weight_map)
    return weight_map
