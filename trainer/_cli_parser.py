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

    auto_optimizer = False  # add_optimizer_arguments added --optimizer / --lr_scheduler here

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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
        if option.startswith("--") and not option.endswith((".help", "--help", "--print_config"))
    }
    hints = []
    for option in unknown:
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
    ``plateau``, ReduceLROnPlateau with a ``monitor``), left uninstantiated: the module's parameters do
    not exist yet (``configure_model`` may build them, and a strategy may shard them, during fit)."""
    common: dict[str, Any] = {"instantiate": False, "fail_untyped": False, "required": False}
    parser.add_subclass_arguments(torch.optim.Optimizer, "optimizer", skip={"params"}, **common)
    parser.add_subclass_arguments((LRScheduler, plateau), "lr_scheduler", skip={"optimizer"}, **common)
    parser.auto_optimizer = True


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
