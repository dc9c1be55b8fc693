"""The Trainer on 2 real processes: started by itself from `python train.py`, or by `ember launch`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dist_helpers import PYTHON, run_command, run_processes

EMBER = str(Path(PYTHON).parent / "ember")

SCRIPT = """
import json, sys, torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from ember import Trainer, TrainModule

class Model(TrainModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, sync_dist=True)
        return loss
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]), sync_dist=True)
    def predict_step(self, batch, batch_idx):
        return batch[0][:, 0]
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
    # Lightning's hooks, overridden: the step runs in the closure, the batches through the hooks
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
    def on_before_batch_transfer(self, batch, dataloader_idx):
        return [batch[0], batch[1]]

torch.manual_seed(0)
x = torch.arange(26, dtype=torch.float32).reshape(13, 2)
data = TensorDataset(x, x.sum(1, keepdim=True))
trainer = Trainer(devices=DEVICES, strategy="ddp", max_epochs=2, default_root_dir=ROOT, log_every_n_steps=1,
                  enable_progress_bar=False, enable_model_summary=False)
module = Model()
trainer.fit(module, DataLoader(data, batch_size=2, shuffle=True), DataLoader(data, batch_size=3))
predictions = torch.cat(trainer.predict(dataloaders=DataLoader(data, batch_size=2)))
with open(ROOT + f"/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"world": trainer.world_size, "step": trainer.global_step, "predictions": predictions.tolist(),
               "weight": module.layer.weight.tolist(), "argv": sys.argv[1:], "log_dir": trainer.log_dir,
               "version": trainer.logger.version}, f)
"""


def _write(tmp_path: Path, devices: str) -> Path:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.replace("DEVICES", devices).replace("ROOT", repr(str(tmp_path))))
    return script


def _check(tmp_path: Path) -> None:
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["step"] == 8  # 13 samples / (2 ranks x 2) -> 4 even steps per epoch
    assert ranks[0]["weight"] == ranks[1]["weight"]
    expected = [float(2 * i) for i in range(13)]  # predict: dataset order, each sample once
    assert ranks[0]["predictions"] == ranks[1]["predictions"] == expected
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    assert sum(1 for r in rows if r["val_loss"]) == 2 and not (tmp_path / "logs" / "version_1").exists()
    # every rank names rank 0's folder (Lightning's trainer.log_dir), not a version of its own
    assert ranks[0]["log_dir"] == ranks[1]["log_dir"] == str(tmp_path / "logs" / "version_0")
    assert ranks[0]["version"] == ranks[1]["version"] == 0


def test_trainer_devices_2_from_plain_python(tmp_path: Path) -> None:
    result = run_command([PYTHON, str(_write(tmp_path, "2")), "--flag"], timeout=180)
    assert result.returncode == 0, result.stderr
    _check(tmp_path)
    assert json.loads((tmp_path / "rank1.json").read_text())["argv"] == ["--flag"]


def test_trainer_under_ember_launch(tmp_path: Path) -> None:
    result = run_command(
        [EMBER, "launch", "--nproc-per-node", "2", str(_write(tmp_path, "'auto'"))], timeout=180
    )
    assert result.returncode == 0, result.stderr
    _check(tmp_path)


def _sync_worker(root: str) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ember import Trainer, TrainModule

    class Model(TrainModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            rank = float(self.trainer.global_rank)
            gathered = self.all_gather({"rank": torch.tensor([rank, -rank])})["rank"]  # (world, 2)
            self.log(
                "gathered", float(gathered.sum(1).abs().sum() + gathered[:, 0].sum()) + 10 * gathered.dim()
            )
            with torch.enable_grad():  # (validation runs without gradients)
                weight = self.layer.weight.sum() * (rank + 1)
                both = self.all_gather(weight, sync_grads=True)
                plain = self.all_gather(weight)
                both.sum().backward()  # through the gather, back to this process's weight
            self.log("grad_shape", float(both.shape[0]) + 10 * both.requires_grad + 100 * plain.requires_grad)
            self.log("grad", float(self.layer.weight.grad.sum()))
            self.log("synced", torch.tensor(rank), sync_dist=True)
            self.log("local", torch.tensor(rank))
            sampler = self.trainer.distributed_sampler_kwargs  # (Lightning's, for a sampler of one's own)
            self.log("sampler", float(sampler["num_replicas"] * 10 + sampler["rank"]))
            self.log("biggest", torch.tensor(rank), sync_dist=True, reduce_fx="max")

    # inference_mode=False: the gradients through all_gather above need autograd in validation_step.
    trainer = Trainer(default_root_dir=root, enable_progress_bar=False, logger=False, inference_mode=False)
    result = trainer.validate(Model(), DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2))
    return result[0]


def test_sync_dist_across_ranks(tmp_path: Path) -> None:
    ranks = run_processes(_sync_worker, str(tmp_path), nprocs=2)
    assert [r["synced"] for r in ranks] == [0.5, 0.5]
    assert [r["local"] for r in ranks] == [0.0, 1.0]
    assert [r["sampler"] for r in ranks] == [20.0, 21.0]
    assert [r["biggest"] for r in ranks] == [1.0, 1.0]
    assert [r["gathered"] for r in ranks] == [
        21.0,
        21.0,
    ]  # [[0, -0], [1, -1]]: 0 + 1 (column 0) + 10 * 2 dims
    assert [r["grad_shape"] for r in ranks] == [12.0, 12.0]  # 2 rows; sync_grads keeps the graph, plain not
    # Each step adds d(both ranks' sums)/d(this rank's weight) = 2 ranks' losses x (rank + 1) to the
    # gradient: 2 then 4 on rank 0 (2 batches each), logged as their mean; 4 then 8 on rank 1.
    assert [r["grad"] for r in ranks] == [3.0, 6.0]


def _gan_worker(strategy: str, batch_size: int, toggle: bool) -> list[float]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ember import Trainer, TrainModule

    class Gan(TrainModule):  # Lightning's manual-optimization GAN loop: two backward passes a step
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.g, self.d = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            g_opt, d_opt = self.optimizers()
            for opt, other, sign in ((d_opt, g_opt, -1.0), (g_opt, d_opt, 1.0)):
                if toggle:
                    self.toggle_optimizer(opt)
                loss = ((self.d(self.g(x)) + sign * y) ** 2).mean()
                opt.zero_grad()
                other.zero_grad()
                self.manual_backward(loss)
                opt.step()
                if toggle:
                    self.untoggle_optimizer(opt)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.g.parameters(), lr=0.1), torch.optim.SGD(self.d.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    module = Gan()
    trainer = Trainer(strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    return [float(p.sum()) for p in module.parameters()]


def test_manual_optimization_with_two_backward_passes_a_step_under_ddp() -> None:
    # DDP readies its reducer for one backward per forward; each manual_backward is readied anew (it
    # failed in torch's reducer). Two ranks on batches of 2 take the steps of one process on batches of 4.
    (expected,) = run_processes(_gan_worker, "auto", 4, False, nprocs=1)
    for strategy, toggle in (("ddp", False), ("ddp_find_unused_parameters_true", True)):
        ranks = run_processes(_gan_worker, strategy, 2, toggle, nprocs=2)
        assert ranks[0] == ranks[1]
        assert max(abs(a - b) for a, b in zip(ranks[0], expected, strict=True)) < 1e-6
