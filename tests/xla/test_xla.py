"""XLA strategies on the XLA CPU device (``PJRT_DEVICE=CPU``), run in ``.venv-xla`` (torch 2.9 + torch_xla).

Each XLA run happens in a fresh interpreter: the runtime (device count, SPMD mode) is fixed at first
use. References are the same runs on plain CPU, computed in the same process.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import PYTHON, REPO, base_env, run_command, run_in_subprocess
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, Trainer, TrainModule

XLA_ENV = {"PJRT_DEVICE": "CPU"}
SCRIPT = Path(__file__).with_name("xla_script.py")


def _data(n: int = 160) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in a)


class Regression(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.forward_dtypes: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.net[0](x)  # the dtype autocast computes the first layer in
        self.forward_dtypes.add(str(hidden.dtype))
        return self.net[2](self.net[1](hidden))  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(_data(), batch_size=8, shuffle=True)


# -- one device: the Trainer ------------------------------------------------------------------------
def _trainer_worker(root: str) -> dict[str, Any]:
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met

    from ember.callbacks import Callback

    def count(name: str) -> int:
        data = met.metric_data(name)
        return int(data[0]) if data else 0

    class Counts(Callback):
        """Compilations and device-to-host transfers after every training batch."""

        def __init__(self) -> None:
            self.compiles: list[int] = []
            self.transfers: list[int] = []
            self.executions: list[int] = []

        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            # Executions run asynchronously after the step's sync: wait for them, so a count read
            # here covers this step (waiting moves no data to the host).
            xm.wait_device_ops()
            self.compiles.append(count("CompileTime"))
            self.transfers.append(count("TransferFromDeviceTime"))
            self.executions.append(count("ExecuteTime"))

    def fit(strategy: str, precision: str = "32-true", name: str = "run") -> tuple[Regression, Counts]:
        counts = Counts()
        module = Regression()
        trainer = Trainer(
            strategy=strategy, precision=precision, max_epochs=1, log_every_n_steps=10, seed=3,
            default_root_dir=f"{root}/{name}", callbacks=[counts], enable_checkpointing=False,
            enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module)
        return module, counts

    # XLA first: torch's autograd engine sizes its device queues at the first backward of a process.
    xla, counts = fit("xla", name="xla")
    bf16_mixed, _ = fit("xla", "bf16-mixed", name="bf16-mixed")
    bf16_true, _ = fit("xla", "bf16-true", name="bf16-true")
    cpu, _ = fit("single_device", name="cpu")
    return {
        "max_diff": _max_diff(xla.state_dict(), cpu.state_dict()),
        "device": str(next(xla.parameters()).device),
        "compiles": counts.compiles,
        "transfers": counts.transfers,
        "executions": counts.executions,
        "metrics_xla": (Path(root) / "xla/logs/version_0/metrics.csv").read_text(),
        "metrics_cpu": (Path(root) / "cpu/logs/version_0/metrics.csv").read_text(),
        "bf16_mixed": {
            "forward": sorted(bf16_mixed.forward_dtypes),
            "params": sorted({str(p.dtype) for p in bf16_mixed.parameters()}),
        },
        "bf16_true": {
            "forward": sorted(bf16_true.forward_dtypes),
            "params": sorted({str(p.dtype) for p in bf16_true.parameters()}),
        },
    }


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fresh process fits on CPU, then on XLA in 32-true, bf16-mixed and bf16-true."""
    result: dict[str, Any] = run_in_subprocess(
        _trainer_worker, str(tmp_path_factory.mktemp("fits")), env=XLA_ENV
    )
    return result


def test_trainer_on_one_xla_device(trainer_runs: dict[str, Any]) -> None:
    result = trainer_runs
    assert result["device"] == "xla:0"
    # Same seed, data order and optimizer as the CPU run: the same weights up to float rounding.
    assert result["max_diff"] < 1e-5
    xla_rows = [line.split(",") for line in result["metrics_xla"].splitlines()]
    cpu_rows = [line.split(",") for line in result["metrics_cpu"].splitlines()]
    assert xla_rows[0] == cpu_rows[0] and len(xla_rows) == len(cpu_rows) == 3  # header + steps 10 and 20
    for xla_row, cpu_row in zip(xla_rows[1:], cpu_rows[1:], strict=True):
        assert abs(float(xla_row[1]) - float(cpu_row[1])) < 1e-5
    # No recompilation per step once warm (AdamW's state appears at step 2: a second graph).
    compiles = result["compiles"]
    assert len(compiles) == 20 and compiles[-1] == compiles[2], compiles
    # One graph runs per step: cut after the optimizer step, never inside the user's step.
    executions = result["executions"]
    assert [b - a for a, b in itertools.pairwise(executions[2:])] == [1] * 17, executions
    # Logged values leave the device only when the loggers get a row (steps 10 and 20) and on
    # the progress bar's first read: never in between.
    transfers = result["transfers"]
    assert transfers[1:9] == [transfers[1]] * 8 and transfers[10:19] == [transfers[10]] * 9, transfers


