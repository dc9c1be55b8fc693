"""Tensor files without a full copy in memory: sharded checkpoints and streamed safetensors.

- :func:`save_shards` / :func:`load_shards`: every rank writes (reads) only its own shards through
  ``torch.distributed.checkpoint`` with its safetensors storage: one ``shard-<R>-...safetensors``
  file per writing rank, each holding that rank's pieces of every tensor and their offsets in the
  full tensor (in the safetensors header). No rank gathers the model, nothing is pickled, and DCP
  reshards on load, so a checkpoint saved on N ranks loads on M ranks or into full tensors.
- :class:`SafetensorsWriter`: a safetensors file written one tensor at a time (the header comes
  from shapes and dtypes first), so saving a sharded model needs one full tensor in memory at most.
- :func:`consolidate`: the shards of one model turned into a single safetensors file, streaming.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from ember.strategies.checkpoint_io import CheckpointError
from ember.strategies.digests import make_durable, new_digest

__all__ = ["SafetensorsWriter", "consolidate", "load_shards", "save_shards", "shard_metadata", "storable"]

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def storable(dtype: torch.dtype) -> bool:
    """Whether :class:`SafetensorsWriter` can write tensors of ``dtype``."""
    return dtype in _DTYPES


class SafetensorsWriter:
    """Write ``specs`` (name, dtype, shape) to ``path`` as safetensors, one :meth:`write` per tensor, in order.

    The file appears at ``path`` (atomically, fsynced) only when every tensor was written; an
    exception inside the ``with`` block leaves no file behind. Its digest (XXH3-128) is computed from
    the bytes as they are written (a few ms per 100 MB, no read-back) and handed to the checkpoint
    manifest, which then need not read the file again. Inside
    :func:`~ember.strategies.digests.deferred_syncs` the fsync runs on a thread while the caller goes on.
    """

    def __init__(
        self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in _DTYPES:
                raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._path = path
        self._tmp = path.with_name(f".{path.name}.tmp")
        self._specs = list(specs)
        self._written = 0
        self._digest = new_digest()
        self._file = open(self._tmp, "wb")
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._digest.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._written >= len(self._specs):
            raise ValueError(f"tensor {name!r} was not announced to this SafetensorsWriter")
        expected = self._specs[self._written]
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != expected:
            raise ValueError(f"SafetensorsWriter expected {expected}, got {got}")
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            self._put(data.view(torch.uint8).numpy().data)
        self._written += 1

    def close(self) -> None:
        if self._written != len(self._specs):
            missing = [name for name, _, _ in self._specs[self._written :]]
            self.abort()
            raise ValueError(f"SafetensorsWriter closed before writing {missing}")
        self._file.flush()
        make_durable(self._file, self._tmp, self._digest.hexdigest(), final=self._path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


@contextmanager
def _single_process_ok() -> Iterator[None]:
    # DCP warns whenever it runs without a process group; in one process that is what we want.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_shards(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every rank calls this with its state (DTensors are written shard by shard; a plain tensor,
    the same on every rank, is written once). A collective when a process group exists."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    with _single_process_ok():
        save(
            tensors,
            storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True),
            no_dist=not dist.is_initialized(),
        )


def shard_metadata(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and full shape of every tensor saved at ``path`` (read from the safetensors headers)."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    if not path.is_dir():
        raise CheckpointError(f"sharded tensors {str(path)!r} are missing")
    metadata = HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    return {
        key: (md.properties.dtype, tuple(md.size))  # type: ignore[union-attr]
        for key, md in sorted(metadata.items())
    }


def load_shards(
    path: Path, targets: dict[str, torch.Tensor], *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Fill ``targets`` in place from the shards at ``path`` and return them.

    A DTensor target receives exactly its own shard, whatever the sharding at save time; a plain
    tensor receives the full tensor. Saved tensors without a target are returned as new full
    tensors; with ``strict``, a target the checkpoint lacks (or of another shape) is an error.
    """
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict_loader import load

    saved = shard_metadata(path)
    missing = sorted(set(targets) - set(saved))
    if missing:
        if strict:
            raise CheckpointError(f"sharded checkpoint {str(path)!r} has no tensors {missing[:10]}")
        targets = {k: v for k, v in targets.items() if k in saved}
    for key, target in targets.items():
        if tuple(target.shape) != saved[key][1]:
            raise CheckpointError(
                f"tensor {key!r} has shape {list(saved[key][1])} in {str(path)!r}, but {list(target.shape)} here"
            )
    targets = dict(targets)
    for key, (dtype, shape) in saved.items():
        targets.setdefault(key, torch.empty(shape, dtype=dtype))
    if targets:
        with _single_process_ok():
            load(
                targets, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not dist.is_initialized()
            )
    return targets


def consolidate(path: Path, out: Path) -> list[str]:
    """Write the full tensors saved as shards at ``path`` into the safetensors file ``out``, one tensor
    in memory at a time; return their names. Runs in one process, without a process group."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict_loader import load

    saved = shard_metadata(path)
    with SafetensorsWriter(out, [(key, dtype, shape) for key, (dtype, shape) in saved.items()]) as writer:
        for key, (dtype, shape) in saved.items():
            full = {key: torch.empty(shape, dtype=dtype)}
            with _single_process_ok():
                load(full, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
            writer.write(key, full[key])
    return list(saved)
