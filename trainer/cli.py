"""``TrainerCLI``: Lightning's ``LightningCLI`` for ember: a Trainer, a TrainModule and a DataModule
built from YAML config files and ``--trainer.*`` / ``--model.*`` / ``--data.*`` options, then run.

jsonargparse (``pip install 'ember[cli]'``) is imported when a TrainerCLI is built, never by ``import
ember``. The parser itself is in ``_cli_parser.py``; this module is the flow: parse, seed, instantiate,
run the subcommand.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path
from types import MethodType, ModuleType
from typing import TYPE_CHECKING, Any

import torch

from ember._rng import seed_everything
from ember.callbacks.base import Callback
from ember.strategies.environment import shared_random_seed
from ember.trainer.hooks import overridden
from ember.trainer.module import DataModule, TrainModule
from ember.trainer.trainer import Trainer

if TYPE_CHECKING:
    from ember.trainer._cli_parser import CLIParser

__all__ = ["ReduceLROnPlateau", "SaveConfigCallback", "TrainerCLI"]

_NAMED_ARGUMENT = re.compile(r"^(?:\w+\()?(?P<name>\w+)=")  # "strategy='x' is not ...", "Trainer(x=..."


def _cli_parser() -> ModuleType:
    try:
        return importlib.import_module("ember.trainer._cli_parser")
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "jsonargparse":
            raise
        raise ModuleNotFoundError(
            "TrainerCLI needs jsonargparse (with its signatures extra), which is not installed: "
            "pip install 'ember[cli]'",
            name=error.name,
        ) from error


class ReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """torch's ``ReduceLROnPlateau`` with the metric it watches: ``--lr_scheduler ReduceLROnPlateau
    --lr_scheduler.monitor val_loss`` (Lightning's ``lightning.pytorch.cli.ReduceLROnPlateau``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, monitor: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(optimizer, *args, **kwargs)
        self.monitor = monitor


class SaveConfigCallback(Callback):
    """Writes the run's resolved config to ``<trainer.log_dir>/config.yaml`` when the first stage starts.

    An existing file is an error (a previous run's record is never overwritten) unless ``overwrite``.
    Global rank 0 writes; every rank learns whether the file existed, so that all of them stop together.
    Override :meth:`save_config` to keep the config elsewhere too (a logger, an experiment tracker).
    """

    def __init__(self, parser: Any, config: Any, config_filename: str = "config.yaml", overwrite: bool = False,
                 multifile: bool = False, save_to_log_dir: bool = True) -> None:  # fmt: skip
        if not save_to_log_dir and type(self).save_config is SaveConfigCallback.save_config:
            raise ValueError(
                "save_to_log_dir=False only makes sense in a subclass of SaveConfigCallback that overrides "
                "save_config() to keep the config elsewhere"
            )
        self.parser, self.config = parser, config
        self.config_filename, self.overwrite, self.multifile = config_filename, overwrite, multifile
        self.save_to_log_dir = save_to_log_dir
        self.already_saved = False

    def setup(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            # Only rank 0 asks for log_dir: a logger picks its version_N the first time it is asked.
            path = Path(trainer.log_dir or trainer.default_root_dir) / self.config_filename
            exists = trainer.is_global_zero and not self.overwrite and path.exists()
            if trainer.accelerator.broadcast_object(exists):
                raise RuntimeError(
                    f"{type(self).__name__}: {path} already exists; it is not overwritten, as it records a "
                    "previous run. Delete it, choose another log directory, pass "
                    "TrainerCLI(save_config_kwargs={'overwrite': True}), or save_config_callback=None"
                )
            if trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                keep_none = _cli_parser().keep_none(self.parser.save)
                self.parser.save(
                    self.config, str(path), overwrite=self.overwrite, multifile=self.multifile, **keep_none
                )
        if trainer.is_global_zero:
            self.save_config(trainer, module, stage)
        self.already_saved = True

    def save_config(self, trainer: Trainer, module: TrainModule, stage: str) -> None:
        """Called on global rank 0 only, after the file is written: keep the config elsewhere too.

        Example::

            def save_config(self, trainer, module, stage):
                trainer.logger.log_hyperparams({"config": self.parser.dump(self.config)})
        """


class TrainerCLI:
    """Build and run a Trainer from config files and command-line options (Lightning's ``LightningCLI``).

    Example::

        # train.py
        TrainerCLI(Classifier, Digits)

        # python train.py fit --config config.yaml --trainer.max_epochs 5 --model.lr 0.01
        # python train.py fit --config config.yaml --print_config      (the resolved YAML, then exit)

    ``model_class`` / ``datamodule_class``: a class (or a function returning an instance); None, or
    ``subclass_mode_*=True``, takes any subclass from ``--model.class_path`` / ``--data.class_path``.
    ``run=False`` parses (``args`` or ``sys.argv``) and builds ``self.trainer``, ``self.model`` and
    ``self.datamodule`` without subcommands. ``seed_everything_default``: an int seeds with it, True
    with a random seed (one for every process the Trainer starts), False not at all.
    """

    def __init__(
        self,
        model_class: type[TrainModule] | Any = None,
        datamodule_class: type[DataModule] | Any = None,
        save_config_callback: type[SaveConfigCallback] | None = SaveConfigCallback,
        save_config_kwargs: dict[str, Any] | None = None,
        trainer_class: type[Trainer] | Any = Trainer,
        trainer_defaults: dict[str, Any] | None = None,
        seed_everything_default: bool | int = True,
        parser_kwargs: dict[str, Any] | None = None,
        subclass_mode_model: bool = False,
        subclass_mode_data: bool = False,
        args: list[str] | dict[str, Any] | None = None,
        run: bool = True,
        auto_configure_optimizers: bool = True,
    ) -> None:
        self._parsing = _cli_parser()
        self.save_config_callback = save_config_callback
        self.save_config_kwargs = save_config_kwargs or {}
        self.trainer_class = trainer_class
        self.trainer_defaults = trainer_defaults or {}
        self.seed_everything_default = seed_everything_default
        self.parser_kwargs = parser_kwargs or {}
        self.auto_configure_optimizers = auto_configure_optimizers
        self.model_class = model_class
        self.datamodule_class = datamodule_class
        self.subclass_mode_model = model_class is None or subclass_mode_model
        self.subclass_mode_data = datamodule_class is None or subclass_mode_data

        self.setup_parser(run)
        self.parse_arguments(self.parser, args)
        self.subcommand: str | None = self.config["subcommand"] if run else None
        self._set_seed()
        self.before_instantiate_classes()
        self.instantiate_classes()
        self.after_instantiate_classes()
        if self.subcommand is not None:
            self._run_subcommand(self.subcommand)

    # -- the parser -------------------------------------------------------------------------------------
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands, each with the Trainer method's arguments that the CLI fills itself."""
        data = {"module", "model", "dataloaders", "datamodule"}
        return {
            "fit": {"module", "model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": data,
            "test": data,
            "predict": data,
        }

    def init_parser(self, **kwargs: Any) -> CLIParser:
        parser: CLIParser = self._parsing.CLIParser(**kwargs)
        parser.add_config_argument()  # -c/--config, several allowed: later files and options win
        return parser

    def setup_parser(self, add_subcommands: bool) -> None:
        names = self.subcommands()
        main_kwargs = {k: v for k, v in self.parser_kwargs.items() if k not in names}
        self.parser = self.init_parser(**main_kwargs)
        self._subcommand_parsers: dict[str, CLIParser] = {}
        self._subcommand_arguments: dict[str, list[str]] = {}
        if not add_subcommands:
            self._add_arguments(self.parser)
            return
        subcommands = self.parser.add_subcommands()
        trainer_class = self._parsing.as_class(self.trainer_class)  # (a function returning a Trainer too)
        for name, skip in names.items():
            method = getattr(trainer_class, name)
            kwargs = {**main_kwargs, "description": self._parsing.short_description(method)}
            kwargs.update(self.parser_kwargs.get(name, {}))
            parser = self.init_parser(**kwargs)
            self._add_arguments(parser)
            self._subcommand_arguments[name] = parser.add_method_arguments(
                trainer_class, name, skip=set(skip), fail_untyped=False
            )
            self._subcommand_parsers[name] = parser
            subcommands.add_subcommand(name, parser, help=kwargs["description"])

    def add_default_arguments_to_parser(self, parser: CLIParser) -> None:
        parser.add_argument(
            "--seed_everything",
            type=bool | int,
            default=self.seed_everything_default,
            help="An int: seed everything with it before the classes are built. true: a random seed. false: none.",
        )

    def add_core_arguments_to_parser(self, parser: CLIParser) -> None:
        parser.add_class_arguments(
            self._parsing.as_class(self.trainer_class),
            "trainer",
            fail_untyped=False,
            instantiate=False,
            sub_configs=True,
        )
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        self._add_module_arguments(parser, self.model_class or TrainModule, "model", self.subclass_mode_model)
        cls = self.datamodule_class or DataModule
        self._add_module_arguments(
            parser, cls, "data", self.subclass_mode_data, self.datamodule_class is not None
        )

    def _add_module_arguments(self, parser: CLIParser, cls: Any, key: str, subclass: bool,
                              required: bool = True) -> None:  # fmt: skip
        cls = self._parsing.as_class(cls)
        if subclass:
            parser.add_subclass_arguments(cls, key, fail_untyped=False, required=required)
        else:
            parser.add_class_arguments(cls, key, fail_untyped=False, sub_configs=True)

    def add_arguments_to_parser(self, parser: CLIParser) -> None:
        """Override to add arguments or ``parser.link_arguments(...)``; called once per subcommand."""

    def _add_arguments(self, parser: CLIParser) -> None:
        self.add_default_arguments_to_parser(parser)
        self.add_core_arguments_to_parser(parser)
        self.add_arguments_to_parser(parser)
        if self.auto_configure_optimizers:
            self._parsing.add_optimizer_arguments(parser, ReduceLROnPlateau)

    def parse_arguments(self, parser: CLIParser, args: list[str] | dict[str, Any] | None) -> None:
        """``self.config``: ``args`` (a command line as a list, or a dict) or ``sys.argv`` parsed."""
        if isinstance(args, (dict, self._parsing.Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)

    def _parser(self, subcommand: str | None) -> CLIParser:
        return self.parser if subcommand is None else self._subcommand_parsers[subcommand]

    def _get(self, config: Any, key: str, default: Any = None) -> Any:
        """A config value, under the subcommand's namespace when there is one."""
        return config.get(str(self.subcommand), config).get(key, default)

    # -- seed, classes, run -----------------------------------------------------------------------------
    def _set_seed(self) -> None:
        seed = self._get(self.config, "seed_everything")
        if seed is False:
            return
        # True: every process of the run must draw the same seed; the Trainer's launcher passes it on.
        try:
            seed = seed_everything(shared_random_seed() if seed is True else seed)
        except ValueError as error:  # (out of range)
            self._parser(self.subcommand).error(f"--seed_everything: {error}")
        self.config[f"{self.subcommand}.seed_everything" if self.subcommand else "seed_everything"] = seed

    def before_instantiate_classes(self) -> None:
        """Override to run code after parsing and seeding, before any class is built."""

    def after_instantiate_classes(self) -> None:
        """Override to run code once the trainer, model and datamodule exist."""

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule: DataModule | None = self._get(self.config_init, "data")
        self.model: TrainModule = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model()
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, from the config's ``trainer`` group updated with ``kwargs``. A bad value the Trainer
        refuses (before it starts any process) is a command-line error naming the option (exit 2)."""
        config = {**self._get(self.config_init, "trainer", {}), **kwargs}
        if "callbacks" not in config:  # (a trainer_class function without a callbacks argument)
            warnings.warn(
                f"{self.trainer_class.__qualname__} takes no callbacks: the CLI's are left out", stacklevel=2
            )
            return self.trainer_class(**config)  # type: ignore[no-any-return]
        callbacks = config.get("callbacks")
        callbacks = (
            [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        )
        callbacks += [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        persistent = self.trainer_defaults.get("callbacks", [])
        callbacks += persistent if isinstance(persistent, list) else [persistent]
        if self.save_config_callback is not None and not config.get("fast_dev_run", False):
            parser = self._parser(self.subcommand)
            config_to_save = self.config.get(str(self.subcommand), self.config)
            callbacks.append(self.save_config_callback(parser, config_to_save, **self.save_config_kwargs))
        config["callbacks"] = callbacks
        try:
            return self.trainer_class(**config)
        except (TypeError, ValueError) as error:
            match = _NAMED_ARGUMENT.match(str(error))
            if match is None or match["name"] not in inspect.signature(self.trainer_class).parameters:
                raise
            self._parser(self.subcommand).error(f"--trainer.{match['name']}: {error}")

    @staticmethod
    def configure_optimizers(module: TrainModule, optimizer: torch.optim.Optimizer,
                             lr_scheduler: Any = None) -> Any:  # fmt: skip
        """What the module's ``configure_optimizers`` returns when ``--optimizer`` is given. Override to change."""
        if lr_scheduler is None:
            return optimizer
        if isinstance(lr_scheduler, ReduceLROnPlateau):
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": lr_scheduler, "monitor": lr_scheduler.monitor},
            }
        return [optimizer], [lr_scheduler]

    def _add_configure_optimizers_method_to_model(self) -> None:
        # Only an --optimizer of add_optimizer_args: one added with add_class_arguments is the user's to use.
        parser = self._parser(self.subcommand)
        config = self.config_init.get(str(self.subcommand), self.config_init)
        optimizer = self._parsing.automatic_spec(parser, "optimizer", config)
        if not optimizer:
            return
        scheduler = self._parsing.automatic_spec(parser, "lr_scheduler", config)
        if scheduler and scheduler["class_path"] == "torch.optim.lr_scheduler.ReduceLROnPlateau":
            self._parser(self.subcommand).error(
                "--lr_scheduler: torch's ReduceLROnPlateau does not say which metric to watch; use "
                "ember.trainer.cli.ReduceLROnPlateau (--lr_scheduler ReduceLROnPlateau) and --lr_scheduler.monitor"
            )
        if overridden(self.model, "configure_optimizers") is not None:
            warnings.warn(
                f"{type(self.model).__name__}.configure_optimizers is replaced by {type(self).__name__}."
                "configure_optimizers, as --optimizer was given",
                stacklevel=2,
            )
        build = self._parsing.instantiate_from

        # Built when the Trainer asks, after configure_model and before the strategy wraps the module.
        def configure(module: TrainModule) -> Any:
            built = build(optimizer, module.parameters())
            return self.configure_optimizers(module, built, build(scheduler, built) if scheduler else None)

        self.model.configure_optimizers = MethodType(configure, self.model)  # type: ignore[method-assign]

    def _run_subcommand(self, subcommand: str) -> None:
        before = getattr(self, f"before_{subcommand}", None)
        if callable(before):
            before()
        method = getattr(self, subcommand, getattr(self.trainer, subcommand))
        kwargs = {
            k: v
            for k, v in self.config_init[subcommand].items()
            if k in self._subcommand_arguments[subcommand]
        }
        kwargs["model"] = self.model
        if self.datamodule is not None:
            kwargs["datamodule"] = self.datamodule
        method(**kwargs)
        after = getattr(self, f"after_{subcommand}", None)
        if callable(after):
            after()