def _profiled_worker(root: str, port: int) -> dict[str, Any]:
    import threading

    import torch_xla.debug.profiler as xp

    from ember.callbacks import Callback
    from ember.trainer.profilers import XLAProfiler

    class Capture(Callback):
        """Captures a second of the fit through the profiler server, as TensorBoard's plugin would."""

        thread: threading.Thread | None = None

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 2:  # the server started with the first step
                target = f"localhost:{port}"
                self.thread = threading.Thread(target=xp.trace, args=(target, f"{root}/trace"), kwargs={"duration_ms": 1000})  # fmt: skip
                self.thread.start()

        def on_train_end(self, trainer: Any, module: Any) -> None:
            assert self.thread is not None
            self.thread.join(timeout=60)

    class Validated(Regression):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

        def val_dataloader(self) -> DataLoader[Any]:
            return DataLoader(_data(32), batch_size=8)

    profiler = XLAProfiler(port=port)
    trainer = Trainer(
        strategy="xla", max_epochs=1, default_root_dir=root, profiler=profiler,
        callbacks=[Capture()], enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(Validated())
    files = [p.name for p in Path(root, "trace").rglob("*") if p.is_file()]
    return {
        "recorded": profiler.recorded,
        "files": files,
        "val_loss": float(trainer.callback_metrics["val_loss"]),
    }


def test_xla_profiler_traces_the_steps_and_serves_a_capture(tmp_path: Path) -> None:
    from dist_helpers import free_port

    result = run_in_subprocess(_profiled_worker, str(tmp_path), free_port(), env=XLA_ENV, timeout=120)
    recorded = result["recorded"]
    assert recorded == {
        "[Strategy]XLAStrategy.training_step": 20,  # 160 samples in batches of 8
        "[Strategy]XLAStrategy.backward": 20,
        "[Strategy]XLAStrategy.validation_step": 2 + 4,  # the sanity check, then the epoch's
    }, recorded
    assert any(name.endswith(".xplane.pb") for name in result["files"]), result["files"]
    assert math.isfinite(result["val_loss"])


def test_bf16_precisions_compute_in_bf16(trainer_runs: dict[str, Any]) -> None:
    result = trainer_runs
    assert result["bf16_mixed"] == {"forward": ["torch.bfloat16"], "params": ["torch.float32"]}
    assert result["bf16_true"] == {"forward": ["torch.bfloat16"], "params": ["torch.bfloat16"]}


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "64-true"])
@pytest.mark.parametrize("strategy", ["xla", "xla_spmd"])
def test_unsupported_precisions_are_clear_errors(strategy: str, precision: str) -> None:
    with pytest.raises(
        ValueError, match=f"precision='{precision}' is not supported by strategy='{strategy}'"
    ):
        Accelerator(strategy=strategy, precision=precision)


def test_several_processes_on_the_xla_cpu_device_are_refused_before_starting() -> None:
    os.environ["PJRT_DEVICE"] = "CPU"
    with pytest.raises(ValueError, match="cannot run 2 processes on the XLA CPU device.*9089"):
        Trainer(strategy="xla", devices=2)
    done = run_command(
        [PYTHON, "-m", "ember", "launch", "--strategy", "xla", "--nproc-per-node", "2", str(SCRIPT)]
    )
    assert done.returncode == 2 and "pytorch/xla#9089" in done.stderr
    done = run_command([PYTHON, "-m", "ember", "launch", "--strategy", "xla_spmd", "--nproc-per-node", "2", str(SCRIPT)])  # fmt: skip
    assert done.returncode == 2 and "runs one process that drives every device" in done.stderr


def _early_stop_worker() -> dict[str, Any]:
    import multiprocessing
    import threading

    accelerator = Accelerator(strategy="xla")
    loader = accelerator.prepare(DataLoader(_data(), batch_size=8, num_workers=2))

    def transfer_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if "worker" in t.name]

    during: list[str] = []
    devices = set()
    for i, (x, _) in enumerate(loader):
        devices.add(str(x.device))
        during = during or transfer_threads()
        if i == 1:
            break
    after = {"threads": transfer_threads(), "workers": len(multiprocessing.active_children())}
    full = sum(1 for _ in loader)  # the next pass still runs in full
    return {"devices": sorted(devices), "during": during, "after": after, "full": full,
            "end": {"threads": transfer_threads(), "workers": len(multiprocessing.active_children())}}  # fmt: skip


