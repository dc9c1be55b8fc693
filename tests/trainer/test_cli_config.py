"""TrainerCLI (Lightning's LightningCLI): config files, command-line overrides, subclass mode, the saved
config.yaml, errors (exit 2), and a 2-process fit from plain python that parses the same on each rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from dist_helpers import PYTHON, REPO, run_command
from torch.utils.data import DataLoader, TensorDataset

from ember import CSVLogger, DataModule, TrainModule
from ember.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from ember.strategies import DDPStrategy
from ember.strategies.environment import shared_random_seed
from ember.trainer import TrainerCLI
from ember.trainer.cli import ReduceLROnPlateau, SaveConfigCallback
from ember.trainer.profilers import SimpleProfiler

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


class CliData(DataModule):
    def __init__(self, batch_size: int = 4, size: int = 16) -> None:
        self.batch_size, self.size = batch_size, size

    def train_dataloader(self) -> DataLoader[Any]:
        x = torch.linspace(-1, 1, self.size * 2).reshape(self.size, 2)
        return DataLoader(TensorDataset(x, x @ torch.tensor([[2.0], [-1.0]])), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader[Any]:
        return self.train_dataloader()


class CliLinear(TrainModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.layer: torch.nn.Module = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class CliMLP(CliLinear):
    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.layer = torch.nn.Sequential(
            torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )


class CliCounter(Callback):
    def __init__(self) -> None:
        self.fits = 0

    def on_fit_start(self, trainer, module):  # type: ignore[no-untyped-def]
        self.fits += 1


def _yaml(path: Path, content: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def _weights(module: torch.nn.Module) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in module.parameters()]


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return [_without_none(v) for v in value] if isinstance(value, list) else value


def _resolved(cli: TrainerCLI) -> dict[str, Any]:
    """The parsed config, less the names of the files it came from."""
    dumped = yaml.safe_load(cli.parser.dump(cli.config))
    section = dumped.get(cli.subcommand, dumped) if cli.subcommand else dumped
    section.pop("config", None)
    return dict(section)


def test_fit_from_yaml_configs_with_command_line_overrides(tmp_path: Path) -> None:
    base = _yaml(tmp_path / "base.yaml", {
        "trainer": {"max_epochs": 5, "default_root_dir": str(tmp_path), "log_every_n_steps": 1},
        "model": {"lr": 0.2}, "data": {"batch_size": 8},
    })  # fmt: skip
    later = _yaml(tmp_path / "later.yaml", {"data": {"batch_size": 2}, "seed_everything": 3})
    cli = TrainerCLI(CliLinear, CliData, args=["fit", "--config", base, "--config", later,
                                              "--trainer.max_epochs", "2", *QUIET])  # fmt: skip
    assert cli.subcommand == "fit"
    assert cli.trainer.current_epoch == 2 and cli.trainer.max_epochs == 2  # the command line wins
    assert cli.trainer.global_step == 2 * 8  # 16 samples / batch_size 2 (the later file wins)
    assert isinstance(cli.model, CliLinear) and cli.model.lr == 0.2 and isinstance(cli.datamodule, CliData)
    assert cli.config["fit"]["seed_everything"] == 3
    saved = yaml.safe_load((Path(cli.trainer.log_dir or "") / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 2 and saved["data"]["batch_size"] == 2
    assert saved["model"] == {"lr": 0.2} and saved["seed_everything"] == 3
    assert saved["trainer"]["accelerator"] is None  # every option is written, None included


def test_print_config_reloads_to_the_same_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _yaml(tmp_path / "a.yaml", {"trainer": {"max_epochs": 3, "logger": False}, "model": {"lr": 0.3}})
    args = ["fit", "--config", config, "--model.lr", "0.15", "--seed_everything", "11", *QUIET]
    args += ["--trainer.default_root_dir", str(tmp_path / "first")]
    with pytest.raises(SystemExit) as exited:
        TrainerCLI(CliLinear, CliData, args=[*args, "--print_config"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"] == {"lr": 0.15}
    direct = TrainerCLI(CliLinear, CliData, args=args)
    reloaded_file = _yaml(tmp_path / "printed.yaml", yaml.safe_load(printed))
    reloaded = TrainerCLI(CliLinear, CliData, args=["fit", "--config", reloaded_file,
                                                    "--trainer.default_root_dir", str(tmp_path / "second")])  # fmt: skip
    first, second = _resolved(direct), _resolved(reloaded)
    assert first.pop("trainer")["default_root_dir"] != second.pop("trainer")["default_root_dir"]
    assert first == second
    assert _weights(direct.model) == _weights(reloaded.model)  # same seed, same config: the same run
    assert direct.trainer.global_step == reloaded.trainer.global_step == 12


def test_subclass_mode_chooses_the_model_class(tmp_path: Path) -> None:
    common = ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    mlp = TrainerCLI(CliLinear, CliData, subclass_mode_model=True, run=False,
                     args=["--model", "CliMLP", "--model.hidden", "5", *common])  # fmt: skip
    assert type(mlp.model) is CliMLP and mlp.model.layer[0].out_features == 5
    dumped = _resolved(mlp)["model"]
    assert dumped == {"class_path": f"{CliMLP.__module__}.CliMLP", "init_args": {"hidden": 5, "lr": 0.05}}
    linear = TrainerCLI(CliLinear, CliData, subclass_mode_model=True, run=False,
                        args={"model": {"class_path": f"{CliLinear.__module__}.CliLinear",
                                        "init_args": {"lr": 0.4}}, "trainer": {"logger": False}})  # fmt: skip
    assert type(linear.model) is CliLinear and linear.model.lr == 0.4
    # No model class at all: any TrainModule, and the data class can be chosen too.
    free = TrainerCLI(run=False, args=["--model", "CliMLP", "--data", "CliData", "--data.size", "8", *common])
    assert type(free.model) is CliMLP and type(free.datamodule) is CliData and free.datamodule.size == 8


def test_callbacks_from_the_config_file_and_the_command_line(tmp_path: Path) -> None:
    config = _yaml(tmp_path / "c.yaml", {"trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path),
        "callbacks": [
            {"class_path": "ember.callbacks.EarlyStopping", "init_args": {"monitor": "val_loss", "patience": 7}},
            {"class_path": "ModelCheckpoint", "init_args": {"monitor": "val_loss", "save_top_k": 2}},
        ]}})  # fmt: skip
    persistent = CliCounter()
    cli = TrainerCLI(CliLinear, CliData, trainer_defaults={"callbacks": [persistent]},
                     args=["fit", "--config", config, "--trainer.callbacks+=LearningRateMonitor",
                           "--trainer.callbacks.logging_interval=step", *QUIET])  # fmt: skip
    callbacks = cli.trainer.callbacks
    stopping = [c for c in callbacks if isinstance(c, EarlyStopping)]
    assert len(stopping) == 1 and stopping[0].patience == 7 and stopping[0].monitor == "val_loss"
    checkpoint = cli.trainer.checkpoint_callback
    assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_top_k == 2
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2  # it was the one that ran
    monitors = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
    assert len(monitors) == 1
    assert persistent in callbacks and persistent.fits == 1
    assert sum(isinstance(c, SaveConfigCallback) for c in callbacks) == 1
    saved = yaml.safe_load((Path(cli.trainer.log_dir or "") / "config.yaml").read_text())
    # The persistent callback is the script's, not the config's: it is not saved.
    names = [c["class_path"].rpartition(".")[2] for c in saved["trainer"]["callbacks"]]
    assert names == ["EarlyStopping", "ModelCheckpoint", "LearningRateMonitor"]
    assert saved["trainer"]["callbacks"][2]["init_args"]["logging_interval"] == "step"


def test_logger_profiler_and_strategy_objects_from_the_config(tmp_path: Path) -> None:
    config = _yaml(tmp_path / "objects.yaml", {"trainer": {
        "logger": {"class_path": "ember.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "runs"}},
        "profiler": "simple"}})  # fmt: skip
    cli = TrainerCLI(CliLinear, CliData, run=False, args=["--config", config])
    assert isinstance(cli.trainer.logger, CSVLogger)
    assert cli.trainer.log_dir == str(tmp_path / "runs" / "version_0")
    assert isinstance(cli.trainer.profiler, SimpleProfiler)
    # A strategy's options are a keyword named config, as the --config option: both are understood.
    strategy = {"class_path": "ember.strategies.DDPStrategy",
                "init_args": {"config": {"find_unused_parameters": True}}}  # fmt: skip
    parsed = cli.parser.parse_object({"trainer": {"strategy": strategy}})
    built = cli.parser.instantiate_classes(parsed)["trainer"]["strategy"]
    assert isinstance(built, DDPStrategy) and built.config.find_unused_parameters is True


def test_saved_config_is_never_overwritten_unless_asked(tmp_path: Path) -> None:
    args = [
        "fit",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=1",
    ]
    TrainerCLI(CliLinear, CliData, args=[*args, *QUIET])
    saved = tmp_path / "config.yaml"  # no logger: the log_dir is default_root_dir
    assert yaml.safe_load(saved.read_text())["trainer"]["max_steps"] == 1
    with pytest.raises(RuntimeError, match=r"config\.yaml already exists; it is not overwritten"):
        TrainerCLI(CliLinear, CliData, args=[*args, "--model.lr=0.5", *QUIET])
    assert yaml.safe_load(saved.read_text())["model"]["lr"] == 0.1  # untouched
    TrainerCLI(
        CliLinear, CliData, save_config_kwargs={"overwrite": True}, args=[*args, "--model.lr=0.5", *QUIET]
    )
    assert yaml.safe_load(saved.read_text())["model"]["lr"] == 0.5
    TrainerCLI(CliLinear, CliData, save_config_callback=None, args=[*args, "--model.lr=0.7", *QUIET])
    assert yaml.safe_load(saved.read_text())["model"]["lr"] == 0.5  # no callback, no file


def test_run_false_parses_and_builds_without_running(tmp_path: Path) -> None:
    cli = TrainerCLI(CliMLP, CliData, run=False, trainer_defaults={"max_epochs": 4},
                     args=["--model.hidden=3", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert cli.subcommand is None and "subcommand" not in cli.config and "ckpt_path" not in cli.config
    assert cli.config["trainer"]["max_epochs"] == 4 and cli.trainer.max_epochs == 4
    assert cli.config["model"]["hidden"] == 3 and cli.model.layer[0].out_features == 3
    assert isinstance(cli.datamodule, CliData) and cli.trainer.global_step == 0
    assert isinstance(cli.config["seed_everything"], int)  # True became the seed drawn
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was written
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # the user runs it
    assert cli.trainer.current_epoch == 4


def test_optimizer_and_scheduler_from_the_command_line(tmp_path: Path) -> None:
    args = ["fit", "--optimizer=SGD", "--optimizer.lr=0.4", "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1",
            "--lr_scheduler.gamma=0.5", "--trainer.max_epochs=2", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", *QUIET]  # fmt: skip
    with pytest.warns(UserWarning, match="CliLinear.configure_optimizers is replaced"):
        cli = TrainerCLI(CliLinear, CliData, args=args)
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # 0.4, halved after each of 2 epochs
    with pytest.warns(UserWarning, match="configure_optimizers is replaced"):
        plateau = TrainerCLI(CliLinear, CliData, run=False, args=[
            "--optimizer=Adam", "--lr_scheduler=ReduceLROnPlateau", "--lr_scheduler.monitor=val_loss",
            "--trainer.logger=false"])  # fmt: skip
    configured = plateau.model.configure_optimizers()
    assert configured["lr_scheduler"]["monitor"] == "val_loss"
    assert type(configured["lr_scheduler"]["scheduler"]) is ReduceLROnPlateau


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--trainer.max_epoch=2"], ["unrecognized arguments: --trainer.max_epoch", "did you mean --trainer.max_epochs?"]),
        (["--trainer.bogus=1"], ["--trainer.bogus is not an option. Valid options:", "--trainer.max_steps"]),
        (["--trainer.max_epochs=abc"], ['"trainer.max_epochs"', "Expected a <class 'int'>"]),
        (["--trainer.strategy=nope"], ["--trainer.strategy: strategy='nope' is not a known strategy. Valid choices: 'auto', 'ddp'"]),
        (["--trainer.gradient_clip_algorithm=max"], ["Valid choices: 'norm', 'value'"]),
        (["--model.lrr=1"], ["did you mean --model.lr?"]),
    ],
)  # fmt: skip
def test_bad_options_exit_2_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], expected: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        TrainerCLI(CliLinear, CliData, args=["fit", f"--trainer.default_root_dir={tmp_path}", *options])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    for text in expected:
        assert text in error
    assert not list(tmp_path.iterdir())


def test_unknown_key_of_a_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _yaml(tmp_path / "typo.yaml", {"trainer": {"max_epoch": 2}})
    with pytest.raises(SystemExit) as exited:
        TrainerCLI(CliLinear, CliData, args=["fit", "--config", config])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert (
        "'trainer.max_epoch'" in error and "--trainer.max_epoch: did you mean --trainer.max_epochs?" in error
    )


def test_the_seed_drawn_for_true_is_shared_with_the_processes_started_later() -> None:
    environ: dict[str, str] = {}
    seed = shared_random_seed(environ)
    assert environ == {"EMBER_GLOBAL_SEED": str(seed)} and shared_random_seed(environ) == seed
    assert shared_random_seed({"EMBER_GLOBAL_SEED": "42"}) == 42


def test_importing_ember_does_not_import_jsonargparse() -> None:
    code = "import sys, ember, ember.trainer; ember.TrainerCLI; print('jsonargparse' in sys.modules)"
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_without_jsonargparse_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jsonargparse", None)  # (an import of it now fails)
    monkeypatch.delitem(sys.modules, "ember.trainer._cli_parser", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'ember\[cli\]'"):
        TrainerCLI(CliLinear, CliData, run=False, args=["--trainer.logger=false"])


SCRIPT = """
import json, os, sys, torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from ember import DataModule, TrainModule
from ember.trainer import TrainerCLI

