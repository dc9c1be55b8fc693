"""``TrainModule``'s Lightning utilities (a mixin): optimizer toggling for manual optimization with
several optimizers, ``freeze``/``unfreeze``, ``example_input_array``, Lightning's ``device_mesh`` and
``fabric`` (None in ember), and the TorchScript / ONNX / TensorRT exports."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

if TYPE_CHECKING:
    from io import BytesIO

    from torch.distributed.device_mesh import DeviceMesh

    from ember.trainer.trainer import Trainer

__all__ = ["ModuleTools"]

_T = TypeVar("_T", bound="ModuleTools")


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block; then each submodule back in its own mode (a frozen
    submodule left in eval stays in eval, which ``module.train(mode)`` would undo)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def call_forward(module: torch.nn.Module, example: Any) -> Any:
    """``module`` called as Lightning reads ``example_input_array``: a tuple or list are the positional
    arguments, a dict the keyword arguments, anything else the single argument."""
    if isinstance(example, tuple | list):
        return module(*example)
    if isinstance(example, dict):
        return module(**example)
    return module(example)


class ModuleTools:
    """``toggle_optimizer``/``untoggle_optimizer``/``toggled_optimizer``, ``on_gpu``, ``freeze``/``unfreeze``,
    ``example_input_array``, ``device_mesh``, ``fabric``, ``to_torchscript``, ``to_onnx`` and
    ``to_tensorrt``, as Lightning's ``LightningModule`` has them; :class:`~ember.TrainModule` inherits them."""

    if TYPE_CHECKING:  # what the mixin uses of TrainModule and nn.Module

        @property
        def trainer(self) -> Trainer: ...

        @property
        def device(self) -> torch.device: ...

        def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...
        def train(self: _T, mode: bool = True) -> _T: ...
        def eval(self: _T) -> _T: ...
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any: ...
        def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any: ...
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any: ...

    _example_input_array: Any = None
    _device_mesh: DeviceMesh | None = (
        None  # (Lightning's ModelParallelStrategy sets it; no ember strategy does)
    )
    _jit_is_scripting: ClassVar[bool] = False  # True while to_torchscript compiles (see _scripting)

    # -- several optimizers (manual optimization) -----------------------------------------------------
    def toggle_optimizer(self, optimizer: Any) -> None:
        """Only ``optimizer``'s parameters require grad until :meth:`untoggle_optimizer`: the other
        optimizers' parameters are set to ``requires_grad=False`` (their flags are remembered), so a
        backward pass for one optimizer (a GAN's discriminator) leaves the others' gradients alone.
        ``optimizer``: one of ``self.optimizers()`` (or the optimizer it wraps)."""
        optimizers = self.trainer.optimizers
        inner = self._users_optimizer(optimizer, "toggle_optimizer")
        # Every optimizer's parameters, off (their flags kept, even those set in configure_optimizers),
        # then the toggled optimizer's back to what they were.
        state: dict[torch.Tensor, bool] = {}
        for opt in optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    if param not in state:
                        state[param] = param.requires_grad
                        param.requires_grad = False
        for group in inner.param_groups:
            for param in group["params"]:
                param.requires_grad = state[param]
        self._param_requires_grad_state = state

    def untoggle_optimizer(self, optimizer: Any) -> None:
        """Give the other optimizers' parameters back the ``requires_grad`` flags that
        :meth:`toggle_optimizer` found."""
        inner = self._users_optimizer(optimizer, "untoggle_optimizer")
        state: dict[torch.Tensor, bool] = getattr(self, "_param_requires_grad_state", {})
        for opt in self.trainer.optimizers:
            if opt is inner:
                continue
            for group in opt.param_groups:
                for param in group["params"]:
                    if param in state:
                        param.requires_grad = state[param]
        self._param_requires_grad_state = {}

    def _users_optimizer(self, optimizer: Any, method: str) -> Any:
        """The user's optimizer that ``optimizer`` is, or wraps (``self.optimizers()`` returns the
        prepared wrappers)."""
        trainer = self.trainer
        for wrapper, inner in zip(trainer._step_optimizers, trainer.optimizers, strict=True):
            if optimizer is wrapper or optimizer is inner:
                return inner
        raise ValueError(
            f"{method}(): {type(optimizer).__name__} is not one of this fit's optimizers; pass one of "
            "self.optimizers()"
        )

    @contextmanager
    def toggled_optimizer(self, optimizer: Any) -> Iterator[None]:
        """:meth:`toggle_optimizer` for the ``with`` block, then :meth:`untoggle_optimizer` (also on an
        exception).

        Example::

            g_opt, d_opt = self.optimizers()
            with self.toggled_optimizer(d_opt):
                d_loss = ...
                d_opt.zero_grad()
                self.manual_backward(d_loss)
                d_opt.step()
        """
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    @property
    def on_gpu(self) -> bool:
        """Whether the module is on a CUDA device (:attr:`device`), as Lightning's."""
        return self.device.type == "cuda"

    # -- inference ----------------------------------------------------------------------------------
    def freeze(self: _T) -> _T:
        """Every parameter ``requires_grad=False``, and eval mode; returns the module."""
        for param in self.parameters():
            param.requires_grad = False
        return self.eval()

    def unfreeze(self: _T) -> _T:
        """Every parameter ``requires_grad=True``, and training mode; returns the module."""
        for param in self.parameters():
            param.requires_grad = True
        return self.train()

    @property
    def example_input_array(self) -> Any:
        """What ``forward`` takes, for the model summary's layer sizes and the exports: a tensor
        (``forward(x)``), a tuple (``forward(*x)``) or a dict (``forward(**x)``); ``None`` by default."""
        return self._example_input_array

    @example_input_array.setter
    def example_input_array(self, example: Any) -> None:
        self._example_input_array = example

    @property
    def device_mesh(self) -> DeviceMesh | None:
        """The device mesh of a model-parallel strategy, for :meth:`configure_model` to parallelize the
        layers over (read-only). None under every ember strategy: as with Lightning's ``FSDPStrategy``,
        FSDP's ``device_mesh`` option stays the strategy's (only Lightning's ``ModelParallelStrategy``
        sets this)."""
        return self._device_mesh

    @property
    def fabric(self) -> None:
        """Lightning's ``Fabric`` that set this module up: always None, as ember has no Fabric (a
        hand-written loop prepares the module with :class:`~ember.Accelerator`). Assigning None is
        accepted, as in Lightning; anything else raises ``TypeError``."""
        return None

    @fabric.setter
    def fabric(self, fabric: Any) -> None:
        if fabric is not None:
            raise TypeError(
                f"{type(self).__name__}.fabric={fabric!r}: ember has no Fabric, so fabric stays None; for a "
                "hand-written loop, prepare the module with ember.Accelerator"
            )

    def _example_on_device(self, example: Any, what: str) -> Any:
        """``example`` (or ``example_input_array``) through the batch-transfer hooks, onto the module's device."""
        if example is None:
            example = self.example_input_array
        if example is None:
            raise ValueError(f"{what} needs an example input: pass one, or set self.example_input_array")
        example = self.on_before_batch_transfer(example, 0)
        example = self.transfer_batch_to_device(example, self.device, 0)
        return self.on_after_batch_transfer(example, 0)

    # -- export -------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_torchscript(
        self,
        file_path: str | os.PathLike[str] | None = None,
        method: str = "script",
        example_inputs: Any = None,
        **kwargs: Any,
    ) -> torch.jit.ScriptModule:
        """The module compiled by ``torch.jit.script`` (``method="script"``) or ``torch.jit.trace``
        (``"trace"``, with ``example_inputs`` or else :attr:`example_input_array`), in eval mode;
        saved with ``torch.jit.save`` when ``file_path`` is given. ``kwargs`` go to script/trace.
        The module's own mode is restored afterwards.

        Example::

            scripted = module.to_torchscript("model.pt")
            torch.jit.load("model.pt")(x)
        """
        if method not in ("script", "trace"):
            raise ValueError(f"to_torchscript(method={method!r}): valid choices are 'script', 'trace'")
        module: Any = self
        if method == "script":
            with eval_mode(module), _scripting():
                exported = torch.jit.script(module, **kwargs)
        else:
            example = self._example_on_device(example_inputs, "to_torchscript(method='trace')")
            if isinstance(example, dict):
                kwargs["example_kwarg_inputs"] = example
                example = None
            elif isinstance(example, list):
                example = tuple(example)
            with eval_mode(module), _scripting():
                exported = torch.jit.trace(module, example, **kwargs)
        if file_path is not None:
            torch.jit.save(exported, os.fspath(file_path))
        return exported  # type: ignore[no-any-return]

    @torch.no_grad()
    def to_onnx(
        self,
        file_path: str | os.PathLike[str] | BytesIO | None = None,
        input_sample: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Export to ONNX with ``torch.onnx.export`` (``kwargs`` go to it), traced with ``input_sample``
        or else :attr:`example_input_array`, in eval mode (restored afterwards). Writes ``file_path``
        (a path or a binary file object) when given; returns what ``torch.onnx.export`` returns (an ``ONNXProgram`` from the default
        exporter, ``None`` with ``dynamo=False``). Needs ``pip install 'ember[onnx]'`` (onnx, and
        onnxscript for the default exporter).

        Example::

            module.to_onnx("model.onnx", torch.randn(1, 64))
        """
        missing = [name for name in ("onnx", "onnxscript") if not _installed(name)]
        if not kwargs.get("dynamo", True):
            missing = [name for name in missing if name != "onnxscript"]  # (the TorchScript exporter)
        if missing:
            raise ModuleNotFoundError(
                f"to_onnx() needs {' and '.join(missing)}: pip install 'ember[onnx]' "
                f"(or pip install {' '.join(missing)})"
            )
        example = self._example_on_device(input_sample, "to_onnx()")
        if isinstance(example, dict):
            args: tuple[Any, ...] = ()
            kwargs["kwargs"] = example
        else:
            args = tuple(example) if isinstance(example, tuple | list) else (example,)
        if isinstance(file_path, os.PathLike):
            file_path = os.fspath(file_path)
        module: Any = self
        with eval_mode(module):
            # (torch declares str | PathLike; a BytesIO works too, as Lightning notes)
            return torch.onnx.export(module, args, file_path, **kwargs)  # type: ignore[arg-type]

    @torch.no_grad()
    def to_tensorrt(
        self,
        file_path: str | os.PathLike[str] | BytesIO | None = None,
        input_sample: Any = None,
        ir: str = "default",
        output_format: str = "exported_program",
        retrace: bool = False,
        default_device: str | torch.device = "cuda",
        **compile_kwargs: Any,
    ) -> Any:
        """Compile with ``torch_tensorrt.compile(module, ir=ir, inputs=...)`` (``compile_kwargs`` go to
        it), with ``input_sample`` or else :attr:`example_input_array`, in eval mode, on a CUDA device
        (``default_device`` when the module is elsewhere; it goes back afterwards, as does its mode).
        Saves with ``torch_tensorrt.save`` (``torch.jit.save`` for ``ir="ts"``, whose ``output_format``
        must then be ``"torchscript"``) when ``file_path`` is given; returns the compiled module. As
        Lightning's: needs ``pip install torch-tensorrt`` (else ``ModuleNotFoundError``) and CUDA.

        Example::

            module.to_tensorrt("model.ep", torch.randn(1, 64))
        """
        if not _installed("torch_tensorrt"):
            raise ModuleNotFoundError(
                f"`{type(self).__name__}.to_tensorrt` requires `torch_tensorrt` to be installed: "
                "pip install torch-tensorrt"
            )
        device = self.device
        target = device if device.type == "cuda" else torch.device(default_device)
        if target.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"to_tensorrt(default_device={str(default_device)!r}): TensorRT runs on CUDA devices only and the "
                f"module is on {device}{'' if torch.cuda.is_available() else ' (no CUDA device here)'}: "
                "give a CUDA device"
            )
        if file_path is not None and ir == "ts" and output_format != "torchscript":
            raise ValueError(
                f"to_tensorrt(ir='ts', output_format={output_format!r}): TensorRT's TorchScript IR "
                "saves as 'torchscript' only"
            )
        import torch_tensorrt

        module: Any = self
        module.to(target)
        try:
            example = copy.deepcopy(input_sample if input_sample is not None else self.example_input_array)
            example = self._example_on_device(example, "to_tensorrt()")
            inputs = (example,) if isinstance(example, torch.Tensor) else example
            with eval_mode(module), _scripting() if ir == "ts" else contextlib.nullcontext():
                compiled = torch_tensorrt.compile(module=module, ir=ir, inputs=inputs, **compile_kwargs)
        finally:
            module.to(device)
        if file_path is not None:
            if ir == "ts":
                # (torch_tensorrt.save mishandles a ScriptModule: TensorRT issue #3775, as Lightning notes)
                torch.jit.save(compiled, file_path)
            else:
                torch_tensorrt.save(
                    compiled, file_path, inputs=inputs, output_format=output_format, retrace=retrace
                )
        return compiled


def numbers_to_tensors(data: Any, device: torch.device) -> Any:
    """``data`` with each bool, int, float and NumPy array (in lists, tuples and dicts too) made a tensor
    on ``device``, as Lightning's ``all_gather`` converts them (uint8, int32, float32)."""
    if isinstance(data, bool | int | float):
        dtype = (
            torch.uint8 if isinstance(data, bool) else torch.int32 if isinstance(data, int) else torch.float32
        )
        return torch.tensor(data, dtype=dtype, device=device)
    if type(data).__module__ == "numpy" and type(data).__name__ == "ndarray":
        return torch.from_numpy(data).to(device)
    if isinstance(data, dict):
        items = {key: numbers_to_tensors(value, device) for key, value in data.items()}
        try:
            return type(data)(items)
        except TypeError:  # dicts whose constructor takes something else (defaultdict)
            return items
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(numbers_to_tensors(value, device) for value in data))
    if isinstance(data, list | tuple):
        return type(data)(numbers_to_tensors(value, device) for value in data)
    return data


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@contextmanager
def _scripting() -> Iterator[None]:
    """TorchScript reads every attribute of the module, and of the TrainModules inside it, while
    compiling it: ``trainer`` must not raise on one without a Trainer (Lightning's ``_jit_is_scripting``)."""
    ModuleTools._jit_is_scripting = True
    try:
        yield
    finally:
        ModuleTools._jit_is_scripting = False
