"""TrainModule's Lightning utilities: optimizer toggling (a GAN's manual loop), freeze/unfreeze,
example_input_array, and the TorchScript / ONNX exports checked by running what they wrote."""

from __future__ import annotations

import importlib.machinery
import io
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Trainer, TrainModule


def _trainer(tmp_path: Path, **kwargs: Any) -> Trainer:
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    return Trainer(default_root_dir=str(tmp_path), enable_checkpointing=False, **{**quiet, **kwargs})


def _flags(module: nn.Module) -> list[bool]:
    return [p.requires_grad for p in module.parameters()]


# -- toggle_optimizer / untoggle_optimizer / toggled_optimizer ------------------------------------------
class GAN(TrainModule):
    """Both losses reach both networks (the fake images are not detached): only the toggling keeps the
    generator's gradients out of the discriminator's step and the other way round."""

    automatic_optimization = False

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
        self.discriminator = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        self.discriminator[0].bias.requires_grad_(False)  # frozen before the fit: must stay frozen
        self.seen: list[dict[str, Any]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()
        z, real = batch
        seen: dict[str, Any] = {}
        with self.toggled_optimizer(d_opt):
            seen["in_d"] = (_flags(self.generator), _flags(self.discriminator))
            fake = self.generator(z)
            ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
            d_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
            d_loss = d_loss + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)
            g_opt.zero_grad()
            d_opt.zero_grad()
            self.manual_backward(d_loss)
            seen["g_grads_after_d"] = [p.grad for p in self.generator.parameters()]
            d_opt.step()
        seen["after_d"] = (_flags(self.generator), _flags(self.discriminator))
        self.toggle_optimizer(g_opt)
        seen["in_g"] = (_flags(self.generator), _flags(self.discriminator))
        g_loss = F.binary_cross_entropy_with_logits(
            self.discriminator(self.generator(z)), torch.ones(len(z), 1)
        )
        d_opt.zero_grad()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        seen["d_grads_after_g"] = [p.grad for p in self.discriminator.parameters()]
        seen["g_grads_after_g"] = [p.grad for p in self.generator.parameters()]
        g_opt.step()
        self.untoggle_optimizer(g_opt)
        seen["after_g"] = (_flags(self.generator), _flags(self.discriminator))
        self.seen.append(seen)

    def configure_optimizers(self) -> Any:
        g = torch.optim.SGD(self.generator.parameters(), lr=0.1)
        d = torch.optim.SGD(self.discriminator.parameters(), lr=0.1)  # the frozen bias included
        return [g, d]


def _gan_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(8, 2, generator=g), torch.randn(8, 3, generator=g)), batch_size=4
    )


def test_toggling_keeps_each_optimizers_gradients_to_itself_and_restores_the_flags(tmp_path: Path) -> None:
    module = GAN()
    generator_before = [p.detach().clone() for p in module.generator.parameters()]
    _trainer(tmp_path, max_epochs=1).fit(module, _gan_loader())
    assert len(module.seen) == 2
    g_all, d_frozen = [True] * 4, [True, False, True, True]
    for seen in module.seen:
        assert seen["in_d"] == ([False] * 4, d_frozen)  # the generator is off, the frozen bias stays off
        assert seen["g_grads_after_d"] == [None] * 4  # so the discriminator's loss left it alone
        assert seen["after_d"] == (g_all, d_frozen)  # everything as it was
        assert seen["in_g"] == (g_all, [False] * 4)
        assert seen["d_grads_after_g"] == [None] * 4
        assert all(g is not None for g in seen["g_grads_after_g"])
        assert seen["after_g"] == (g_all, d_frozen)  # the frozen bias is frozen again, not unfrozen
    assert not all(
        torch.equal(a, b) for a, b in zip(generator_before, module.generator.parameters(), strict=True)
    )


