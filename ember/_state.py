"""The Accelerator's methods for models and their state: unwrapping, weights, ``save_state`` /
``load_state``, registered objects, forgetting them (defined here, mixed into
:class:`~ember.Accelerator`)."""

from __future__ import annotations

import gc
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ember import _checkpoint, _hooks, _weights
from ember._plugin_args import recompiled, uncompiled
from ember._validation import check_bool
from ember._wrappers import GradientState, unpatch_forward
from ember.project import ProjectConfiguration
from ember.strategies import Strategy

__all__ = ["StateMixin"]


class StateMixin:
    """Models and state; mixed into :class:`~ember.Accelerator`."""

    _strategy: Strategy
    _objects: _checkpoint.PreparedObjects
    _gradient_state: GradientState
    _several_nodes: bool
    project_configuration: ProjectConfiguration

    def unwrap_model(
        self, model: nn.Module, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True
    ) -> nn.Module:
        """The user's module inside the strategy wrapper (DDP ...). A model ``prepare`` compiled
        (``dynamo_backend``) comes back compiled around that module, as in 🤗 Accelerate; with
        ``keep_torch_compile=False``, plain. The prepared model itself is left unchanged. A model you
        compiled before ``prepare`` comes back compiled too; ``keep_torch_compile=False`` removes that
        wrapper only where nothing wraps it (one device), as 🤗 Accelerate does."""
        check_bool("keep_torch_compile", keep_torch_compile, owner="unwrap_model")
        plain = uncompiled(model)
        inner = self._strategy.unwrap_module(plain)
        if not keep_fp32_wrapper:
            unpatch_forward(inner)
        if keep_torch_compile and plain is not model:
            return model if inner is plain else recompiled(model, inner)
        return inner

    def refresh_trainable(self, model: nn.Module) -> nn.Module:
        """Call after changing which parameters of the prepared ``model`` require grad (a backbone
        unfrozen); use the returned model from then on. DDP builds a new wrapper around the same
        module, which synchronises the new set (no ``find_unused_parameters`` needed); a single
        device returns ``model``; FSDP and DeepSpeed raise ``RuntimeError``. Checkpoints hold the new one.
        A compiled model (``dynamo_backend``) comes back compiled again, with the same options.

        Example::

            model = accelerator.refresh_trainable(model)  # after requires_grad_(True) on the backbone
        """
        plain = uncompiled(model)
        refreshed = self._strategy.refresh_trainable(plain)
        models = self._objects.models
        for i, prepared in enumerate(models):
            if prepared is plain:
                models[i] = refreshed  # same place: checkpoints keep their order
        if plain is model:  # not compiled: the new wrapper itself
            return refreshed
        return model if refreshed is plain else recompiled(model, refreshed)

    def save_model(
        self,
        model: nn.Module,
        save_directory: str | os.PathLike[str],
        max_shard_size: int | str = "10GB",
        safe_serialization: bool = True,
    ) -> None:
        """Write the model's weights as safetensors (sharded, with an index JSON, above ``max_shard_size``);
        ``safe_serialization=False`` (a pickled ``pytorch_model.bin``) is refused."""
        _check_safe("save_model", safe_serialization)
        _weights.save_model(
            self._strategy, self._without_prepare_compile(model), save_directory, max_shard_size
        )

    def get_state_dict(self, model: nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
        """The model's whole state dict, keyed by your module's names (``unwrap=False``: the wrapper's
        own, e.g. ``module.``-prefixed under DDP). Under FSDP and DeepSpeed ZeRO-3 the shards are
        gathered, a collective that every process must call; the full tensors are on the main process."""
        if not unwrap:
            return model.state_dict()
        return self._strategy.module_state_dict(self._without_prepare_compile(model), full=True)

    def _without_prepare_compile(self, model: nn.Module) -> nn.Module:
        """``model`` without the compile wrapper ``prepare`` put around it (``dynamo_backend``). A model
        compiled before ``prepare`` keeps its wrapper: that is the user's module, and its names keep the
        ``_orig_mod.`` prefix, as in 🤗 Accelerate (where a DDP-wrapped one keeps it too)."""
        plain = uncompiled(model)
        return plain if any(plain is prepared for prepared in self._objects.models) else model

    def register_for_checkpointing(self, *objects: Any) -> None:
        """Add objects with ``state_dict()``/``load_state_dict()`` to :meth:`save_state`/:meth:`load_state`."""
        for obj in objects:
            if not (
                callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
            ):
                raise TypeError(
                    f"register_for_checkpointing() needs objects with state_dict() and load_state_dict(); "
                    f"{type(obj).__name__} has not both"
                )
            self._objects.custom.append(obj)

    @cached_property
    def _state_hooks(self) -> _hooks.StateHooks:
        return _hooks.StateHooks()  # made on first use: the Accelerator's constructor does not know it

    def register_save_state_pre_hook(self, hook: _hooks.SaveStateHook) -> RemovableHandle:
        """Call ``hook(models, weights, output_dir)`` in :meth:`save_state` before anything is written
        (🤗 Accelerate's method); ``handle.remove()`` unregisters it.

        ``models`` lists the prepared models and ``weights`` their state dicts, keyed by the names in
        your modules (each rank's shards under FSDP's sharded layout). The hook may change the state
        dicts in place, or pop entries: those models are not saved, and the others are saved as model
        0, 1, ... in order. ``output_dir`` is the directory being written (it becomes the checkpoint
        when complete): files the hook writes there are part of the checkpoint. Under DeepSpeed, whose
        engine writes the models, :meth:`save_state` raises ``RuntimeError`` (unless ``weights_only``).

        Example::

            def save_unet(models, weights, output_dir):
                if accelerator.is_main_process:
                    accelerator.unwrap_model(models[0]).save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop(0)  # saved above: leave it out of the checkpoint's models
        """
        return _hooks.register(self._state_hooks.save, hook, "register_save_state_pre_hook")

    def register_load_state_pre_hook(self, hook: _hooks.LoadStateHook) -> RemovableHandle:
        """Call ``hook(models, input_dir)`` in :meth:`load_state` before any model is loaded
        (🤗 Accelerate's method); ``handle.remove()`` unregisters it.

        The hook may pop models from the list (a copy): they are not loaded, and the remaining
        models take the checkpoint's models in order. It runs after the checkpoint was verified.
        Under DeepSpeed, whose engine loads the models, :meth:`load_state` raises ``RuntimeError``.

        Example::

            def load_unet(models, input_dir):
                unet = models.pop(0)  # the save hook left it out of the checkpoint's models
                accelerator.unwrap_model(unet).load_state_dict(read_unet(os.path.join(input_dir, "unet")))
        """
        return _hooks.register(self._state_hooks.load, hook, "register_load_state_pre_hook")

    def save_state(
        self,
        output_dir: str | os.PathLike[str] | None = None,
        safe_serialization: bool = True,
        *,
        extra: dict[str, Any] | None = None,
        rank_extra: dict[str, Any] | None = None,
        weights_only: bool = False,
        **save_model_func_kwargs: Any,
    ) -> Path:
        """Save everything prepared (and registered) to ``output_dir``, pickle-free; returns the path.

        ``extra`` maps names to further state (dicts of numbers, strings, tensors ...), written by the
        main process as ``<name>.json`` (+ ``.safetensors``); ``rank_extra`` is state that differs per
        process, written by each as ``<name>_rank<R>``. :meth:`load_state` returns both (this
        process's ``rank_extra``). ``weights_only``: the models' weights (and ``extra``) alone, in a
        portable layout; such a checkpoint loads weights but cannot resume (:meth:`load_state` refuses it).

        Without ``output_dir``: the next automatically named checkpoint,
        ``<project_dir>/checkpoints/checkpoint_<iteration>`` (:class:`~ember.ProjectConfiguration`
        with ``automatic_checkpoint_naming=True``); ``total_limit`` then deletes the oldest.
        ``safe_serialization`` is 🤗 Accelerate's: ember's checkpoints are always pickle-free, and
        ``False`` (pickles) is refused. So are Accelerate's ``save_model_func_kwargs`` (options of
        DeepSpeed's ``save_checkpoint``; ember names and writes the engine's checkpoint itself).
        """
        _check_safe("save_state", safe_serialization)
        if save_model_func_kwargs:
            raise TypeError(
                f"save_state() got keyword argument{_plural(save_model_func_kwargs)}: 🤗 Accelerate passes these to "
                "DeepSpeed's save_checkpoint (and ignores them under other strategies); ember writes the engine's "
                "checkpoint itself and cannot honour them. save_state takes output_dir, safe_serialization, extra, "
                "rank_extra and weights_only"
            )
        config = self.project_configuration
        if config.save_on_each_node and self._several_nodes:
            raise ValueError(
                "save_state() with ProjectConfiguration(save_on_each_node=True) on several nodes: save_state "
                "writes one directory that every process adds its files to, on a filesystem the nodes share. "
                "save_on_each_node applies to accelerator.save(); set it to False for save_state"
            )
        automatic = output_dir is None
        if automatic:
            if not config.automatic_checkpoint_naming:
                raise ValueError(
                    "save_state() needs output_dir, unless the Accelerator has project_config="
                    "ProjectConfiguration(project_dir=..., automatic_checkpoint_naming=True)"
                )
            output_dir = config.next_checkpoint()
        assert output_dir is not None
        gradients = self._gradient_state
        if not weights_only and gradients.accumulation_steps > 1 and not gradients.sync_gradients:
            warnings.warn(
                "save_state() in the middle of a gradient accumulation window: the gradients its micro-steps "
                "accumulated are not saved, so a run resumed from this checkpoint takes its next optimizer step "
                "on the batches after the resume alone. For an exact resume, save after an optimizer step "
                "(when accelerator.sync_gradients is True)",
                stacklevel=2,
            )
        path = _checkpoint.save_state(
            self._strategy,
            self._objects,
            output_dir,
            extra or {},
            rank_extra or {},
            weights_only,
            self._state_hooks,
            self._gradient_state,
        )
        if automatic:
            config.iteration += 1
            if self._strategy.is_global_zero:  # after the new one is complete on disk
                config.prune()
            self._strategy.barrier("save_state:pruned")
        return path

    def load_state(
        self,
        input_dir: str | os.PathLike[str] | None = None,
        load_kwargs: dict[str, Any] | None = None,
        **load_model_func_kwargs: Any,
    ) -> dict[str, Any]:
        """Restore what :meth:`save_state` wrote; training then continues exactly where it stopped.

        Returns the ``extra`` state that was saved with it (an empty dict if none). Without
        ``input_dir``: the highest-numbered automatically named checkpoint (and the next
        :meth:`save_state` numbers its checkpoint past it).

        🤗 Accelerate's keywords: ``strict=False`` loads the models' tensors that the checkpoint and
        the model both have (shapes must agree) and warns about the others, as torch's
        ``load_state_dict(strict=False)``; optimizers must still match. ``map_location`` (``None``,
        ``"cpu"``, ``"on_device"``) is accepted: tensors load straight into the prepared objects.
        ``load_kwargs`` (``torch.load``'s options) may only hold ``weights_only``: nothing is unpickled.
        Any other keyword raises ``TypeError`` naming it.

        Example::

            accelerator.load_state("ckpt", strict=False)  # the model gained a new head since
        """
        strict = _load_options(load_kwargs, load_model_func_kwargs)
        if input_dir is None:
            if not self.project_configuration.automatic_checkpoint_naming:
                raise ValueError(
                    "load_state() needs input_dir, unless the Accelerator has project_config="
                    "ProjectConfiguration(project_dir=..., automatic_checkpoint_naming=True)"
                )
            input_dir = self.project_configuration.latest_checkpoint()
        return _checkpoint.load_state(
            self._strategy, self._objects, input_dir, self._state_hooks, strict, self._gradient_state
        )

    def save(self, obj: Any, f: str | os.PathLike[str], safe_serialization: bool = False) -> None:
        """Write ``obj`` to ``f`` from the main process only: 🤗 Accelerate's replacement for
        ``torch.save`` (from the first process of every node with
        ``ProjectConfiguration(save_on_each_node=True)``). ``safe_serialization=True`` writes a dict of tensors as safetensors, which
        loads without unpickling; otherwise ``torch.save`` (a pickle)."""
        check_bool("safe_serialization", safe_serialization, owner="save")
        if safe_serialization and not (
            isinstance(obj, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
        ):
            raise TypeError(
                f"save(safe_serialization=True) writes a dict of named tensors (a state_dict), not a "
                f"{type(obj).__name__}; save other objects with safe_serialization=False"
            )
        writes = (
            self._strategy.is_local_zero
            if self.project_configuration.save_on_each_node
            else self._strategy.is_global_zero
        )
        if not writes:
            return
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().contiguous().cpu() for k, v in obj.items()}, os.fspath(f), {"format": "pt"}
            )
        else:
            torch.save(obj, f)

    def free_memory(self, *objects: Any) -> list[None]:
        """Forget every prepared object (they are no longer saved by :meth:`save_state`; the objects
        given to :meth:`register_for_checkpointing` still are), reset :attr:`step`, collect garbage
        and empty the CUDA cache. Returns one ``None`` per object passed, to rebind your names with
        (``model, optimizer = accelerator.free_memory(model, optimizer)``), as in 🤗 Accelerate;
        ``clear`` is the same method."""
        # Registered objects stay, as in Accelerate: a script registers them once, before a retry loop.
        registered = self._objects.custom
        self._forget()
        self._objects.custom = registered
        self._strategy.release()  # (an engine the strategy holds: a new prepare() builds another)
        released: list[None] = [None] * len(objects)
        del objects  # the caller's references are the last ones once it rebinds them
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return released

    clear = free_memory

    def _swap_dataloaders(self, old: list[Any], new: list[Any]) -> None:
        """Put the prepared loaders ``new`` (just prepared, so last in the list) in the places of
        ``old``: checkpoints keep their order (the Trainer's reloaded dataloaders)."""
        loaders = self._objects.dataloaders
        del loaders[len(loaders) - len(new) :]
        for before, after in zip(old, new, strict=True):
            loaders[loaders.index(before)] = after

    def _forget(self) -> None:
        """Forget every prepared and registered object, and the accumulation count (no collection)."""
        self._objects = _checkpoint.PreparedObjects()
        self._gradient_state.micro_step, self._gradient_state.sync_gradients = 0, True


