"""`ember env`, `ember config` + `ember launch --config-file`, and `ember plot`.

One real 2-process launch (the config round trip); every other case runs ``ember.cli.main`` in this
process, where a failed check exits with status 2 before anything starts.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from dist_helpers import PYTHON, REPO, run_command, run_in_subprocess
from torch.utils.data import DataLoader, TensorDataset

import ember
from ember import cli
from ember._launch_config import defaults, read_config, render_config, resolve_options
from ember.trainer import CSVLogger, Trainer, TrainModule

EMBER = str(Path(PYTHON).parent / "ember")
EXAMPLE = str(REPO / "examples" / "accelerate_loop.py")


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``ember ARGV``; it must exit with status 2; return its error output."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting torchrun fails the test: a rejected configuration must start nothing."""

    def launch(args: Any) -> int:
        raise AssertionError(f"ember launch started processes for {args}")

    monkeypatch.setattr(cli, "launch", launch)


# -- ember env --------------------------------------------------------------------------------------


def test_env_json_reports_versions_devices_and_the_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.1.2.3",
                        "MASTER_PORT": "29400", "EMBER_STRATEGY": "ddp", "EMBER_TOKEN": "s3cret",
                        "WANDB_API_KEY": "s3cret", "HOME_UNRELATED": "x"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    assert cli.main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ember"] == ember.__version__
    assert report["python"] == ".".join(str(part) for part in sys.version_info[:3])
    assert report["torch"]["version"] == str(torch.__version__)
    assert report["torch"]["cuda"] == torch.version.cuda
    for name in (
        "torch_xla",
        "deepspeed",
        "torchmetrics",
        "wandb",
        "tensorboard",
        "rich",
        "safetensors",
        "numpy",
    ):
        try:
            expected: str | None = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            expected = None  # printed as "not installed" in the text form
        assert report["packages"][name] == expected, name
    assert report["devices"]["cpu_count"] == os.cpu_count()
    assert report["devices"]["cuda_device_count"] == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0
    )
    assert report["process"] == {
        "source": "torchelastic", "rank": 1, "local_rank": 1, "world_size": 2, "local_world_size": 2,
        "node_rank": 0, "master_addr": "10.1.2.3", "master_port": 29400,
    }  # fmt: skip
    variables = report["environment_variables"]
    assert variables["EMBER_STRATEGY"] == "ddp" and variables["RANK"] == "1"
    assert variables["EMBER_TOKEN"] == "<redacted>"  # a report gets pasted in public
    assert "WANDB_API_KEY" not in variables and "HOME_UNRELATED" not in variables


def test_env_text_is_aligned_and_says_not_installed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "deepspeed":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert cli.main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # "name<two spaces or more>value": every value starts in the same column, in every section.
    matches = [re.match(r"^( *\S.*?)  +(\S.*)$", line) for line in lines]
    rows = {m.group(1).strip(): m.group(2) for m in matches if m is not None}
    assert len({m.start(2) for m in matches if m is not None}) == 1
    assert rows["ember"] == ember.__version__
    assert rows["deepspeed"] == "not installed"
    assert rows["numpy"] == importlib.metadata.version("numpy")
    assert rows["environment"] == "single: rank 0 of 1, local rank 0 of 1, node 0"
    assert rows["NCCL_DEBUG"] == "INFO"
    assert {"torch", "packages", "devices", "process", "environment variables"} <= set(lines)  # headings


def _env_in_a_fresh_process() -> dict[str, Any]:
    import ember._env

    before = set(sys.modules)
    ember._env.collect(os.environ)
    new = {name.split(".")[0] for name in set(sys.modules) - before}
    return {"new": sorted(new & {"deepspeed", "torch_xla", "wandb", "tensorboard"})}


def test_env_imports_no_optional_package() -> None:
    """Versions come from the metadata: DeepSpeed, torch_xla, wandb... are never imported for them."""
    assert run_in_subprocess(_env_in_a_fresh_process, timeout=120) == {"new": []}


# -- ember config / ember launch --config-file -----------------------------------------------------


def test_config_then_launch_runs_two_processes(tmp_path: Path) -> None:
    """The round trip, with real processes: the file's nproc_per_node and strategy reach torchrun."""
    config = tmp_path / "f.yaml"
    assert cli.main(["config", "--nproc-per-node", "2", "--strategy", "ddp", "--output", str(config)]) == 0
    assert read_config(str(config)) == {**defaults(), "nproc_per_node": 2, "strategy": "ddp"}
    result = run_command([EMBER, "launch", "--config-file", str(config), EXAMPLE, "--epochs", "1"])
    assert result.returncode == 0, result.stderr
    assert "2 process(es), strategy=DDPStrategy" in result.stdout