def test_toggling_takes_the_wrapped_optimizer_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    module = GAN()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, _gan_loader())
    g_opt, d_opt = trainer.optimizers  # the user's optimizers, not the prepared wrappers
    module.toggle_optimizer(g_opt)
    assert _flags(module.generator) == [True] * 4 and _flags(module.discriminator) == [False] * 4
    module.untoggle_optimizer(g_opt)
    assert _flags(module.discriminator) == [True, False, True, True]
    with pytest.raises(RuntimeError, match="boom"), module.toggled_optimizer(d_opt):
        assert _flags(module.generator) == [False] * 4
        raise RuntimeError("boom")
    assert _flags(module.generator) == [True] * 4  # restored on the way out of the exception
    foreign = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not one of this fit's optimizers"):
        module.toggle_optimizer(foreign)
    with pytest.raises(RuntimeError, match="not attached to a Trainer"):
        GAN().toggle_optimizer(foreign)


# -- freeze / unfreeze / example_input_array -----------------------------------------------------------
class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.layer(x)))


def test_freeze_and_unfreeze() -> None:
    module = Net()
    assert module.freeze() is module
    assert _flags(module) == [False, False] and not module.training and not module.layer.training
    assert module.unfreeze() is module
    assert _flags(module) == [True, True] and module.training and module.drop.training


def test_example_input_array_is_a_settable_property_outside_the_state_dict() -> None:
    module = Net()
    assert module.example_input_array is None
    module.example_input_array = torch.ones(2, 3)
    assert torch.equal(module.example_input_array, torch.ones(2, 3))
    assert set(module.state_dict()) == {"layer.weight", "layer.bias"}
    assert Net().example_input_array is None  # per instance


# -- to_torchscript ------------------------------------------------------------------------------------------
def test_to_torchscript_script_and_trace_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Net()
    x = torch.randn(5, 3)
    expected = module.eval()(x)
    module.train()
    module.layer.eval()  # a submodule in eval mode stays so (module.train() would undo it)
    scripted = module.to_torchscript(tmp_path / "scripted.pt")
    assert isinstance(scripted, torch.jit.ScriptModule) and not scripted.training
    assert module.training and module.drop.training and not module.layer.training  # the modes are back
    loaded = torch.jit.load(str(tmp_path / "scripted.pt"))
    assert torch.equal(scripted(x), expected) and torch.equal(loaded(x), expected)

    with pytest.raises(ValueError, match="example input"):
        module.to_torchscript(method="trace")
    module.example_input_array = torch.randn(2, 3)
    traced = module.to_torchscript(tmp_path / "traced.pt", method="trace")
    assert torch.equal(traced(x), expected) and module.training
    assert torch.equal(torch.jit.load(str(tmp_path / "traced.pt"))(x), expected)
    explicit = module.to_torchscript(method="trace", example_inputs=(torch.randn(1, 3),))
    assert torch.equal(explicit(x), expected)
    with pytest.raises(ValueError, match="valid choices are 'script', 'trace'"):
        module.to_torchscript(method="compile")


