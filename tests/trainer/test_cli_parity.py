"""TrainerCLI against Lightning's LightningCLI: a trainer_class that is a function, add_optimizer_args /
add_lr_scheduler_args with fixed classes, add_lightning_class_args' callbacks, options before the subcommand,
a description for each Trainer option in ``fit --help``."""

from __future__ import annotations

import inspect
import pydoc
import re
from pathlib import Path

import pytest
import torch

from ember import Trainer
from ember.callbacks import Callback, EarlyStopping
from ember.trainer import TrainerCLI
from tests.trainer.test_cli_config import QUIET, CliData, CliLinear


def _trainer(
    max_epochs: int = 1, default_root_dir: str | None = None, callbacks: list[Callback] | None = None
) -> Trainer:
    return Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=default_root_dir, callbacks=callbacks)  # fmt: skip


def _bare_trainer(max_epochs: int = 1) -> Trainer:
    return Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_trainer_class_may_be_a_function_returning_a_trainer(tmp_path: Path) -> None:
    cli = TrainerCLI(CliLinear, CliData, trainer_class=_trainer,
                     args=["fit", "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert isinstance(cli.trainer, Trainer) and cli.trainer.current_epoch == 2
    assert (tmp_path / "config.yaml").is_file()
    with pytest.warns(UserWarning, match="_bare_trainer takes no callbacks"):  # (Lightning warns too)
        bare = TrainerCLI(
            CliLinear, CliData, trainer_class=_bare_trainer, run=False, args=["--trainer.max_epochs=3"]
        )
    assert bare.trainer.max_epochs == 3


class _FixedOptimizers(TrainerCLI):
    def add_arguments_to_parser(self, parser):  # type: ignore[no-untyped-def]
        parser.add_optimizer_args(torch.optim.Adam)
        parser.add_lr_scheduler_args(torch.optim.lr_scheduler.ExponentialLR)


def test_add_optimizer_args_with_one_class_is_configured_automatically(tmp_path: Path) -> None:
    args = ["--optimizer.lr=0.02", "--lr_scheduler.gamma=0.5", "--trainer.logger=false"]
    with pytest.warns(UserWarning, match="configure_optimizers is replaced"):
        cli = _FixedOptimizers(CliLinear, CliData, run=False, args=args)
    optimizers, schedulers = cli.model.configure_optimizers()
    assert type(optimizers[0]) is torch.optim.Adam and optimizers[0].defaults["lr"] == 0.02
    assert type(schedulers[0]) is torch.optim.lr_scheduler.ExponentialLR and schedulers[0].gamma == 0.5
    with pytest.raises(SystemExit):  # the class is fixed: no --optimizer CLASS
        _FixedOptimizers(CliLinear, CliData, run=False, args=["--optimizer=SGD"])


def test_an_option_before_the_subcommand_says_to_put_it_after(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        TrainerCLI(CliLinear, CliData, args=["--trainer.max_epochs=3", "fit", *QUIET])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--trainer.max_epochs is an option of the subcommands (fit, validate, test, predict)" in error
    assert "--print_shtab" not in error


class _ForcedCallback(TrainerCLI):
    def add_arguments_to_parser(self, parser):  # type: ignore[no-untyped-def]
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val_loss"})


def test_add_lightning_class_args_adds_a_callback_every_run_has() -> None:
    cli = _ForcedCallback(
        CliLinear, CliData, run=False, args=["--early_stopping.patience=7", "--trainer.logger=false"]
    )
    stopping = [c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)]
    assert len(stopping) == 1 and stopping[0].patience == 7 and stopping[0].monitor == "val_loss"
    with pytest.raises(
        ValueError,
        match=r"add_lightning_class_args: torch.nn.modules.linear.Linear is not a subclass of one of Callback",
    ):
        TrainerCLI(
            CliLinear, CliData, run=False, args=["--trainer.logger=false"]
        ).parser.add_lightning_class_args(torch.nn.Linear, "x")


def _help_entries(text: str) -> dict[str, str]:
    """``{option: its help}`` of an argparse help text, each on one line (and without the type and default)."""
    entries = {}
    for entry in re.split(r"\n  (?=-)", text):
        invocation, *help_text = re.split(r"\s{2,}|\n", entry.strip(), maxsplit=1)
        entries[invocation.split()[0].rstrip(",")] = (
            " ".join("".join(help_text).split()).split("(type:")[0].strip()
        )
    return entries


def test_fit_help_describes_every_trainer_argument(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As LightningCLI's: each --trainer.* option with its description, from the Trainer's docstring.
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit) as exited:
        TrainerCLI(CliLinear, CliData, args=["fit", "--help"])
    assert exited.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    assert "None: 1000" in entries["--trainer.max_epochs"]
    assert "-1: no epoch limit" in entries["--trainer.max_epochs"]
    assert '"bf16-mixed"' in entries["--trainer.precision"]
    assert "before each optimizer step" in entries["--trainer.accumulate_grad_batches"]
    assert "a fraction of the epoch" in entries["--trainer.val_check_interval"]
    names = [p.name for p in inspect.signature(Trainer).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert len(names) > 40
    undescribed = [name for name in names if not entries.get(f"--trainer.{name}")]
    assert not undescribed, f"Trainer arguments without a description in fit --help: {undescribed}"
    assert "accumulate_grad_batches: Batches" in pydoc.render_doc(Trainer, renderer=pydoc.plaintext)  # help()
