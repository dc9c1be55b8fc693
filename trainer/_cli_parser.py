"""The jsonargparse side of :class:`~ember.trainer.cli.TrainerCLI`.

Imported only when a TrainerCLI is built, so that ``import ember`` never loads jsonargparse (an
optional dependency: ``pip install 'ember[cli]'``). Everything here knows jsonargparse; the CLI's
flow (seed, instantiate, run) stays in ``cli.py``.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from jsonargparse import (  # type: ignore[attr-defined]  # (re-exported without __all__ entries)
    ActionConfigFile,
    ArgumentParser,
    Namespace,
    class_from_function,
)
from torch.optim.lr_scheduler import LRScheduler

import ember

__all__ = [
    "CLIParser",
    "Namespace",
    "add_optimizer_arguments",
    "as_class",
    "automatic_spec",
    "instantiate_from",
    "keep_none",
    "short_description",
]

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (?P<args>.*)", re.IGNORECASE)
_NOT_ACCEPTED = re.compile(
    r"(?:Group '(?P<group>[\w.]+)' )?does not accept (?:option|nested key) '(?P<key>[\w.]+)'"
)
_UNEXPECTED_KEY = re.compile(r"Key '(?P<key>[\w.]+)' is not expected")


class CLIParser(ArgumentParser):
    """jsonargparse's ``ArgumentParser`` with ember's version in dumped files, and unknown options
    answered with the closest valid one, or with the list of valid ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # {"optimizer": its key, "lr_scheduler": its key}, and the class of each key whose class is fixed.
        self.automatic_keys: dict[str, str] = {}
        self.fixed_classes: dict[str, type] = {}
        self.callback_keys: list[
            str
        ] = []  # add_lightning_class_args' callbacks: the CLI gives them to the Trainer
        kwargs.setdefault("env_prefix", "EMBER")  # read only with default_env=True (parser_kwargs)
        kwargs.setdefault("default_env", False)
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch is a typo, not max_epochs
        kwargs.setdefault("dump_header", [f"ember=={ember.__version__}"])
        super().__init__(*args, **kwargs)

    def add_config_argument(self) -> None:
        """``-c/--config``: not in ``__init__``, as jsonargparse makes parsers of this class for classes'
        arguments too (a strategy's ``config`` argument would clash with it)."""
        self.add_argument(
            "-c",
            "--config",
            action=ActionConfigFile,
            help="A YAML (or JSON) config file. Several are merged in order; later ones and options win.",
        )

    def add_lightning_class_args(
        self, lightning_class: Any, nested_key: str, subclass_mode: bool = False, required: bool = True
    ) -> list[str]:
        """Lightning's ``add_lightning_class_args``: the arguments of a Callback (added to the Trainer's
        callbacks of every run), a Trainer, a TrainModule or a DataModule class under ``--nested_key``.

        Example::

            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.monitor": "val_loss"})
        """
        from ember.callbacks.base import Callback
        from ember.trainer.module import DataModule, TrainModule
        from ember.trainer.trainer import Trainer

        cls = as_class(lightning_class) if callable(lightning_class) else lightning_class
        bases = (Callback, Trainer, TrainModule, DataModule)
        if not (isinstance(cls, type) and issubclass(cls, bases)):
            name = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
            raise ValueError(
                f"add_lightning_class_args: {name} is not a subclass of one of "
                f"{', '.join(b.__name__ for b in bases)} (or a function returning one); "
                "add its arguments with add_class_arguments"
            )
        if issubclass(cls, Callback):
            self.callback_keys.append(nested_key)
        if subclass_mode:
            return self.add_subclass_arguments(cls, nested_key, fail_untyped=False, required=required)  # type: ignore[no-any-return]
        return self.add_class_arguments(  # type: ignore[no-any-return]
            cls, nested_key, fail_untyped=False, instantiate=not issubclass(cls, Trainer), sub_configs=True
        )

    def add_optimizer_args(
        self,
        optimizer_class: type | tuple[type, ...] = (torch.optim.Optimizer,),
        nested_key: str = "optimizer",
    ) -> None:
        """Lightning's ``add_optimizer_args``: ``--optimizer`` as the optimizer the CLI gives the module.

        One class fixes it (``--optimizer.lr 0.01``, no class on the command line); a tuple takes any
        subclass of them by ``class_path``. Built in ``configure_optimizers``, from the module's parameters.
        """
        _add_automatic(self, optimizer_class, nested_key, "params", "optimizer")

    def add_lr_scheduler_args(self, lr_scheduler_class: type | tuple[type, ...] | None = None,
                              nested_key: str = "lr_scheduler") -> None:  # fmt: skip
        """Lightning's ``add_lr_scheduler_args``: ``--lr_scheduler``, built on the optimizer of
        :meth:`add_optimizer_args`. One class fixes it, a tuple takes any subclass; None: any torch
        scheduler or ember's ``ReduceLROnPlateau`` (torch's, with the ``monitor`` it watches)."""
        if lr_scheduler_class is None:
            from ember.trainer.cli import ReduceLROnPlateau  # (cli.py imports this module)

            lr_scheduler_class = (LRScheduler, ReduceLROnPlateau)
        _add_automatic(self, lr_scheduler_class, nested_key, "optimizer", "lr_scheduler")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # A subcommand's unknown option is reported by the main parser: its options are the subcommand's.
        parser = getattr(ex, "subcommand_parser", None) or self
        super().error(message + _hint(parser, message), ex)


