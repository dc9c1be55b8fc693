"""Hyper-parameters: ``save_hyperparameters``, ``hparams`` and ``hparams_initial`` (mixed into
``TrainModule`` and ``DataModule``), and the arguments that rebuild a module from a checkpoint."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import types
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["AttributeDict", "HyperparametersMixin", "init_kwargs", "read_hparams_file"]


class AttributeDict(dict[str, Any]):
    """A dict whose keys also read and write as attributes: ``self.hparams.lr`` is
    ``self.hparams["lr"]``, as in Lightning."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"hparams has no {name!r}; it holds {sorted(self)} (save_hyperparameters() stores the "
                "arguments of __init__)"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


class HyperparametersMixin:
    """Lightning's hyper-parameter API: ``save_hyperparameters``, ``hparams``, ``hparams_initial``."""

    #: The ``__init__`` argument the hyper-parameters came from (one dict, Namespace or dataclass) and
    #: its kind ("dict", "namespace" or "dataclass"): ``load_from_checkpoint`` passes them back as it.
    _hparams_name: str | None = None
    _hparams_kind: str = "dict"
    #: Whether the Trainer sends them to its loggers: save_hyperparameters(logger=...) (Lightning's).
    _log_hyperparams: bool = False

    @property
    def hparams(self) -> AttributeDict:
        """What :meth:`save_hyperparameters` stored (empty before); keys read as attributes too."""
        stored: AttributeDict | None = self.__dict__.get("_hparams")
        if stored is None:
            stored = self.__dict__["_hparams"] = AttributeDict()
        return stored

    @property
    def hparams_initial(self) -> AttributeDict:
        """A copy of ``hparams`` as the last :meth:`save_hyperparameters` left them (later changes
        to ``hparams`` do not show)."""
        return AttributeDict(_deep_copy(self.__dict__.get("_hparams_initial", {})))

    def save_hyperparameters(
        self,
        *args: Any,
        ignore: str | Iterable[str] = (),
        frame: types.FrameType | None = None,
        logger: bool = True,
    ) -> None:
        """Store the ``__init__`` arguments in ``self.hparams`` (saved in checkpoints, logged).

        The arguments of every ``__init__`` of this object's class chain that is running (a parent's
        ``__init__`` calling it sees the subclass's arguments too; the subclass's value wins), ``**kwargs``
        included, ``self`` and ``*args`` left out. ``args`` names some of them, ``ignore`` some to leave
        out (and to drop where a parent's call stored them); a single dict,
        ``argparse.Namespace`` or dataclass is stored instead, its items as hyper-parameters (and
        ``load_from_checkpoint`` passes it back as the ``__init__`` argument it came from). ``frame``:
        the frame to start from instead of the caller's. Values that cannot be stored pickle-free
        (modules, functions ...) stay in ``self.hparams`` but are left out of checkpoints and loggers,
        with a warning naming them. ``logger=False``: the Trainer does not send them to its loggers.
        """
        if not isinstance(logger, bool):
            raise TypeError(f"save_hyperparameters(logger={logger!r}): expected True or False")
        skip = {ignore} if isinstance(ignore, str) else set(ignore)
        if frame is None:
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
            del current  # (a frame referring to itself would wait for the garbage collector)
        if frame is None:
            raise RuntimeError("save_hyperparameters() could not inspect its caller")
        per_frame = init_arguments(self, frame)
        init_args = {name: value for found in per_frame for name, value in found.items()}
        if len(args) == 1 and container_kind(args[0]) is not None:
            saved = self._from_container(args[0], per_frame)
        else:
            saved = self._from_names(args, init_args)
        self.hparams.update(saved)
        for key in skip:  # (also what a parent class's save_hyperparameters() stored)
            self.hparams.pop(key, None)
        self.__dict__["_hparams_initial"] = _deep_copy(self.hparams)
        self._log_hyperparams = logger

    def _from_container(self, container: Any, per_frame: list[dict[str, Any]]) -> dict[str, Any]:
        items = container_items(container)
        if not all(isinstance(key, str) for key in items):
            raise TypeError(f"save_hyperparameters(): the keys of a dict must be strings, got {list(items)}")
        self._hparams_name = _argument_name(container, per_frame)
        self._hparams_kind = container_kind(container) or "dict"
        return items

    def _from_names(self, names: tuple[Any, ...], init_args: dict[str, Any]) -> dict[str, Any]:
        bad = [name for name in names if not isinstance(name, str)]
        if bad:
            raise TypeError(
                "save_hyperparameters() takes names of __init__ arguments (strings), or one dict, "
                f"argparse.Namespace or dataclass; got {bad!r}"
            )
        unknown = [name for name in names if name not in init_args]
        if unknown:
            raise ValueError(
                f"save_hyperparameters(): {unknown} are not __init__ arguments of {type(self).__name__} "
                f"(those are {sorted(init_args)})"
            )
        self._hparams_name = None
        return {name: init_args[name] for name in names or init_args}

    def _serializable_hparams(self, stacklevel: int = 3) -> dict[str, Any]:
        from ember.strategies.checkpoint_io import encode_tree

        out: dict[str, Any] = {}
        dropped = []
        for key, value in self.hparams.items():
            try:
                encode_tree(value)
            except TypeError:
                dropped.append(key)
                continue
            out[key] = value
        if dropped:
            warnings.warn(
                f"hyper-parameters {dropped} cannot be stored pickle-free and are left out of checkpoints and "
                "loggers; pass save_hyperparameters(ignore=[...]) to silence this",
                stacklevel=stacklevel,
            )
        return out

    def _hparams_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's entries for the hyper-parameters (what :func:`init_kwargs` reads back)."""
        entries: dict[str, Any] = {"hyper_parameters": self._serializable_hparams(stacklevel=4)}
        if self._hparams_name is not None:
            entries["hparams_name"] = self._hparams_name
            entries["hparams_type"] = self._hparams_kind
        return entries


def logged_hparams(
    module: HyperparametersMixin, datamodule: HyperparametersMixin | None
) -> dict[str, Any] | None:
    """What the Trainer sends to its loggers at the start of each stage, as Lightning: the module's
    and the datamodule's saved hyper-parameters (those saved with ``logger=True``) merged, or None
    when neither saved any. A key both hold with different values is an error."""
    sources = [owner for owner in (module, datamodule) if owner is not None and owner._log_hyperparams]
    if not sources:
        return None
    merged: dict[str, Any] = {}
    for owner in sources:
        for key, value in owner._serializable_hparams(stacklevel=5).items():
            if key in merged and not _same(merged[key], value):
                raise RuntimeError(
                    f"hyper-parameter {key!r} is {merged[key]!r} in {type(module).__name__} and {value!r} in "
                    f"{type(owner).__name__}: the loggers get one value per name; rename one, or pass "
                    "save_hyperparameters(ignore=[...]) or logger=False in one of them"
                )
            merged[key] = value
    return merged


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # (an ambiguous comparison, of tensors or arrays: compare identities)
        return a is b


# -- reading the __init__ arguments ------------------------------------------------------------------
def init_arguments(obj: object, frame: types.FrameType) -> list[dict[str, Any]]:
    """The arguments of each ``__init__`` call of ``obj`` running at ``frame`` and above, the innermost
    (the base class's) first: merged in this order, the most derived class's value wins. Called outside
    ``__init__``, the caller's arguments alone."""
    chain = list(_init_frames(obj, frame)) or [frame]
    return [_arguments(init_frame, obj) for init_frame in chain]


def _init_frames(obj: object, frame: types.FrameType | None) -> Iterator[types.FrameType]:
    # Whatever runs between the object's __init__ and the call (its own helper methods, a plain
    # function it was handed to) is passed over, as Lightning; with no __init__ of the object on the
    # stack (called after construction), there is no chain.
    while frame is not None and not (frame.f_code.co_name == "__init__" and _self_of(frame) is obj):
        frame = frame.f_back
    # Then each __init__ of the same object, up to the code that created it.
    while frame is not None and frame.f_code.co_name == "__init__" and _self_of(frame) is obj:
        yield frame
        frame = frame.f_back


def _self_of(frame: types.FrameType) -> Any:
    code = frame.f_code
    return frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None


def _arguments(frame: types.FrameType, obj: object) -> dict[str, Any]:
    """A frame's named and keyword-only arguments and the contents of its ``**kwargs``; not ``self``
    (nor ``*args``)."""
    info = inspect.getargvalues(frame)
    named = [name for name in info.args if name not in ("self", "__class__")]
    if info.args and info.locals.get(info.args[0]) is obj:
        named = [name for name in named if name != info.args[0]]
    found = {name: info.locals[name] for name in named if name in info.locals}
    if info.keywords is not None:
        found.update(info.locals.get(info.keywords) or {})
    return found


# -- single containers ---------------------------------------------------------------------------------
def container_kind(value: Any) -> str | None:
    """``"dict"``, ``"namespace"`` or ``"dataclass"`` (an instance), else None."""
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, argparse.Namespace):
        return "namespace"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "dataclass"
    return None