def _launch_args(argv: list[str]) -> Any:
    parser = cli._parser()
    args = parser.parse_args(["launch", *argv])
    cli._validate(parser, args)
    return args


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "f.yaml"
    config.write_text("nproc_per_node: 2\nstrategy: ddp\nprecision: 16\nmaster_port: 29555\n")
    args = _launch_args(["--config-file", str(config), "--nproc-per-node", "1", EXAMPLE, "--epochs", "1"])
    assert args.nproc_per_node == 1  # the command line wins
    assert args.strategy == "ddp" and args.precision == "16"  # YAML's int 16 is the alias "16"
    assert args.nnodes == 1 and args.max_restarts == 0  # not in the file: the defaults
    assert cli.torchrun_args(args)[:3] == ["--nproc-per-node=1", "--nnodes=1", "--max-restarts=0"]
    assert "--master-port=29555" in cli.torchrun_args(args)
    plain = _launch_args(["--config-file", str(config), EXAMPLE])
    assert plain.nproc_per_node == 2 and plain.strategy == "ddp"


def test_strategy_checked_against_the_merged_process_count(tmp_path: Path) -> None:
    config = tmp_path / "f.yaml"
    config.write_text("strategy: xla_spmd\n")
    assert resolve_options(dict.fromkeys(defaults()), str(config))["strategy"] == "xla_spmd"
    with pytest.raises(ValueError, match=r"config file '.*f.yaml': strategy 'xla_spmd' with 1 x 2 processes"):
        resolve_options({**dict.fromkeys(defaults()), "nproc_per_node": 2}, str(config))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nproc-per-node: 2\n",
         "unknown key 'nproc-per-node' (did you mean 'nproc_per_node'?). Valid keys: nproc_per_node, nnodes, "
         "node_rank, master_addr, master_port, max_restarts, strategy, precision, accelerator"),
        ("nproc_per_node: two\n", "f.yaml': nproc_per_node 'two' is not an integer (expected an integer >= 1)"),
        ("nproc_per_node: 0\n", "f.yaml': nproc_per_node 0 must be >= 1"),
        ("nproc_per_node: 1.5\n", "nproc_per_node 1.5 is not an integer"),
        ("nproc_per_node: true\n", "nproc_per_node True is not an integer"),
        ("nproc_per_node: null\n", "nproc_per_node is null; expected an integer >= 1"),
        ("master_port: 70000\n", "master_port 70000 must be in [1, 65535]"),
        ("nnodes: 2\nnode_rank: 2\n", "node_rank 2 must be in [0, 2) for nnodes 2"),
        ("strategy: fsdq\n", "strategy 'fsdq' is not a known strategy. Valid choices: 'auto', 'ddp'"),
        ("precision: fp7\n", "precision 'fp7' is not a known precision. Valid choices: '16-mixed'"),
        ("accelerator: tpu\n", "accelerator 'tpu' is not a valid choice. Valid choices: 'auto', 'cpu', 'cuda', 'gpu', 'xla'"),
        ("strategy: [ddp]\n", "strategy \"['ddp']\" is not a known strategy. Valid choices: 'auto', "),
        ("nproc_per_node: [2\n", "f.yaml' is not valid YAML at line 2, column 1: expected ',' or ']'"),
        ("- nproc_per_node: 2\n", "must be a mapping of launch options (key: value), not a list"),
        ("just text\n", "must be a mapping of launch options (key: value), not a str: 'just text'"),
    ],
)  # fmt: skip
def test_bad_config_files_fail_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: None, text: str, message: str
) -> None:
    config = tmp_path / "f.yaml"
    config.write_text(text)
    err = _fails(capsys, ["launch", "--config-file", str(config), EXAMPLE])
    assert f"config file {str(config)!r}" in err
    assert message in err


def test_missing_config_file_and_a_bad_flag_beside_a_good_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_launch: None
) -> None:
    err = _fails(capsys, ["launch", "--config-file", str(tmp_path / "nope.yaml"), EXAMPLE])
    assert "--config-file" in err and "nope.yaml' does not exist or is not a file" in err
    config = tmp_path / "f.yaml"
    config.write_text("nnodes: 2\n")
    # The command line's own value is named as a flag; the file's as a key.
    err = _fails(capsys, ["launch", "--config-file", str(config), "--node-rank", "5", EXAMPLE])
    assert "--node-rank 5 must be in [0, 2) for nnodes 2" in err and "config file" not in err


def test_config_writes_defaults_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: no prompt
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "ember_config.yaml"  # the default --output
    assert "wrote ember_config.yaml: nproc_per_node=1" in out
    assert "ember launch --config-file ember_config.yaml" in out
    assert yaml.safe_load(written.read_text()) == defaults()
    assert written.read_text().startswith("# ember launch options")  # commented, for people to edit


