"""The tree codec of ember's pickle-free checkpoint files (:mod:`ember.strategies.checkpoint_io`):
a state of dicts, lists, tuples, numbers, strings, ``None``, tensors and numpy arrays as a
JSON-serialisable structure plus a flat dict of tensors, and back."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["decode_tree", "encode_tree"]


def encode_tree(obj: Any, *, copy: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-serialisable structure and a flat dict of tensors.

    The tensors' keys are their paths in ``obj`` (the same structure always gives the same keys).
    ``copy=False`` keeps the tensors themselves (sharded DTensors stay sharded); by default they
    are detached CPU copies, ready for safetensors.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:  # (safetensors holds dense tensors only)
                kind = str(value.layout).removeprefix("torch.")
                raise TypeError(
                    f"cannot store a {kind} tensor at {path or '<root>'!r}; store value.to_dense()"
                )
            key = path or "_"
            while key in tensors:  # paths of keys holding dots can collide: keep every tensor
                key += "#"
            # safetensors wants dense, contiguous tensors that own their storage.
            tensors[key] = value.detach().cpu().contiguous().clone() if copy else value
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            key = path or "_"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
            return {"__ndarray__": key}
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        if isinstance(value, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
                return {k: enc(v, f"{path}.{k}") for k, v in value.items()}
            # int keys (optimizer state), or keys that could be confused with our markers
            return {
                "__items__": [
                    [enc(k, f"{path}.k{i}"), enc(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())
                ]
            }
        raise TypeError(
            f"cannot store {type(value).__name__} at {path or '<root>'!r} in a pickle-free checkpoint; "
            "state must be made of dicts, lists, tuples, numbers, strings, None, tensors and numpy arrays"
        )

    return enc(obj, ""), tensors


def decode_tree(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(structure, list):
        return [decode_tree(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            return tensors[structure["__tensor__"]]
        if "__ndarray__" in structure:
            return tensors[structure["__ndarray__"]].numpy()
        if "__tuple__" in structure:
            return tuple(decode_tree(v, tensors) for v in structure["__tuple__"])
        if "__items__" in structure:
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in structure["__items__"]}
        return {k: decode_tree(v, tensors) for k, v in structure.items()}
    return structure
