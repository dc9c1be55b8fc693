"""The wheel installs `ember` and nothing else: `import ember.strategies` works, `import trainer` fails."""

from __future__ import annotations

import re
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from dist_helpers import PYTHON, REPO, base_env


def test_wheel_installs_only_the_ember_package(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True,
        env=base_env(),
        capture_output=True,
    )
    (wheel,) = dist.glob("ember-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"ember"}
    # Every source file of the five folders lands in the wheel, under ember/ (subpackages included).
    for folder, prefix in (("ember", "ember"), ("trainer", "ember/trainer"), ("callbacks", "ember/callbacks"),
                           ("strategies", "ember/strategies"), ("precision", "ember/precision")):  # fmt: skip
        for source in (REPO / folder).rglob("*.py"):
            assert f"{prefix}/{source.relative_to(REPO / folder).as_posix()}" in names, source
    assert "ember/py.typed" in names

    # A fresh venv with the wheel; torch & co. come from this environment's site-packages through a
    # .pth file (the editable install's own .pth there is not processed, so only the wheel provides ember).
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    fresh_python = fresh / "bin" / "python"
    subprocess.run(
        [PYTHON, "-m", "pip", "--python", str(fresh_python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        env=base_env(),
        capture_output=True,
    )
    fresh_site = next((fresh / "lib").glob("python3*/site-packages"))
    (fresh_site / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    check = (
        "import ember, ember.strategies, ember.precision, ember.trainer, ember.callbacks\n"
        f"assert ember.__file__.startswith({str(fresh_site)!r}), ember.__file__\n"
        "for name in ('trainer', 'callbacks', 'strategies', 'precision'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'top-level {name} is importable')\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [str(fresh_python), "-c", check], env=base_env(), capture_output=True, text=True, cwd=str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert sys.prefix != str(fresh)


def _python_lines(code: str) -> list[str]:
    """The lines ``code`` prints, run in a fresh interpreter from the repository (which must succeed)."""
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO, env=base_env())
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_import_ember_leaves_heavy_optional_modules_unloaded() -> None:
    # `import ember` must cost little more than `import torch` (benchmarks/startup.py measures it):
    # optional dependencies and torch's heavy subpackages load when a feature needs them. The
    # callbacks that draw with rich import by name, and load rich only when they draw.
    heavy = ["deepspeed", "wandb", "tensorboard", "torchmetrics", "matplotlib", "rich", "sympy",
             "torch._dynamo", "torch.distributed.tensor", "torch.distributed.checkpoint", "torch_xla"]  # fmt: skip
    code = (
        "import sys, ember\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        # The Trainer layer loads with the first of its names: an Accelerator script never pays for it.
        "assert 'ember.trainer' not in sys.modules and 'ember.callbacks' not in sys.modules\n"
        "assert ember.Trainer.__module__ == 'ember.trainer.trainer' and 'ember.trainer' in sys.modules\n"
        "from ember import TrainModule, WandbLogger\n"
        "assert 'Trainer' in ember.__all__ and 'Trainer' in dir(ember)\n"
        "from ember.callbacks import ModelSummary, RichProgressBar, RunSummary\n"
        "import ember.callbacks as callbacks\n"
        "assert {'ModelSummary', 'RichProgressBar', 'RunSummary'} <= set(dir(callbacks))\n"
        "assert callbacks.RichProgressBar.__module__ == 'ember.callbacks.progress'\n"
        "print('rich' in sys.modules)\n"
    )
    assert _python_lines(code)[:2] == ["[]", "False"]


def test_a_single_device_run_imports_no_backend_or_callback_it_does_not_use() -> None:
    # Start-up (benchmarks/startup.py): the DDP/FSDP/DeepSpeed/XLA strategy modules (and torch's DDP
    # comm hooks) and the built-in callbacks load on first use, by class or by registry name.
    unused = ["ember.strategies.ddp", "ember.strategies.fsdp", "ember.strategies.deepspeed",
              "ember.strategies.xla", "ember.strategies.xla_spmd", "torch.distributed.algorithms.ddp_comm_hooks",
              "ember.callbacks.swa", "ember.callbacks.pruning", "ember.callbacks.weight_averaging",
              "ember.callbacks.finetuning", "ember.callbacks.early_stopping", "ember.callbacks.lr_monitor",
              "ember.callbacks.spike_detection", "ember.callbacks.throughput", "ember.callbacks.lr_finder",
              "ember.callbacks.batch_size_finder", "ember.callbacks.device_stats_monitor"]  # fmt: skip
    code = (
        "import sys, ember\n"
        "ember.Accelerator(cpu=True)\n"
        f"print(sorted(m for m in {unused[:6]!r} if m in sys.modules))\n"
        "import ember.callbacks\n"
        "ember.Trainer(accelerator='cpu', max_epochs=1)\n"
        f"print(sorted(m for m in {unused!r} if m in sys.modules))\n"
        "from ember.strategies import STRATEGY_REGISTRY\n"
        # An unknown name still lists every backend's names and refusals (those load to say why).
        "try:\n    STRATEGY_REGISTRY.check('ddp_spawn')\nexcept ValueError as error:\n    print(error)\n"
        "print(type(STRATEGY_REGISTRY.create('fsdp_offload')).__name__)\n"
    )
    lines = _python_lines(code)
    assert lines[:2] == ["[]", "[]"]
    assert "ember does not spawn or fork the ranks" in lines[2] and "'deepspeed_stage_3'" in lines[2]
    assert lines[3] == "FSDPStrategy"


def test_a_default_fit_imports_no_logger_profiler_cli_or_plugin_it_does_not_use(tmp_path: Path) -> None:
    # Start-up (issue 9): a default single-device fit (CSV logger, progress bar, checkpointing, model
    # summary, non-finite guard) does not import the CLI, the other loggers, the profilers, the
    # DeepSpeed/FSDP plugins nor the rich theme; each loads on first use of its name.
    unused = ["ember.trainer.cli", "jsonargparse", "ember.trainer.loggers.tensorboard_logger",
              "ember.trainer.loggers.wandb_logger", "ember.trainer.loggers.mlflow_logger",
              "ember.trainer.loggers.comet_logger", "ember.trainer.loggers.uploads",
              "ember.trainer.profilers.simple", "ember.trainer.profilers.advanced",
              "ember.trainer.profilers.pytorch", "ember.trainer.profilers.xla",
              "ember.plugins.deepspeed", "ember.plugins.fsdp", "ember.callbacks.rich_theme",
              # the Tuner and the searches it shares with the finder callbacks; Lightning's loop views;
              # Accelerate's kwargs handlers
              "ember.trainer.tuner", "ember.trainer.lr_finder", "ember.trainer.batch_size_finder",
              "ember.trainer.search_state", "ember.trainer.loop_views", "ember.kwargs_handlers"]  # fmt: skip
    code = (
        "import sys, torch\n"
        "from ember import Trainer, TrainModule\n"
        "class Tiny(TrainModule):\n"
        "    def __init__(self):\n        super().__init__()\n        self.layer = torch.nn.Linear(2, 1)\n"
        "    def training_step(self, batch, batch_idx):\n        return self.layer(batch).sum()\n"
        "    def configure_optimizers(self):\n        return torch.optim.SGD(self.parameters(), lr=0.1)\n"
        f"trainer = Trainer(max_steps=1, accelerator='cpu', default_root_dir={str(tmp_path)!r})\n"
        "trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2))\n"
        "assert trainer.global_step == 1 and trainer.checkpoint_callback.best_model_path\n"
        f"print(sorted(m for m in {unused!r} if m in sys.modules))\n"
        # Every name still resolves, and a profiler still resolves by its registry name.
        "from ember import DeepSpeedPlugin, FullyShardedDataParallelPlugin, TensorBoardLogger, TrainerCLI\n"
        "from ember.trainer import AdvancedProfiler, CometLogger, SimpleProfiler, XLAProfiler\n"
        "from ember.trainer.loggers import MLFlowLogger, WandbLogger\n"
        "from ember.trainer.profilers import PyTorchProfiler\n"
        "print(type(Trainer(accelerator='cpu', profiler='advanced', logger=False).profiler).__name__)\n"
        "from ember import AutocastKwargs, Tuner\n"
        "from ember.trainer import LRFinder\n"
        "from ember.trainer.loop_views import FitLoopView\n"
        "assert isinstance(trainer.fit_loop, FitLoopView) and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1\n"
        "assert Tuner.__module__ == 'ember.trainer.tuner' and LRFinder.__module__ == 'ember.trainer.lr_finder'\n"
        "assert AutocastKwargs.__module__ == 'ember.kwargs_handlers'\n"
    )
    lines = _python_lines(code)
    assert lines[-2:] == ["[]", "AdvancedProfiler"], lines


def test_every_public_strategy_and_callback_name_still_imports() -> None:
    import ember.callbacks
    import ember.plugins
    import ember.strategies
    import ember.trainer
    import ember.trainer.loggers
    import ember.trainer.profilers
    from ember.strategies import STRATEGY_REGISTRY

    packages = (
        ember.strategies,
        ember.callbacks,
        ember.trainer,
        ember.trainer.loggers,
        ember.trainer.profilers,
    )
    for package in (*packages, ember.plugins):
        for name in package.__all__:
            value = getattr(package, name)
            assert getattr(value, "__name__", name) == name and name in dir(package), (package.__name__, name)
    assert all(getattr(ember, name) is not None and name in dir(ember) for name in ember.__all__)
    names = STRATEGY_REGISTRY.names()
    for name in names:  # each name's module registers it (a deferred list out of date raises here)
        assert STRATEGY_REGISTRY.description(name)
    assert STRATEGY_REGISTRY.names() == names and {"ddp", "fsdp", "deepspeed_stage_3", "xla_fsdp"} <= set(
        names
    )
    assert type(STRATEGY_REGISTRY.create("deepspeed_stage_3")) is ember.strategies.DeepSpeedStrategy


def test_environment_variables_are_read_in_one_module_only() -> None:
    # STYLE.md: the strategy owns the process environment; strategies/environment.py reads it. A
    # variable read or defaulted by name anywhere else fails; setting one (os.environ[k] = v,
    # update) and handing the whole environment on (to a child process, to `ember env`) do not.
    reads = re.compile(
        r"os\.environ\.(get|setdefault|pop|copy|items|keys|values)\(|os\.getenv\(|in os\.environ\b"
        r"|os\.environ\[[^]]+\](?!\s*=[^=])|from os import .*environ|dict\(os\.environ"
    )
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for folder in ("ember", "trainer", "callbacks", "strategies", "precision")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path != REPO / "strategies" / "environment.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if reads.search(line.split("#")[0])
    ]
    assert not found, "\n".join(found)