def test_config_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "f.yaml"
    config.write_text("# my settings\nnproc_per_node: 8\n")
    err = _fails(capsys, ["config", "--nproc-per-node", "2", "--output", str(config)])
    assert f"--output {str(config)!r} exists; pass --force to replace it" in err
    assert config.read_text() == "# my settings\nnproc_per_node: 8\n"
    assert cli.main(["config", "--nproc-per-node", "2", "--output", str(config), "--force"]) == 0
    assert read_config(str(config))["nproc_per_node"] == 2
    err = _fails(capsys, ["config", "--output", str(tmp_path)])
    assert "is a directory" in err
    assert [p.name for p in tmp_path.iterdir()] == ["f.yaml"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--node-rank", "1"], "--node-rank 1 must be in [0, 1) for --nnodes 1"),
        (["--strategy", "fsdq"], "--strategy 'fsdq' is not a known strategy"),
        (["--nproc-per-node", "0"], "--nproc-per-node 0 must be >= 1"),
        (["--accelerator", "tpu"], "--accelerator 'tpu' is not a valid choice"),
        (["--strategy", "xla_spmd", "--nproc-per-node", "2"], "--strategy 'xla_spmd' with 1 x 2 processes"),
    ],
)
def test_config_validates_like_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    err = _fails(capsys, ["config", *argv, "--output", str(tmp_path / "f.yaml")])
    assert message in err
    assert not (tmp_path / "f.yaml").exists()


def test_rendered_file_reads_back() -> None:
    values = {**defaults(), "nproc_per_node": 4, "master_port": 29500, "precision": "32", "strategy": "auto",
              "master_addr": "10.0.0.1", "accelerator": "cpu"}  # fmt: skip
    assert yaml.safe_load(render_config(values)) == values  # "32" stays a string, 10.0.0.1 too


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_config_asks_on_a_terminal_and_asks_again_on_bad_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [
        "two", "2",     # nproc_per_node: not an integer, asked again
        "",             # nnodes: Enter keeps 1
        "1", "0",       # node_rank: 1 is not in [0, 1)
        "", "",         # master_addr, master_port
        "-1", "3",      # max_restarts
        "fsdq", "ddp",  # strategy: unknown, then ddp
        "bf16",         # precision (an alias)
        "",             # accelerator: Enter keeps none
    ]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", _Terminal("\n".join(answers) + "\n"))
    config = tmp_path / "f.yaml"
    assert cli.main(["config", "--output", str(config)]) == 0
    out = capsys.readouterr().out
    assert "nproc_per_node 'two' is not an integer (expected an integer >= 1); try again" in out
    assert "node_rank 1 must be in [0, 1) for nnodes 1; try again" in out
    assert "max_restarts -1 must be >= 0; try again" in out
    assert "strategy 'fsdq' is not a known strategy" in out
    assert "nproc_per_node - processes per node [1]: " in out
    assert read_config(str(config)) == {**defaults(), "nproc_per_node": 2, "max_restarts": 3,
                                        "strategy": "ddp", "precision": "bf16"}  # fmt: skip


def test_config_interactive_flag_prefills_answers_from_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--interactive asks even when stdin is a pipe; flags given become the values shown."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n" * 6 + "\n" + "none\n" + "\n"))
    config = tmp_path / "f.yaml"
    argv = [
        "config",
        "--interactive",
        "--strategy",
        "fsdp",
        "--precision",
        "bf16-mixed",
        "--output",
        str(config),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "strategy - default strategy of the script's Accelerator/Trainer: auto or a registered name [fsdp]: \n"
        in out
    )
    assert read_config(str(config)) == {**defaults(), "strategy": "fsdp", "precision": None}


def test_config_input_ending_early_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("2\n"))
    err = _fails(capsys, ["config", "--interactive", "--output", str(tmp_path / "f.yaml")])
    assert "stdin ended before every option was answered; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


# -- ember plot -------------------------------------------------------------------------------------


