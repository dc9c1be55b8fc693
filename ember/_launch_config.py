"""The launch options of ``ember launch`` and ``ember config``: one table, one validation, one file format.

Each option is described once in :data:`OPTIONS` (key, default, range). The same
:func:`check_option` validates a value from the command line, from a config file, or typed at an
``ember config`` prompt, so the three can never disagree. A config file is YAML, one ``key: value``
per option, read with ``yaml.safe_load`` only::

    nproc_per_node: 2
    strategy: ddp
    master_port: null   # null: the option's default

``yaml`` and the strategy/precision registries are imported only when a value needs them, so
``ember --help`` does not pay for them.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember._devices import ACCELERATORS

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "OPTIONS",
    "LaunchConfigError",
    "add_launch_options",
    "ask",
    "check_option",
    "defaults",
    "read_config",
    "render_config",
    "resolve_options",
    "validate_options",
    "write_config",
]

DEFAULT_CONFIG_FILE = "ember_config.yaml"


class LaunchConfigError(ValueError):
    """A launch option that ``ember launch`` refuses; the message names the option, its value and what is expected."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Option:
    key: str
    default: int | str | None
    help: str
    metavar: str
    integer: bool = False
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


# Order matters: a key is checked after the keys it depends on (node_rank after nnodes, strategy
# after the process counts), on the command line, in a file and at the prompts alike.
OPTIONS: tuple[_Option, ...] = (
    _Option(key="nproc_per_node", default=1, integer=True, minimum=1, metavar="N", help="processes per node"),
    _Option(key="nnodes", default=1, integer=True, minimum=1, metavar="N", help="number of nodes"),
    _Option(key="node_rank", default=0, integer=True, metavar="R", help="rank of this node, 0..nnodes-1"),
    _Option(key="master_addr", default="127.0.0.1", metavar="HOST", help="address of node 0"),
    _Option(key="master_port", default=None, integer=True, minimum=1, maximum=65535, metavar="PORT",
            help="port on node 0 (none: a free port on one node, 29500 on several)"),
    _Option(key="max_restarts", default=0, integer=True, minimum=0, metavar="K",
            help="restart the whole group up to K times on failure"),
    _Option(key="strategy", default=None, metavar="NAME",
            help="default strategy of the script's Accelerator/Trainer: auto or a registered name"),
    _Option(key="precision", default=None, metavar="NAME",
            help="default precision of the script's Accelerator/Trainer: a registered name or an alias"),
    _Option(key="accelerator", default=None, choices=ACCELERATORS, metavar="{" + ",".join(ACCELERATORS) + "}",
            help="default device type"),
)  # fmt: skip
_BY_KEY = {option.key: option for option in OPTIONS}


def defaults() -> dict[str, Any]:
    """Every key with its built-in default."""
    return {option.key: option.default for option in OPTIONS}


def _expected(option: _Option) -> str:
    if option.choices:
        return "one of " + ", ".join(repr(c) for c in option.choices)
    if not option.integer:
        return "a string"
    if option.minimum is not None and option.maximum is not None:
        return f"an integer in [{option.minimum}, {option.maximum}]"
    return "an integer" if option.minimum is None else f"an integer >= {option.minimum}"


def _convert(option: _Option, raw: object, label: str) -> Any:
    """The value of one option on its own: its type, range and choices (no other key needed)."""
    if raw is None:
        if option.default is None:
            return None
        raise LaunchConfigError(f"{label} is null; expected {_expected(option)}")
    if option.integer:
        expected = "" if option.minimum is None else f" (expected {_expected(option)})"
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise LaunchConfigError(f"{label} {raw!r} is not an integer{expected}")
        try:
            value = int(raw)
        except ValueError:
            if option.key == "nnodes" and ":" in str(raw):  # torchrun's elastic MIN:MAX range
                raise LaunchConfigError(
                    f"{label} {raw!r}: ember launch runs a fixed number of nodes, not a MIN:MAX range; "
                    f"give one integer >= 1"
                ) from None
            raise LaunchConfigError(f"{label} {raw!r} is not an integer{expected}") from None
        if (
            option.minimum is not None
            and option.maximum is not None
            and not option.minimum <= value <= option.maximum
        ):
            raise LaunchConfigError(f"{label} {value} must be in [{option.minimum}, {option.maximum}]")
        if option.minimum is not None and value < option.minimum:
            raise LaunchConfigError(f"{label} {value} must be >= {option.minimum}")
        return value
    # YAML reads `precision: 16` as an int; the command line would have given the string "16".
    if (isinstance(raw, bool) or not isinstance(raw, (str, int))) and not (
        option.choices or option.key in ("strategy", "precision")
    ):
        raise LaunchConfigError(f"{label} {raw!r} is not a string")
    # A name that is not a string (e.g. argparse's [] for `--strategy --`) fails the choice or
    # registry check below, whose message lists the valid names.
    text = str(raw)
    if option.key == "master_addr" and (not text or not text.isprintable() or any(c.isspace() for c in text)):
        raise LaunchConfigError(f"{label} {text!r} is not a host name or an IP address")
    if option.choices and text not in option.choices:
        raise LaunchConfigError(f"{label} {text!r} is not a valid choice. Valid choices: " + ", ".join(
            repr(c) for c in option.choices))  # fmt: skip
    return text