def _hint(parser: ArgumentParser, message: str) -> str:
    """For each unknown option of ``message``: the closest valid option, else every valid one."""
    if "did you mean" in message or "Valid options" in message:  # (already added by a subcommand parser)
        return ""
    unknown = []
    if match := _UNRECOGNIZED.search(message):
        unknown = [token.split("=", 1)[0] for token in match["args"].split() if token.startswith("--")]
    elif match := _NOT_ACCEPTED.search(message):  # (a config file's key)
        unknown = [f"--{match['group']}.{match['key']}" if match["group"] else f"--{match['key']}"]
    elif match := _UNEXPECTED_KEY.search(message):
        unknown = [f"--{match['key']}"]
    options = {
        option.rstrip("+")  # (--trainer.callbacks+ appends)
        for option in parser._option_string_actions
        if option.startswith("--")
        and not option.endswith((".help", "--help", "--print_config", "--print_shtab"))
    }
    subcommands = getattr(parser, "_subcommands_action", None)
    hints = []
    for option in unknown:
        if subcommands is not None and option not in options:  # (`train.py --trainer.x 1 fit`)
            names = ", ".join(subcommands.choices)
            hints.append(f"{option} is an option of the subcommands ({names}): give it after the subcommand")
            continue
        group, _, key = option.rpartition(".")
        siblings = sorted(o.rpartition(".")[2] for o in options if group and o.startswith(group + "."))
        prefix, rest = group + ".", ""
        if not siblings:  # a top-level option, or a misspelled group (--traner.max_epochs)
            siblings = sorted(o[2:] for o in options if "." not in o)
            key, dot, rest = option[2:].partition(".")
            prefix, rest = "--", dot + rest
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
        if close:
            hints.append(f"{option}: did you mean {prefix}{close[0]}{rest}?")
        else:
            hints.append(
                f"{option} is not an option. Valid options: {', '.join(prefix + s for s in siblings)}"
            )
    return "".join(f"\n  {hint}" for hint in hints)


def as_class(value: Any) -> type:
    """A class, or the class jsonargparse builds from a function returning the instance (Lightning's
    ``model_class=make_model``)."""
    return value if isinstance(value, type) else class_from_function(value)


def add_optimizer_arguments(parser: CLIParser, plateau: type) -> None:
    """``--optimizer`` (any ``torch.optim.Optimizer``) and ``--lr_scheduler`` (any torch scheduler, or
    ``plateau``, ReduceLROnPlateau with a ``monitor``), unless ``add_arguments_to_parser`` took the keys."""
    if "optimizer" not in parser.automatic_keys and "optimizer" not in parser.groups:  # type: ignore[operator]
        parser.add_optimizer_args()
    if "lr_scheduler" not in parser.automatic_keys and "lr_scheduler" not in parser.groups:  # type: ignore[operator]
        parser.add_lr_scheduler_args((LRScheduler, plateau))


def _add_automatic(
    parser: CLIParser, classes: type | tuple[type, ...], key: str, skip: str, role: str
) -> None:
    # Left uninstantiated: the module's parameters do not exist yet (configure_model may build them, and
    # a strategy may shard them, during fit).
    if role in parser.automatic_keys:
        raise ValueError(
            f"add_{role}_args: the {role} the CLI builds is already '--{parser.automatic_keys[role]}'; "
            f"add the arguments of another {role} with add_class_arguments and build it yourself"
        )
    common: dict[str, Any] = {"instantiate": False, "fail_untyped": False, "skip": {skip}}
    if isinstance(classes, tuple):
        parser.add_subclass_arguments(classes, key, required=False, **common)
    else:
        parser.add_class_arguments(classes, key, sub_configs=True, **common)
        parser.fixed_classes[key] = classes
    parser.automatic_keys[role] = key


def automatic_spec(parser: CLIParser, role: str, config: Any) -> dict[str, Any] | None:
    """The ``{class_path, init_args}`` of the CLI-built ``role`` ("optimizer", "lr_scheduler") in a parsed
    ``config``, or None when it is not given (a fixed class is always given)."""
    key = parser.automatic_keys.get(role)
    value = None if key is None else config.get(key)
    if key in parser.fixed_classes and value is not None:
        cls = parser.fixed_classes[key]
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": value}
    return value or None


def instantiate_from(spec: Any, *args: Any) -> Any:
    """Build ``class_path(*args, **init_args)`` from a parsed ``{class_path, init_args}``."""
    module_name, _, name = spec["class_path"].rpartition(".")
    cls: Callable[..., Any] = getattr(__import__(module_name, fromlist=[name]), name)
    init_args = spec.get("init_args") or {}
    if isinstance(init_args, Namespace):
        init_args = init_args.as_dict()
    return cls(*args, **init_args)


def keep_none(method: Callable[..., Any]) -> dict[str, bool]:
    """The keyword that keeps None values in ``parser.dump`` / ``parser.save``: a saved config lists
    every option. (``skip_unset`` since jsonargparse 4.49, ``skip_none`` before.)"""
    name = "skip_unset" if "skip_unset" in inspect.signature(method).parameters else "skip_none"
    return {name: False}


def short_description(function: Any) -> str:
    """A docstring's first paragraph, on one line and without reST's double backquotes: a subcommand's help."""
    paragraph = inspect.cleandoc(function.__doc__ or "").split("\n\n")[0]
    return " ".join(paragraph.split()).replace("``", "")