def _check_safe(method: str, safe_serialization: Any) -> None:
    check_bool("safe_serialization", safe_serialization, owner=method)
    if not safe_serialization:
        raise ValueError(
            f"{method}(safe_serialization=False): ember writes weights only as safetensors (they load without "
            "unpickling, so loading them cannot run code); leave safe_serialization=True"
        )


_MAP_LOCATIONS = (None, "cpu", "on_device")


def _plural(kwargs: dict[str, Any]) -> str:
    names = sorted(kwargs)
    return f" {names[0]!r}" if len(names) == 1 else f"s {names}"


def _load_options(load_kwargs: Any, kwargs: dict[str, Any]) -> bool:
    """``strict`` from 🤗 Accelerate's ``load_state`` keywords; the ones ember cannot honour raise."""
    strict: bool = kwargs.pop("strict", True)
    check_bool("strict", strict, owner="load_state")
    map_location = kwargs.pop("map_location", None)
    if map_location not in _MAP_LOCATIONS:  # Accelerate's choices
        raise ValueError(
            f"load_state(map_location={map_location!r}): valid choices are None, 'cpu', 'on_device'"
        )
    if kwargs:  # Accelerate's others go to DeepSpeed's load_checkpoint, which ember calls itself
        raise TypeError(
            f"load_state() got keyword argument{_plural(kwargs)} that ember cannot honour: it loads the models "
            "itself (an engine's checkpoint too). load_state takes input_dir, load_kwargs, strict and map_location"
        )
    if load_kwargs is not None and not isinstance(load_kwargs, dict):
        raise TypeError(f"load_state(load_kwargs=...) takes a dict or None, got {type(load_kwargs).__name__}")
    if set(load_kwargs or {}) - {"weights_only"}:
        raise ValueError(
            f"load_state(load_kwargs={load_kwargs!r}): these are torch.load's options, and ember's checkpoints "
            "hold no pickles to load; the only key accepted is 'weights_only' (always honoured)"
        )
    return strict
