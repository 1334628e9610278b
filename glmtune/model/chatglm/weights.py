"""Reading and writing checkpoint shards in a ChatGLM directory's own layout.

Safetensors first; else ``pytorch_model*.bin`` through ``torch.load(weights_only=True,
mmap=True)`` — never an arbitrary unpickle — one shard at a time, through the index
json when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from glmtune.errors import GlmtuneError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _index_files(model_dir: Path, index_name: str) -> list[Path] | None:
    index = model_dir / index_name
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GlmtuneError(f"{index}: unreadable shard index ({exc}); expected JSON with a "
                           "'weight_map' of tensor name -> shard file") from exc
    missing = [n for n in names if not (model_dir / n).is_file()]
    if missing:
        raise GlmtuneError(f"{index}: lists shard(s) not in the directory: {', '.join(missing)}; "
                           "the download is incomplete")
    return [model_dir / n for n in names]


def shard_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred."""
    model_dir = Path(model_dir)
    for index, single, pattern in ((SAFE_INDEX, "model.safetensors", "*.safetensors"),
                                   (BIN_INDEX, "pytorch_model.bin", "pytorch_model*.bin")):
        files = _index_files(model_dir, index)
        if files:
            return files
        if (model_dir / single).is_file():
            return [model_dir / single]
        found = sorted(model_dir.glob(pattern))
        if found:
            return found
    raise GlmtuneError(f"{model_dir}: no weights found (expected model*.safetensors or "
                       "pytorch_model*.bin, with their index json when sharded)")


def check_files(model_dir: str | Path) -> None:
    shard_files(model_dir)


def read_shard(file: Path) -> dict[str, Any]:
    """One shard's tensors (memory-mapped; .bin only through weights_only unpickling)."""
    import torch

    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt zip, refused pickle global, truncated file, ...
        raise GlmtuneError(f"{file}: unreadable weight shard ({str(exc).splitlines()[0]}); "
                           "re-download it") from exc


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of every stored tensor, one shard in memory at a time."""
    for file in shard_files(model_dir):
        shard = read_shard(file)
        yield from shard.items()
        del shard


def write_shards(out: Path, tensors: dict[str, Any], *, max_shard_bytes: int = 2 << 30) -> None:
    """Safetensors shards with ``model.safetensors.index.json``, names kept as given."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    (out / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}, indent=2) + "\n",
                                  encoding="utf-8")