class TwoInputs(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(*batch).sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_to_torchscript_after_a_fit_and_with_keyword_examples(tmp_path: Path) -> None:
    module = TwoInputs()
    data = TensorDataset(torch.randn(4, 3), torch.randn(4, 4))
    _trainer(tmp_path, max_steps=1).fit(module, DataLoader(data, batch_size=2))
    x, y = torch.randn(2, 3), torch.randn(2, 4)
    scripted = module.to_torchscript()  # attached to a Trainer: its attributes are left out
    assert torch.equal(scripted(x, y), module(x, y))
    module.example_input_array = {"x": x, "y": y}
    traced = module.to_torchscript(method="trace")
    assert torch.equal(traced(x=x, y=y), module(x, y))


# -- to_onnx -------------------------------------------------------------------------------------------------
def _run_onnx(path: Path | io.BytesIO, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """The ONNX file run by onnx's own reference evaluator (onnxruntime is not a dependency)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(io.BytesIO(path.getvalue()) if isinstance(path, io.BytesIO) else str(path))
    onnx.checker.check_model(model)
    names = [i.name for i in model.graph.input]
    return list(
        ReferenceEvaluator(model).run(None, dict(zip(names, [t.numpy() for t in inputs], strict=True)))
    )


@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export", "torchscript-exporter"])
def test_to_onnx_writes_a_file_that_computes_the_same(tmp_path: Path, dynamo: bool) -> None:
    torch.manual_seed(0)
    module = Net()
    x = torch.randn(2, 3)
    expected = module.eval()(x).detach().numpy()
    module.train()
    path = tmp_path / "model.onnx"
    result = module.to_onnx(path, x, dynamo=dynamo)
    assert isinstance(result, torch.onnx.ONNXProgram) if dynamo else result is None  # torch's answer
    assert path.stat().st_size > 0 and module.training  # exported in eval mode, its mode restored
    (out,) = _run_onnx(path, [x])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    two = TwoInputs()
    two.example_input_array = (torch.randn(2, 3), torch.randn(2, 4))  # the positional arguments
    buffer = io.BytesIO()  # a file object works too
    two.to_onnx(buffer, dynamo=dynamo)
    (out,) = _run_onnx(buffer, list(two.example_input_array))
    np.testing.assert_allclose(out, two(*two.example_input_array).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_to_onnx_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = Net()
    with pytest.raises(ValueError, match="example input"):
        module.to_onnx("never.onnx", dynamo=False)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # importing it fails, as when it is missing
    with pytest.raises(ModuleNotFoundError, match=r"needs onnxscript: pip install 'ember\[onnx\]'"):
        module.to_onnx("never.onnx", torch.randn(1, 3))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs onnx: pip install 'ember\[onnx\]'"):
        module.to_onnx("never.onnx", torch.randn(1, 3), dynamo=False)  # the older exporter needs onnx only
    assert list(tmp_path.iterdir()) == []


# -- Lightning's device_mesh, fabric and to_tensorrt ----------------------------------------------------------
class Seen(Net):
    def on_train_start(self) -> None:
        self.seen = (self.device_mesh, self.fabric)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_device_mesh_and_fabric_are_none_as_in_lightning(tmp_path: Path) -> None:
    # Lightning: None unless its ModelParallelStrategy sets the mesh (its FSDPStrategy does not), and
    # None unless Fabric.setup set it; device_mesh is read-only, fabric=None may be assigned.
    module = Seen()
    assert module.device_mesh is None and module.fabric is None
    _trainer(tmp_path, max_steps=1).fit(module, DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2))
    assert module.seen == (None, None)
    with pytest.raises(AttributeError):
        module.device_mesh = object()  # type: ignore[misc]
    module.fabric = None
    with pytest.raises(TypeError, match=r"Seen\.fabric=<object .*>: ember has no Fabric.*Accelerator"):
        module.fabric = object()
    assert module.fabric is None
    module.to_torchscript()  # (TorchScript skips both properties)


def test_to_tensorrt_without_torch_tensorrt_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # importing it fails, as when it is missing
    module = Net()
    with pytest.raises(
        ModuleNotFoundError, match=r"`Net\.to_tensorrt` requires `torch_tensorrt` to be installed"
    ):
        module.to_tensorrt(input_sample=torch.randn(1, 3))
    assert module.training and module.device == torch.device("cpu")
    if not torch.cuda.is_available():  # installed, it still needs CUDA (Lightning: the same message)
        stand_in = types.ModuleType("torch_tensorrt")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("torch_tensorrt", None)
        monkeypatch.setitem(sys.modules, "torch_tensorrt", stand_in)
        with pytest.raises(
            ValueError, match=r"to_tensorrt\(default_device='cuda'\): TensorRT runs on CUDA devices"
        ):
            module.to_tensorrt(input_sample=torch.randn(1, 3))
