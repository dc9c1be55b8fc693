"""register_save_state_pre_hook / register_load_state_pre_hook (🤗 Accelerate's): what the hooks get,
what save_state writes after them, how load_state matches the models they leave; FSDP on 2 ranks."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_processes
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from ember import Accelerator, CheckpointError
from ember.strategies import SingleDeviceStrategy
from ember.strategies.capabilities import EngineCheckpoints


def _two_models() -> tuple[Accelerator, nn.Module, nn.Module]:
    torch.manual_seed(0)
    accelerator = Accelerator()
    first, second = nn.Linear(2, 2), nn.Linear(3, 3)  # different shapes: a swapped order cannot load
    optimizer = torch.optim.SGD(second.parameters(), lr=0.1)
    first, second, _ = accelerator.prepare(first, second, optimizer)
    return accelerator, first, second


def test_save_hook_edits_and_pops_weights_and_load_hook_pops_models(tmp_path: Path) -> None:
    accelerator, first, second = _two_models()
    seen: dict[str, Any] = {}

    def save_first_myself(
        models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str
    ) -> None:
        seen.update(models=models, keys=[sorted(w) for w in weights], existing=sorted(os.listdir(output_dir)))
        weights[1]["bias"] = torch.full((3,), 7.0)  # changes what is saved, not the model
        state = weights.pop(0)  # the first model is left out of the checkpoint's models ...
        save_file(
            {k: v.contiguous() for k, v in state.items()}, os.path.join(output_dir, "first.safetensors")
        )

    handle = accelerator.register_save_state_pre_hook(save_first_myself)
    assert isinstance(handle, RemovableHandle)
    ckpt = accelerator.save_state(tmp_path / "ckpt")

    assert seen["models"] == [first, second] and seen["keys"] == [["bias", "weight"], ["bias", "weight"]]
    assert seen["existing"] == []  # called before anything was written
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["counts"]["models"] == 1
    assert "first.safetensors" in manifest["files"]  # ... and saved by the hook, inside the checkpoint
    assert not (ckpt / "model_1.safetensors").exists()
    saved = load_file(str(ckpt / "model.safetensors"))  # the second model, as model 0
    assert saved["bias"].tolist() == [7.0] * 3 and torch.equal(saved["weight"], second.weight)
    assert second.bias.tolist() != [7.0] * 3
    expected_first = {k: v.clone() for k, v in first.state_dict().items()}

    loaded_dirs = []

    def load_first_myself(models: list[nn.Module], input_dir: str) -> None:
        loaded_dirs.append(input_dir)
        models.pop(0).load_state_dict(load_file(os.path.join(input_dir, "first.safetensors")))

    accelerator.register_load_state_pre_hook(load_first_myself)
    with torch.no_grad():
        for p in [*first.parameters(), *second.parameters()]:
            p.zero_()
    accelerator.load_state(ckpt)
    assert loaded_dirs == [str(ckpt)]
    assert second.bias.tolist() == [7.0] * 3 and torch.equal(second.weight, saved["weight"])
    for name, value in first.state_dict().items():
        assert torch.equal(value, expected_first[name])


def test_a_save_hook_without_its_load_hook_is_a_clear_error(tmp_path: Path) -> None:
    accelerator, _, _ = _two_models()
    handle = accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.pop(0))
    ckpt = accelerator.save_state(tmp_path / "ckpt")
    with pytest.raises(
        CheckpointError,
        match=r"holds 1 models, but this Accelerator has 2; .*A save_state pre-hook that pops entries of "
        r"`weights` leaves those models out .*pop the same models from `models` in a load_state pre-hook",
    ):
        accelerator.load_state(ckpt)
    load = accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    with pytest.raises(
        CheckpointError, match=r"holds 1 models, and the load_state pre-hooks left 0 of this Accelerator's 2"
    ):
        accelerator.load_state(ckpt)

    handle.remove()
    load.remove()  # no hooks: both models saved and loaded again
    accelerator.load_state(accelerator.save_state(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["counts"]["models"] == 2


def test_hooks_run_in_order_and_bad_results_are_refused(tmp_path: Path) -> None:
    accelerator, _, _ = _two_models()
    order: list[str] = []
    accelerator.register_save_state_pre_hook(lambda m, w, d: order.append("a"))
    accelerator.register_save_state_pre_hook(lambda m, w, d: order.append("b"))
    accelerator.save_state(tmp_path / "ckpt")
    assert order == ["a", "b"]

    def replace(models: list[nn.Module], weights: list[Any], output_dir: str) -> None:
        weights[0] = [1, 2]

    accelerator.register_save_state_pre_hook(replace)
    with pytest.raises(TypeError, match=r"after the save_state pre-hooks, weights\[0\] is a list"):
        accelerator.save_state(tmp_path / "bad")
    accelerator.register_load_state_pre_hook(lambda models, d: models.append(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match=r"models\[2\] \(Linear\) is not one of the prepared models"):
        accelerator.load_state(tmp_path / "ckpt")
    with pytest.raises(TypeError, match=r"register_save_state_pre_hook\(hook\) takes a callable, not int"):
        accelerator.register_save_state_pre_hook(3)  # type: ignore[arg-type]


class _EngineStrategy(SingleDeviceStrategy, EngineCheckpoints):
    """An engine that writes the models its own way (as DeepSpeed's does)."""

    strategy_name = "test_engine"

    @override
    def save_engine_state(self, directory: Path) -> None:
        directory.mkdir()
        (directory / "engine.bin").write_bytes(b"engine")

    @override
    def load_engine_state(self, directory: Path) -> None:
        pass


def test_hooks_under_an_engine_that_saves_the_models_are_refused(tmp_path: Path) -> None:
    accelerator = Accelerator(strategy=_EngineStrategy())
    accelerator.prepare(nn.Linear(2, 2))
    ckpt = accelerator.save_state(tmp_path / "ckpt")
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.pop())
    with pytest.raises(RuntimeError, match=r"strategy 'test_engine' saves its models in its engine's own"):
        accelerator.save_state(tmp_path / "hooked")
    assert not (tmp_path / "hooked").exists() and not (tmp_path / ".hooked.partial").exists()
    weights_only = accelerator.save_state(tmp_path / "weights", weights_only=True)  # ember's full layout
    assert json.loads((weights_only / "manifest.json").read_text())["counts"] == {"models": 0}
    accelerator.register_load_state_pre_hook(lambda models, input_dir: None)
    with pytest.raises(
        RuntimeError, match=r"strategy 'test_engine' restores its models from its engine's own"
    ):
        accelerator.load_state(ckpt)


