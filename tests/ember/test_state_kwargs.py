"""``save_state``/``load_state`` with 🤗 Accelerate's keyword arguments: ``strict=False``, ``map_location``,
``load_kwargs``; a clear error for those ember cannot honour."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from ember import Accelerator, CheckpointError


class _Net(nn.Module):
    def __init__(self, head: str, width: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        setattr(self, head, nn.Linear(3, width))


def _save(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = accelerator.prepare(_Net("old"))
    return accelerator.save_state(tmp_path / "ckpt"), {k: v.clone() for k, v in model.state_dict().items()}


def test_load_state_strict_false_loads_the_tensors_both_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, saved = _save(tmp_path)
    accelerator = Accelerator()
    torch.manual_seed(1)
    model = accelerator.prepare(_Net("new"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing tensors \['new.bias', 'new.weight'\]"):
        accelerator.load_state(ckpt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded

    for name in ("loads", "load", "Unpickler"):  # still pickle-free
        monkeypatch.setattr(pickle, name, None)
    monkeypatch.setattr(torch, "load", None)
    with pytest.warns(UserWarning) as warned:
        assert accelerator.load_state(ckpt, strict=False, map_location="on_device") == {}
    messages = " ".join(str(w.message) for w in warned)
    assert "['new.bias', 'new.weight']" in messages and "['old.bias', 'old.weight']" in messages
    state = model.state_dict()
    assert torch.equal(state["body.weight"], saved["body.weight"])
    assert torch.equal(state["new.weight"], before["new.weight"])  # not in the checkpoint: untouched


def test_load_state_strict_false_still_refuses_other_shapes(tmp_path: Path) -> None:
    ckpt, _ = _save(tmp_path)
    accelerator = Accelerator()
    model = accelerator.prepare(_Net("old", width=4))
    before = model.body.weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"'old.weight' is \[3, 3\] there, \[4, 3\] here"):
        accelerator.load_state(ckpt, strict=False)
    assert torch.equal(model.body.weight, before)  # checked before anything changed


def test_state_keywords_ember_cannot_honour_are_named(tmp_path: Path) -> None:
    ckpt, _ = _save(tmp_path)
    accelerator = Accelerator()
    accelerator.prepare(_Net("old"))
    with pytest.raises(TypeError, match=r"load_state\(\) got keyword argument 'load_module_only'.*strict"):
        accelerator.load_state(ckpt, load_module_only=True)
    with pytest.raises(ValueError, match=r"map_location='cuda:3'.*None, 'cpu', 'on_device'"):
        accelerator.load_state(ckpt, map_location="cuda:3")
    with pytest.raises(TypeError, match=r"strict=1"):
        accelerator.load_state(ckpt, strict=1)
    with pytest.raises(ValueError, match=r"load_kwargs=\{'mmap': True\}.*'weights_only'"):
        accelerator.load_state(ckpt, load_kwargs={"mmap": True})
    accelerator.load_state(ckpt, {"weights_only": True})  # (positional, as Accelerate's): nothing to unpickle
    with pytest.raises(TypeError, match=r"save_state\(\) got keyword argument 'tag'.*DeepSpeed"):
        accelerator.save_state(tmp_path / "again", tag="step_3")
    assert not (tmp_path / "again").exists()
    assert accelerator.save_state(tmp_path / "again", True) == tmp_path / "again"  # safe_serialization


def test_load_state_strict_false_from_the_sharded_layout(tmp_path: Path) -> None:
    saver = Accelerator(strategy="fsdp")  # one process: FSDP writes the sharded layout all the same
    torch.manual_seed(0)
    sharded = saver.prepare(_Net("old"))
    ckpt = saver.save_state(tmp_path / "ckpt")
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".shards") == ["model.shards"]
    body = sharded.body.weight.full_tensor().detach().clone()  # type: ignore[operator]
    accelerator = Accelerator()
    model = accelerator.prepare(_Net("new"))
    with pytest.warns(
        UserWarning, match=r"lacks these tensors of the model, left as they were: \['new.bias'"
    ):
        accelerator.load_state(ckpt, strict=False)
    assert torch.equal(model.body.weight, body)