def _check_relations(key: str, value: Any, earlier: Mapping[str, Any], label: Callable[[str], str]) -> None:
    """The checks that need an earlier key or a registry (``earlier`` holds every key before ``key``)."""
    if key == "node_rank" and not 0 <= value < earlier["nnodes"]:
        nnodes = earlier["nnodes"]
        raise LaunchConfigError(
            f"{label(key)} {value} must be in [0, {nnodes}) for {label('nnodes')} {nnodes}"
        )
    if key == "strategy" and value is not None and value != "auto":
        from ember.strategies import STRATEGY_REGISTRY

        if value not in STRATEGY_REGISTRY:
            raise LaunchConfigError(
                f"{label(key)} {value!r} is not a known strategy. {STRATEGY_REGISTRY.refusal(value)}Valid "
                "choices: " + ", ".join(repr(n) for n in ["auto", *STRATEGY_REGISTRY.names()])
            )
        nnodes, per_node = earlier["nnodes"], earlier["nproc_per_node"]
        try:
            STRATEGY_REGISTRY.create(value).check_world_size(per_node * nnodes)
        except (ValueError, ImportError) as err:
            raise LaunchConfigError(
                f"{label(key)} {value!r} with {nnodes} x {per_node} processes: {err}"
            ) from None
    if key == "precision" and value is not None:
        from ember.precision import PRECISION_REGISTRY, resolve_precision

        try:
            resolve_precision(value, device_type="cpu")
        except ValueError:
            raise LaunchConfigError(
                f"{label(key)} {value!r} is not a known precision. Valid choices: "
                + ", ".join(repr(n) for n in PRECISION_REGISTRY.names())
            ) from None


def check_option(key: str, raw: object, earlier: Mapping[str, Any], label: Callable[[str], str]) -> Any:
    """Validate one option given the keys before it; return its typed value or raise LaunchConfigError.

    ``label(key)`` is how a message names a key: ``--nproc-per-node`` on the command line,
    ``nproc_per_node`` in a file or at a prompt.
    """
    value = _convert(_BY_KEY[key], raw, label(key))
    _check_relations(key, value, earlier, label)
    return value


def validate_options(values: Mapping[str, object], *, from_file: str | None = None,
                     file_keys: frozenset[str] = frozenset()) -> dict[str, Any]:  # fmt: skip
    """Check every option in order (``values`` holds every key); return the typed values.

    Keys in ``file_keys`` came from the config file ``from_file``: their errors say so, and name
    the key as written in the file.
    """

    def label(key: str) -> str:
        return key if key in file_keys else _BY_KEY[key].flag

    checked: dict[str, Any] = {}
    for option in OPTIONS:
        try:
            checked[option.key] = check_option(option.key, values[option.key], checked, label)
        except LaunchConfigError as err:
            if option.key in file_keys:
                raise LaunchConfigError(f"config file {from_file!r}: {err}") from None
            raise
    return checked


def resolve_options(given: Mapping[str, object], config_file: str | None) -> dict[str, Any]:
    """The checked options of ``ember launch``: each from ``given`` (the command line; ``None`` = not
    given) if set, else from ``config_file``, else its default."""
    from_file = read_config(config_file) if config_file is not None else {}
    values: dict[str, object] = {}
    for key, default in defaults().items():
        if given[key] is not None:
            values[key] = given[key]
        else:
            values[key] = from_file.get(key, default)
    file_keys = frozenset(key for key in from_file if given[key] is None)
    return validate_options(values, from_file=config_file, file_keys=file_keys)