# -- FSDP: sharded and full layouts on 2 ranks ------------------------------------------------------------
def _fsdp_worker(root: str, kind: str) -> dict[str, Any]:
    from ember.strategies import FSDPConfig, FSDPStrategy

    torch.manual_seed(0)
    accelerator = Accelerator(strategy=FSDPStrategy(FSDPConfig(state_dict_type=kind)))  # type: ignore[arg-type]
    first, second = accelerator.prepare(nn.Linear(4, 6), nn.Linear(6, 2))
    main = accelerator.is_main_process

    def pop_on_main(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        if main:  # as 🤗 diffusers' hooks do
            weights.pop(0)

    handle = accelerator.register_save_state_pre_hook(pop_on_main)
    try:
        accelerator.save_state(f"{root}/main-only")
        outcome = "saved"
    except ValueError as err:
        outcome = str(err)
    handle.remove()
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.pop(0))
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.pop(0))
    expected = accelerator.get_state_dict(second)
    accelerator.save_state(f"{root}/both")
    with torch.no_grad():
        for p in second.parameters():
            p.zero_()
    accelerator.load_state(f"{root}/both")
    restored = accelerator.get_state_dict(second)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with accelerator.join_uneven_inputs([first], even_batches=False):
            pass
        with accelerator.trigger_sync_in_backward(first):
            pass
    accelerator.end_training()
    return {
        "outcome": outcome,
        "restored": main and bool(expected) and all(torch.equal(restored[k], v) for k, v in expected.items()),
        "warnings": [str(w.message).split(":")[0] for w in caught],
    }


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_hooks_under_fsdp(tmp_path: Path, kind: str) -> None:
    ranks = run_processes(_fsdp_worker, str(tmp_path), kind, nprocs=2)
    if kind == "sharded":  # every rank writes its shards of each model: the hooks must agree across ranks
        assert ranks[0]["outcome"] == ranks[1]["outcome"]
        assert (
            "save_state pre-hooks left different numbers of weights on the processes ([1, 2], by rank)"
            in (ranks[0]["outcome"])
        )
    else:  # the main process writes the full weights alone: it may pop alone
        assert ranks[0]["outcome"] == ranks[1]["outcome"] == "saved"
        assert json.loads((tmp_path / "main-only" / "manifest.json").read_text())["counts"]["models"] == 1
    assert json.loads((tmp_path / "both" / "manifest.json").read_text())["counts"]["models"] == 1
    assert ranks[0]["restored"] is True
    assert (
        ranks[0]["warnings"]
        == ranks[1]["warnings"]
        == [
            "join_uneven_inputs() has no effect under strategy 'fsdp'",
            "trigger_sync_in_backward() has no effect under strategy 'fsdp'",
        ]
    )