def container_items(value: Any) -> dict[Any, Any]:
    if isinstance(value, argparse.Namespace):
        return dict(vars(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    return dict(value)


def _argument_name(container: Any, per_frame: list[dict[str, Any]]) -> str | None:
    """The ``__init__`` argument holding ``container`` (the same object, else an equal one), the most
    derived class's first; None when no argument holds it."""
    candidates: list[tuple[str, Any]] = [item for found in reversed(per_frame) for item in found.items()]
    for name, value in candidates:
        if value is container:
            return name
    for name, value in candidates:
        if container_kind(value) is not None and _equal(value, container):
            return name
    return None


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # (tensors inside compare element-wise)
        return False


def _deep_copy(values: Mapping[str, Any]) -> dict[str, Any]:
    copied = {}
    for key, value in values.items():
        try:
            copied[key] = copy.deepcopy(value)
        except Exception:  # (a value that cannot be copied is shared)
            copied[key] = value
    return copied


# -- rebuilding a module from a checkpoint ---------------------------------------------------------------
def init_kwargs(
    cls: type[Any], checkpoint: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The keyword arguments that rebuild ``cls`` from a checkpoint, ``overrides`` winning: the saved
    hyper-parameters ``__init__`` takes (all of them when it takes ``**kwargs``), or, when they came
    from one dict, Namespace or dataclass argument, that argument rebuilt from them."""
    saved = dict(checkpoint.get("hyper_parameters", {}))
    parameters = inspect.signature(cls.__init__).parameters
    name, kind = checkpoint.get("hparams_name"), checkpoint.get("hparams_type")
    if isinstance(name, str) and name in parameters:  # (the items of one dict, Namespace or dataclass)
        saved = {} if name in overrides else {name: _rebuild(cls, name, kind, saved)}
    elif not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        saved = {key: value for key, value in saved.items() if key in parameters}
    return {**saved, **overrides}


def read_hparams_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``load_from_checkpoint(hparams_file=...)``'s hyper-parameters: a ``.yaml``/``.yml`` file (as
    Lightning's loggers write ``hparams.yaml``) or a ``.json`` one (as ember's write ``hparams.json``)."""
    suffix = os.fspath(path).rsplit(".", 1)[-1].lower()
    if suffix not in ("yaml", "yml", "json"):
        raise ValueError(
            f"load_from_checkpoint(hparams_file={os.fspath(path)!r}): valid choices are a '.yaml', '.yml' "
            "or '.json' file"
        )
    with open(path, encoding="utf-8") as file:
        if suffix == "json":
            loaded = json.load(file)
        else:
            import yaml

            loaded = yaml.safe_load(file)
    if not isinstance(loaded, dict):
        raise ValueError(
            f"load_from_checkpoint(hparams_file={os.fspath(path)!r}): it holds a {type(loaded).__name__}, "
            "expected a mapping of hyper-parameter names to values"
        )
    return loaded


def _rebuild(cls: type[Any], name: str, kind: Any, items: dict[str, Any]) -> Any:
    if kind == "namespace":
        return argparse.Namespace(**items)
    if kind != "dataclass":
        return items
    config_type = _dataclass_annotation(cls, name)
    if config_type is None:
        raise TypeError(
            f"{cls.__name__}.load_from_checkpoint(): the hyper-parameters came from the dataclass argument "
            f"{name!r} of __init__; annotate it with its dataclass ({name}: MyConfig) so that it can be "
            f"rebuilt, or pass {name}=... yourself"
        )
    fields = {field.name for field in dataclasses.fields(config_type) if field.init}
    return config_type(**{key: value for key, value in items.items() if key in fields})


def _dataclass_annotation(cls: type[Any], name: str) -> type | None:
    """The dataclass that ``cls.__init__`` annotates argument ``name`` with (``Config | None`` too)."""
    try:
        annotation = typing.get_type_hints(cls.__init__).get(name)
    except Exception:  # (an annotation naming what cannot be imported here)
        annotation = inspect.signature(cls.__init__).parameters[name].annotation
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None