def test_a_pass_stopped_early_releases_its_transfer_threads_and_workers() -> None:
    # The batches of a pass come through background transfer threads fed by the DataLoader's
    # worker processes: a loop that breaks early must not leave them waiting until the process exits.
    result = run_in_subprocess(_early_stop_worker, env=XLA_ENV, timeout=120)
    assert result["devices"] == ["xla:0"] and result["during"], result
    assert result["after"] == {"threads": [], "workers": 0}, result
    assert result["full"] == 20 and result["end"] == {"threads": [], "workers": 0}, result


def _close_rows(a: list[list[str]], b: list[list[str]], tolerance: float) -> bool:
    """The same metrics.csv, numbers within ``tolerance`` (relative) of each other."""
    if len(a) != len(b) or a[0] != b[0]:
        return False
    for row_a, row_b in zip(a[1:], b[1:], strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            if (x == "") != (y == "") or (
                x and abs(float(x) - float(y)) > tolerance * max(1.0, abs(float(y)))
            ):
                return False
    return True


def test_trainer_resumes_on_xla_within_tolerance(tmp_path: Path) -> None:
    # The exact-resume run of the CPU tests (dropout, augmentation in 2 workers, a step scheduler,
    # accumulation, a crash mid-window) on one XLA device. The XLA generator's seed is checkpointed.
    from trainer_workers import fit

    full = run_in_subprocess(fit, str(tmp_path / "a"), "full", 0, "", 3, "xla", env=XLA_ENV, timeout=90)
    crashed = run_in_subprocess(fit, str(tmp_path / "b"), "crash", 7, "", 3, "xla", env=XLA_ENV, timeout=90)
    assert crashed == {"crashed": 7}
    ckpt = str(tmp_path / "b" / "checkpoints" / "epoch=1-step=6")
    resumed = run_in_subprocess(
        fit, str(tmp_path / "b"), "resume", 0, ckpt, 3, "xla", env=XLA_ENV, timeout=90
    )
    assert resumed["step"] == full["step"] == 15 and len(full["rows"]) > 20
    assert _close_rows(resumed["rows"], full["rows"], 1e-5)
    weights = [float.fromhex(v) for v in resumed["params"]]
    reference = [float.fromhex(v) for v in full["params"]]
    assert max(abs(a - b) for a, b in zip(weights, reference, strict=True)) < 1e-5


# -- SPMD on 2 virtual CPU devices ------------------------------------------------------------------
def _spmd_worker(strategy: str, checkpoint: str) -> dict[str, Any]:
    import torch_xla

    accelerator = Accelerator(strategy=strategy, devices=2)
    model = _net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(_data(), batch_size=16))
    specs = {}
    for x, y in loader:
        specs["batch"] = torch_xla._XLAC._get_xla_sharding_spec(x)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    # The single-device, full-batch run on plain CPU (after the XLA run: torch's autograd engine
    # sizes its device queues at the first backward of a process).
    reference = _net()
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for x, y in DataLoader(_data(), batch_size=16):
        F.mse_loss(reference(x), y).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    accelerator.save_state(checkpoint)  # full CPU tensors, also of sharded parameters
    weight = accelerator.unwrap_model(model)[0].weight
    specs["weight"] = torch_xla._XLAC._get_xla_sharding_spec(weight)
    specs["weight_state"] = torch_xla._XLAC._get_xla_sharding_spec(optimizer.state[weight]["exp_avg"])
    return {
        "devices": accelerator.strategy.num_devices,  # type: ignore[attr-defined]
        "processes": accelerator.num_processes,
        "max_diff": _max_diff(accelerator.unwrap_model(model).state_dict(), reference.state_dict()),
        "specs": specs,
        "weights": {k: v.cpu().tolist() for k, v in accelerator.unwrap_model(model).state_dict().items()},
    }


def _load_on_cpu(checkpoint: Path, weights: dict[str, Any]) -> None:
    accelerator = Accelerator(accelerator="cpu", strategy="single_device")
    model = _net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, _, _ = accelerator.prepare(model, optimizer, DataLoader(_data(), batch_size=16))
    accelerator.load_state(checkpoint)
    for name, value in accelerator.unwrap_model(model).state_dict().items():
        assert torch.equal(value, torch.tensor(weights[name])), name


def test_spmd_data_parallel_matches_the_full_batch_run(tmp_path: Path) -> None:
    result = run_in_subprocess(_spmd_worker, "xla_spmd", str(tmp_path / "ckpt"), env=XLA_ENV)
    assert result["devices"] == 2 and result["processes"] == 1
    assert result["specs"]["batch"].startswith("{devices=[2,1]")  # each device holds half of the batch
    assert result["specs"]["weight"] in ("", "{replicated}")
    assert result["max_diff"] < 1e-6
    _load_on_cpu(tmp_path / "ckpt", result["weights"])


