"""Reading and writing checkpoint shards in a ChatGLM directory's own layout.

Safetensors first; else ``pytorch_model*.bin`` through ``torch.load(weights_only=True,
mmap=True)`` — never an arbitrary unpickle — one shard at a time, through the index
json when there is one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def read_shard(file: Path) -> dict[str, Any]:
    """One shard's tensors (memory-mapped; .bin only through weights_only unpickling)."""
    import torch

    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # a pre-zip (torch < 1.6) pickle cannot be memory-mapped: read it whole
            return torch.load(file, map_location="cpu", weights_only=True)
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


class _OneShardMapped:
    """Reads stored tensors keeping at most one .bin shard mapped: asking for a tensor of
    another shard unmaps the previous one. transformers asks in sorted-name order, which
    is not the shards' order (ChatGLM-6B keeps word_embeddings, sorted last, in its first
    shard), so holding a shard until all its tensors were taken would keep every page
    read so far resident."""

    def __init__(self):
        import threading

        self.file: Path | None = None
        self.tensors: dict[str, Any] | None = None
        self.lock = threading.Lock()  # transformers materializes from a thread pool

    def take(self, file: Path, name: str):
        with self.lock:
            if file != self.file:
                self.tensors = None  # the old mapping goes before the new one is made
                self.tensors, self.file = read_shard(file), file
            return self.tensors[name].clone()  # a copy of its own: the mapping can go


class LazyTensor:
    """A stored tensor that is read when transformers materializes it (``tensor[...]``)."""

    def __init__(self, reader: _OneShardMapped, file: Path, name: str):
        self.reader, self.file, self.name = reader, file, name

    def __getitem__(self, item):
        return self.reader.take(self.file, self.name)[item]


def lazy_bin_state_dict(model_dir: str | Path) -> dict[str, LazyTensor] | None:
    """name -> LazyTensor over the .bin shards, or None when the checkpoint has safetensors.

    transformers memory-maps every .bin shard up front and keeps them mapped until the
    whole model is loaded, so each page it read stays in the process's RSS: a 12 GB
    checkpoint costs 12 GB on top of the (maybe 4-bit) model. Read lazily with one shard
    mapped at a time, the peak is the model plus one shard.
    """
    files = shard_files(model_dir)
    if files[0].suffix != ".bin":
        return None
    model_dir = Path(model_dir)
    index = model_dir / BIN_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, set()).add(name)
    else:  # one unindexed file: its names are only known by reading it
        by_file = {files[0].name: set(read_shard(files[0]))}
    reader = _OneShardMapped()
    return {name: LazyTensor(reader, model_dir / file, name)
            for file, names in by_file.items() for name in names}


def from_pretrained(model_class, model_dir: str | Path, **kwargs):
    """``model_class.from_pretrained`` on a checkpoint directory, the weights read one shard
    at a time: .bin shards lazily (see lazy_bin_state_dict), safetensors through pread."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from glmtune.model.load import streaming_safetensors

    # ZeRO-3 at load time takes a path of its own that wants real tensors (and partitions them)
    lazy = None if is_deepspeed_zero3_enabled() else lazy_bin_state_dict(model_dir)
    if lazy is None:
        with streaming_safetensors():
            return model_class.from_pretrained(str(model_dir), **kwargs)
    model = model_class.from_pretrained(None, state_dict=lazy, **kwargs)
    # what adapters record as their base (a state_dict load leaves it empty)
    model.config._name_or_path = model.name_or_path = str(model_dir)
    return model