class Data(DataModule):
    def __init__(self, size: int = 13) -> None:
        self.size = size
    def train_dataloader(self):
        x = torch.arange(2 * self.size, dtype=torch.float32).reshape(self.size, 2) / self.size
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2, shuffle=True)

class Model(TrainModule):
    def __init__(self, width: int = 1) -> None:
        super().__init__()
        with open(os.path.join(ROOT, "built.txt"), "a") as f:  # one line per process that built a model
            f.write(f"{os.getpid()}\\n")
        self.layer = torch.nn.Linear(2, width)
    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.layer(batch[0]).sum(1, keepdim=True), batch[1])

cli = TrainerCLI(Model, Data)
with open(os.path.join(ROOT, f"rank{cli.trainer.global_rank}.json"), "w") as f:
    json.dump({"config": cli.parser.dump(cli.config), "world": cli.trainer.world_size,
               "step": cli.trainer.global_step, "weight": cli.model.layer.weight.tolist()}, f)
"""


def test_two_process_fit_from_plain_python_parses_the_same_on_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("ROOT", repr(str(tmp_path))))
    config = _yaml(tmp_path / "run.yaml", {"trainer": {
        "accelerator": "cpu", "strategy": "ddp", "max_epochs": 2, "default_root_dir": str(tmp_path),
        "enable_progress_bar": False, "enable_model_summary": False}, "model": {"width": 3},
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}})  # fmt: skip
    result = run_command([PYTHON, str(script), "fit", "--config", config, "--trainer.devices", "2",
                          "--optimizer.lr", "0.05"], timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["config"] == ranks[1]["config"]  # the random seed included: the child inherited it
    parsed = yaml.safe_load(ranks[0]["config"])["fit"]
    assert isinstance(parsed["seed_everything"], int) and parsed["model"] == {"width": 3}
    assert parsed["optimizer"]["init_args"]["lr"] == 0.05  # (the module has no configure_optimizers)
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["step"] == 8  # 13 samples / (2 x 2), 2 epochs
    assert ranks[0]["weight"] == ranks[1]["weight"]
    written = sorted(tmp_path.rglob("config.yaml"))
    assert written == [tmp_path / "logs" / "version_0" / "config.yaml"]  # once, by rank 0
    saved = yaml.safe_load(written[0].read_text())
    assert _without_none(saved) == parsed  # (the saved file lists the options left at None too)
    assert len((tmp_path / "built.txt").read_text().split()) == 2

    # A bad value stops the run before the Trainer starts the second process: one model was ever built.
    (tmp_path / "built.txt").unlink()
    bad = run_command([PYTHON, str(script), "fit", "--config", config, "--trainer.devices", "2",
                       "--trainer.precision", "bf17"], timeout=120)  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert "--trainer.precision: precision='bf17' is not a known precision. Valid choices:" in bad.stderr
    assert len((tmp_path / "built.txt").read_text().split()) == 1