class _Regressor(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/reg/version_0: a real 2-epoch fit; runs/reg/version_1: written by hand, with an extra lr column."""
    root = tmp_path_factory.mktemp("plot") / "runs"
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, generator=g), torch.randn(16, 1, generator=g))
    trainer = Trainer(max_epochs=2, logger=CSVLogger(root, name="reg"), log_every_n_steps=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(root))  # fmt: skip
    trainer.fit(_Regressor(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    hand = root / "reg" / "version_1"
    hand.mkdir(parents=True)
    with open(hand / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr", "epoch", "val_loss"])
        for step in range(1, 9):
            writer.writerow([step, 1.0 / step, 0.1 * 0.9**step, (step - 1) // 4, ""])
            if step % 4 == 0:
                writer.writerow([step, "", "", (step - 1) // 4, 0.5 / step])
    return root


def _image(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(imread(path))


def _has_colour(image: np.ndarray, rgb: tuple[float, float, float]) -> bool:
    return bool((np.abs(image[..., :3] - np.array(rgb)) < 0.02).all(axis=-1).any())


_BLUE, _ORANGE = (0.122, 0.467, 0.706), (1.0, 0.498, 0.055)  # matplotlib's first two line colours


def test_plot_draws_every_metric_of_every_run(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logged = list(csv.DictReader(open(runs / "reg" / "version_0" / "metrics.csv")))
    assert {"step", "epoch", "loss", "val_loss"} <= set(logged[0])  # what CSVLogger wrote
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"run version_0: {len(logged)} rows" in printed and "run version_1: 10 rows" in printed
    assert "  loss: 2 run(s), 16 points, per step" in printed
    assert "  val_loss: 2 run(s), 4 points, per epoch" in printed
    assert "  lr: 1 run(s), 8 points, per step" in printed
    assert f"wrote {out} (1500 x 350 pixels, 3 metric(s), 2 run(s))" in printed  # 3 subplots in a row
    image = _image(out)
    assert image.shape == (350, 1500, 4)
    assert _has_colour(image, _BLUE) and _has_colour(image, _ORANGE)  # one line per run
    right = image[:, 1000:]  # the third subplot, lr: only version_1 (the second colour) has it
    assert _has_colour(right, _ORANGE) and not _has_colour(right, _BLUE)


def test_plot_selected_metrics_and_several_run_dirs(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "val.png"
    argv = ["plot", str(runs / "reg" / "version_0"), str(runs / "reg" / "version_1"), "--metrics", "val_loss"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "  val_loss: 2 run(s), 4 points, per epoch" in printed and "  loss:" not in printed
    assert _image(out).shape == (350, 500, 4)
    # An earlier picture is replaced: re-running a plot is the normal thing to do.
    assert cli.main([*argv, "--metrics", "loss,lr", "--out", str(out)]) == 0
    assert _image(out).shape == (350, 1000, 4)


def test_plot_errors(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "c.png")
    assert "RUN_DIR " + repr(str(empty)) + " holds no metrics.csv" in _fails(
        capsys, ["plot", str(empty), "--out", out]
    )
    missing = str(tmp_path / "nope")
    assert f"RUN_DIR {missing!r} does not exist" in _fails(capsys, ["plot", missing, "--out", out])
    err = _fails(capsys, ["plot", str(runs), "--metrics", "val_los", "--out", out])
    assert (
        "unknown metric 'val_los' in --metrics (did you mean 'val_loss'?); available: loss, val_loss, lr"
        in err
    )
    err = _fails(capsys, ["plot", str(runs), "--out", str(tmp_path / "c.jpg")])
    assert "must end in .png: ember plot writes a PNG image" in err
    precious = tmp_path / "notes.png"
    precious.write_text("not a picture")
    err = _fails(capsys, ["plot", str(runs), "--out", str(precious)])
    assert "exists and is not a PNG image" in err and precious.read_text() == "not a picture"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.csv").write_text("step,loss\n1,0.5\n2,oops\n")
    assert "line 3: loss 'oops' is not a number" in _fails(capsys, ["plot", str(bad), "--out", out])
    (bad / "metrics.csv").write_text("loss\n0.5\n")
    assert "has no 'step' column (columns: loss)" in _fails(capsys, ["plot", str(bad), "--out", out])
    (bad / "metrics.csv").write_text("step,epoch\n1,0\n")
    assert "no metric values to plot" in _fails(capsys, ["plot", str(bad), "--out", out])
    assert not Path(out).exists() and not list(tmp_path.glob(".c.png*"))


def test_plot_without_matplotlib_says_how_to_install(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    err = _fails(capsys, ["plot", str(runs), "--out", str(tmp_path / "c.png")])
    assert "ember plot needs matplotlib: pip install 'ember[plot]'" in err


def test_launch_takes_accelerates_config_file_spelling(tmp_path: Path) -> None:
    """`accelerate launch --config_file`: the same option as --config-file, like --num_processes."""
    config = tmp_path / "f.yaml"
    config.write_text("nproc_per_node: 2\nstrategy: ddp\n")
    args = _launch_args(["--config_file", str(config), EXAMPLE, "--config_file", "x"])
    assert (args.nproc_per_node, args.strategy) == (2, "ddp")
    assert args.script_args == ["--config_file", "x"]  # after SCRIPT: the script's own