def _argument_type(option: _Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return _convert(option, text, option.flag)
        except LaunchConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = option.key
    return parse


# 🤗 Accelerate's names of the same options (`accelerate launch --num_machines 2 ...`), accepted as they are.
ACCELERATE_FLAGS = {
    "nnodes": "--num_machines",
    "node_rank": "--machine_rank",
    "master_addr": "--main_process_ip",
    "master_port": "--main_process_port",
    "precision": "--mixed_precision",
}  # (--max_restarts is also torchrun's spelling)


def add_launch_options(parser: argparse.ArgumentParser) -> None:
    """Add every launch option, default ``None`` (= not given) so a config file can fill it."""
    for option in OPTIONS:
        shown = "" if option.default is None else f" (default {option.default})"
        # torchrun's own spellings too (--nproc_per_node, --master_addr, ...).
        aliases = [a for a in (f"--{option.key}", ACCELERATE_FLAGS.get(option.key)) if a and a != option.flag]
        parser.add_argument(
            option.flag,
            *aliases,
            dest=option.key,
            type=_argument_type(option),
            default=None,
            metavar=option.metavar,
            help=option.help + shown,
        )
    parser.add_argument(
        "--num_processes",
        type=_argument_type(
            _Option(key="num_processes", default=None, integer=True, minimum=1, metavar="N", help="")
        ),
        default=None,
        metavar="N",
        help="🤗 Accelerate's option: processes in all, over --nnodes nodes (--nproc-per-node is per node)",
    )
    parser.add_argument(
        "--multi_gpu",
        action="store_true",
        help="🤗 Accelerate's option: the processes run on GPUs (--accelerator cuda); ember starts DDP by "
        "itself for several processes",
    )


def read_config(path: str) -> dict[str, object]:
    """The raw ``key: value`` pairs of a config file; every key is known (values are checked later)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise LaunchConfigError(f"--config-file {path!r} does not exist or is not a file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise LaunchConfigError(f"config file {path!r} is not UTF-8 text: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise LaunchConfigError(f"config file {path!r} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}  # an empty file: every option at its default
    if not isinstance(data, dict):
        raise LaunchConfigError(
            f"config file {path!r} must be a mapping of launch options (key: value), "
            f"not a {type(data).__name__}: {data!r}"
        )
    from ember._accelerate_config import from_accelerate, is_accelerate_config

    if is_accelerate_config(data):  # written by `accelerate config`: its keys mapped to ember's
        data = from_accelerate(data, path)
    keys = [option.key for option in OPTIONS]
    for key in data:
        if key not in _BY_KEY:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LaunchConfigError(
                f"config file {path!r}: unknown key {key!r}{hint}. Valid keys: " + ", ".join(keys)
            )
    return dict(data)


def render_config(values: Mapping[str, Any]) -> str:
    """The YAML text of a config file: every key, each after a comment that explains it."""
    import yaml

    lines = [
        "# ember launch options, written by `ember config`.",
        "# Use: ember launch --config-file THIS_FILE script.py [args]  (command-line options override these)",
    ]
    for option in OPTIONS:
        shown = "null (unset)" if option.default is None else option.default
        lines.append(f"\n# {option.help}; default {shown}")
        lines.append(yaml.safe_dump({option.key: values[option.key]}, default_flow_style=False).rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_config(path: Path, values: Mapping[str, Any]) -> None:
    """Write the file whole or not at all: a temporary file in the same folder, renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render_config(values))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ask(
    initial: Mapping[str, Any], read: Callable[[str], str] = input, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Ask for every option in order; Enter keeps the value shown, a bad answer is asked again.

    ``none`` clears an option whose default is none. Raises EOFError when input ends first.
    """
    answers: dict[str, Any] = {}
    for option in OPTIONS:
        current = initial[option.key]
        while True:
            shown = "none" if current is None else current
            answer = read(f"{option.key} - {option.help} [{shown}]: ").strip()
            raw: object = answer
            if answer == "":
                raw = current
            elif answer.lower() in ("none", "null") and option.default is None:
                raw = None
            try:
                answers[option.key] = check_option(option.key, raw, answers, lambda key: key)
                break
            except LaunchConfigError as err:
                say(f"  {err}; try again")
    return answers