def test_spmd_parameter_sharding_matches_the_full_batch_run(tmp_path: Path) -> None:
    result = run_in_subprocess(_spmd_worker, "xla_fsdp", str(tmp_path / "ckpt"), env=XLA_ENV)
    assert result["devices"] == 2
    assert result["specs"]["weight"].startswith("{devices=[2,1]")  # half of each weight per device
    assert result["specs"]["weight_state"].startswith("{devices=[2,1]")  # and of its optimizer state
    assert result["max_diff"] < 1e-6
    _load_on_cpu(tmp_path / "ckpt", result["weights"])  # the checkpoint holds the full tensors


# -- the multi-process path (ember launch --strategy xla) ----------------------------------------------
def _check_launched_run(out: Path, world_size: int) -> None:
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    for rank, result in enumerate(results):
        assert result["strategy"] == "xla" and result["world_size"] == world_size and result["rank"] == rank
        assert result["sum"] == [float(sum(range(1, world_size + 1)))] * 2
        assert result["max"] == [float(world_size)]
        assert result["gathered"] == [[float(r + 1)] for r in range(world_size)]
        assert result["broadcast"] == [1.0]
        assert result["max_diff_to_reference"] < 1e-5
    # The checkpoint (rank 0, CPU tensors, no pickle) loads on plain CPU with the trained weights.
    assert not list((out / "checkpoint").glob("*.pt")) and not list((out / "checkpoint").glob("*.bin"))
    accelerator = Accelerator(accelerator="cpu", strategy="single_device")
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.zeros(64, 4), torch.zeros(64, 1)), batch_size=8)
    model, _, _ = accelerator.prepare(model, optimizer, loader)
    accelerator.load_state(out / "checkpoint")
    saved = torch.tensor(results[0]["weight"])
    assert torch.equal(accelerator.unwrap_model(model).weight.detach(), saved)


def test_ember_launch_strategy_xla_with_real_collectives(tmp_path: Path) -> None:
    # One process (torch_xla runs no collectives between CPU processes), and XLA_ALWAYS_ALLREDUCE
    # makes torch_xla execute its all-reduce even so: gradients, reduce, gather and broadcast go
    # through the same XLA collectives as on a TPU pod.
    env = base_env(**XLA_ENV, XLA_ALWAYS_ALLREDUCE="1")
    done = run_command(
        [PYTHON, "-m", "ember", "launch", "--strategy", "xla", str(SCRIPT), str(tmp_path)],
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_launched_run(tmp_path, 1)


def test_the_seed_loop_runs_unchanged_under_ember_launch_strategy_xla() -> None:
    example = str(REPO / "examples" / "accelerate_loop.py")
    done = run_command(
        [PYTHON, "-m", "ember", "launch", "--strategy", "xla", example, "--epochs", "2"],
        env=base_env(**XLA_ENV),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 process(es), strategy=XLAStrategy" in done.stdout
    assert "epoch 1:" in done.stdout and "on 500 samples" in done.stdout


def _xla_hardware() -> tuple[dict[str, str], int] | None:
    """The environment and local device count of a TPU or GPU XLA runtime, or None on this machine.

    torch_xla picks TPU by itself when one is present; a GPU runtime is asked for with
    ``PJRT_DEVICE=CUDA``.
    """
    probe = (
        "import json, torch_xla, torch_xla.runtime as xr; "
        "print(json.dumps([xr.device_type(), xr.addressable_runtime_device_count()]))"
    )
    plain = {k: v for k, v in base_env().items() if k != "PJRT_DEVICE"}
    candidates = [plain]
    if torch.cuda.is_available():
        candidates.append({**plain, "PJRT_DEVICE": "CUDA"})
    for env in candidates:
        done = run_command([PYTHON, "-c", probe], env=env)
        if done.returncode == 0:
            kind, count = json.loads(done.stdout.strip().splitlines()[-1])
            if kind in ("TPU", "CUDA") and count > 1:
                return env, count
    return None


_HARDWARE = _xla_hardware()


@pytest.mark.skipif(
    _HARDWARE is None, reason="needs a TPU or GPU XLA runtime: XLA:CPU runs no multi-process collectives"
)
def test_ember_launch_strategy_xla_on_every_device(tmp_path: Path) -> None:
    assert _HARDWARE is not None
    env, count = _HARDWARE
    done = run_command(
        [PYTHON, "-m", "ember", "launch", "--strategy", "xla", "--nproc-per-node", str(count), str(SCRIPT), str(tmp_path)],
        env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_launched_run(tmp_path, count)


def test_a_bad_precision_stops_the_launched_script_before_it_writes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        PYTHON,
        "-m",
        "ember",
        "launch",
        "--strategy",
        "xla",
        "--precision",
        "16-mixed",
        str(SCRIPT),
        str(out),
    ]
    done = run_command(command, env=base_env(**XLA_ENV))
    assert done.returncode != 0
    assert "precision='16-mixed' is not supported by strategy='xla'" in done.stdout + done.stderr
    assert not out.exists()
