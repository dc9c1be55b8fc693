"""The checkpoint codec's refusals name what they refuse."""

from __future__ import annotations

import pytest
import torch

from ember.strategies.checkpoint_io import encode_tree


def test_a_sparse_tensor_is_refused_by_its_path() -> None:
    with pytest.raises(TypeError, match=r"sparse_coo tensor at '\.state\.a'.*to_dense\(\)"):
        encode_tree({"state": {"a": torch.eye(2).to_sparse()}})
