"""``BasePredictionWriter``: each process writes its own predictions, with their samples' dataset
indices, at the batch and/or epoch interval (Lightning's shapes), on 1 and on 2 real processes."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_processes
from torch.utils.data import DataLoader, IterableDataset, Sampler, TensorDataset

from ember import Trainer, TrainModule
from ember.callbacks import BasePredictionWriter, Callback

N = 13  # samples: with batches of 3, 5 batches, the last one short


def _inputs(n: int = N) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(3))


def _dataset(n: int = N) -> TensorDataset:
    """Sample ``i`` is ``(x[i], i)``: a batch carries its own dataset indices, to check them against."""
    return TensorDataset(_inputs(n), torch.arange(n))


class Net(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.layer(batch[0]) + 100 * dataloader_idx


def _net() -> Net:
    torch.manual_seed(11)
    return Net()


def _expected(net: Net, indices: list[int], dataloader_idx: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return net.layer(_inputs()[indices]) + 100 * dataloader_idx


class Recorder(BasePredictionWriter):
    """Keeps every call's arguments (and checks each batch against its indices)."""

    def __init__(self, write_interval: str = "batch") -> None:
        super().__init__(write_interval)
        self.batches: list[dict[str, Any]] = []
        self.epochs: list[tuple[Any, Any]] = []

    def write_on_batch_end(self, trainer, module, prediction, batch_indices, batch, batch_idx, dataloader_idx):  # type: ignore[no-untyped-def]  # fmt: skip
        self.batches.append(
            {"prediction": prediction.clone(), "indices": batch_indices, "batch_idx": batch_idx,
             "dataloader_idx": dataloader_idx, "carried": batch[1].tolist()}
        )  # fmt: skip

    def write_on_epoch_end(self, trainer, module, predictions, batch_indices):  # type: ignore[no-untyped-def]
        self.epochs.append((predictions, batch_indices))


def _trainer(tmp_path: Path, *callbacks: Callback, **kwargs: Any) -> Trainer:
    return Trainer(default_root_dir=tmp_path, callbacks=list(callbacks), logger=False,
                   enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


# -- arguments ---------------------------------------------------------------------------------------
def test_a_bad_write_interval_names_the_argument_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"write_interval='step'.*'batch', 'epoch', 'batch_and_epoch'"):
        Recorder("step")
    with pytest.raises(ValueError, match="write_interval=None"):
        Recorder(None)  # type: ignore[arg-type]


def test_a_writer_that_does_not_override_its_intervals_method_is_refused() -> None:
    class BatchOnly(BasePredictionWriter):
        def write_on_batch_end(self, *args: Any) -> None: ...

    BatchOnly("batch")
    with pytest.raises(
        TypeError, match=r"BatchOnly\(write_interval='epoch'\) must override write_on_epoch_end"
    ):
        BatchOnly("epoch")
    with pytest.raises(TypeError, match="write_on_epoch_end"):
        BatchOnly("batch_and_epoch")
    assert Recorder().interval.on_batch and not Recorder().interval.on_epoch


# -- one process -------------------------------------------------------------------------------------
def test_batch_interval_gets_each_batch_with_its_indices_and_keeps_nothing(tmp_path: Path) -> None:
    writer = Recorder("batch")
    seen: list[Any] = []

    class Spy(Callback):
        def on_predict_epoch_end(self, trainer: Any, module: Any) -> None:
            seen.append(
                (trainer.prediction_record.predictions, trainer.prediction_record.epoch_batch_indices)
            )

    net = _net()
    result = _trainer(tmp_path, writer, Spy()).predict(
        net, DataLoader(_dataset(), batch_size=3), return_predictions=False
    )
    assert result is None
    assert [b["indices"] for b in writer.batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12]]
    assert [b["batch_idx"] for b in writer.batches] == [0, 1, 2, 3, 4]
    assert {b["dataloader_idx"] for b in writer.batches} == {0}
    for b in writer.batches:
        assert b["carried"] == b["indices"]
        torch.testing.assert_close(b["prediction"], _expected(net, b["indices"]))
    assert writer.epochs == []
    assert seen == [([[]], [[]])]  # a batch writer alone: the run's outputs are not kept


def test_epoch_interval_gets_lightnings_shapes_even_without_return_predictions(tmp_path: Path) -> None:
    writer = Recorder("epoch")
    net = _net()
    assert (
        _trainer(tmp_path, writer).predict(
            net, DataLoader(_dataset(), batch_size=5), return_predictions=False
        )
        is None
    )
    assert writer.batches == []
    [(predictions, indices)] = writer.epochs
    # One loader: the predictions are the per-batch list, the indices a list per loader (Lightning's).
    assert indices == [[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12]]]
    assert len(predictions) == 3
    for prediction, batch in zip(predictions, indices[0], strict=True):
        assert prediction.device.type == "cpu"
        torch.testing.assert_close(prediction, _expected(net, batch))


def test_batch_and_epoch_with_return_predictions_returns_what_it_did_before(tmp_path: Path) -> None:
    writer = Recorder("batch_and_epoch")
    net = _net()
    loader = DataLoader(_dataset(), batch_size=4)
    returned = _trainer(tmp_path, writer).predict(net, loader, return_predictions=True)
    plain = _trainer(tmp_path).predict(net, loader)  # no writer: the Trainer's own result
    assert returned is not None and plain is not None
    torch.testing.assert_close(torch.cat(returned), torch.cat(plain))
    torch.testing.assert_close(torch.cat(returned), _expected(net, list(range(N))))
    assert len(writer.batches) == 4 and len(writer.epochs) == 1
    predictions, indices = writer.epochs[0]
    assert indices == [[b["indices"] for b in writer.batches]]
    torch.testing.assert_close(torch.cat(predictions), torch.cat(returned))


def test_several_dataloaders_pass_their_index_and_a_list_per_loader(tmp_path: Path) -> None:
    writer = Recorder("batch_and_epoch")
    net = _net()
    loaders = [
        DataLoader(_dataset(), batch_size=6),
        DataLoader(_dataset(), batch_size=5, sampler=[12, 0, 7, 3]),
    ]
    returned = _trainer(tmp_path, writer).predict(net, loaders)
    assert returned is not None and len(returned) == 2
    assert [(b["dataloader_idx"], b["batch_idx"], b["indices"]) for b in writer.batches] == [
        (0, 0, [0, 1, 2, 3, 4, 5]), (0, 1, [6, 7, 8, 9, 10, 11]), (0, 2, [12]), (1, 0, [12, 0, 7, 3]),
    ]  # fmt: skip
    for b in writer.batches:
        assert b["carried"] == b["indices"]
        torch.testing.assert_close(b["prediction"], _expected(net, b["indices"], b["dataloader_idx"]))
    [(predictions, indices)] = writer.epochs
    assert indices == [[[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12]], [[12, 0, 7, 3]]]
    assert [len(p) for p in predictions] == [3, 1]  # several loaders: a list per loader
    torch.testing.assert_close(predictions[1][0], _expected(net, [12, 0, 7, 3], 1))


def test_shuffled_loader_workers_and_limit(tmp_path: Path) -> None:
    writer = Recorder("batch_and_epoch")
    net = _net()
    loader = DataLoader(_dataset(), batch_size=2, shuffle=True, num_workers=2)
    _trainer(tmp_path, writer, limit_predict_batches=4).predict(net, loader, return_predictions=False)
    indices = [b["indices"] for b in writer.batches]
    assert len(indices) == 4 and writer.epochs[0][1] == [indices]
    flat = [i for batch in indices for i in batch]
    assert len(set(flat)) == 8 and flat != sorted(flat)  # shuffled, each sample once
    for b in writer.batches:
        assert b["carried"] == b["indices"]  # the workers fetched the samples the indices name
        torch.testing.assert_close(b["prediction"], _expected(net, b["indices"]))


class _Stream(IterableDataset):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(_inputs(), torch.arange(N), strict=True)


def test_an_iterable_dataset_has_no_indices_as_in_lightning(tmp_path: Path) -> None:
    writer = Recorder("batch_and_epoch")
    with pytest.warns(UserWarning, match="IterableDataset.*batch_indices=\\[\\]"):
        _trainer(tmp_path, writer).predict(
            _net(), DataLoader(_Stream(), batch_size=5), return_predictions=False
        )
    assert [b["indices"] for b in writer.batches] == [[], [], []]
    assert [b["carried"] for b in writer.batches][2] == [10, 11, 12]
    predictions, indices = writer.epochs[0]
    assert indices == [[]] and len(predictions) == 3


def test_without_a_writer_nothing_is_recorded(tmp_path: Path) -> None:
    records: list[Any] = []

    class Spy(Callback):
        def on_predict_batch_end(self, trainer: Any, *args: Any) -> None:
            records.append(trainer.prediction_record)

    trainer = _trainer(tmp_path, Spy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.predict(_net(), DataLoader(_Stream(), batch_size=5), return_predictions=False)
    assert records == [None, None, None] and trainer.prediction_record is None


def test_a_hook_a_subclass_overrides_runs_at_any_interval(tmp_path: Path) -> None:
    calls: list[int] = []

    class Counting(Recorder):
        def on_predict_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int,
                                 dataloader_idx: int = 0) -> None:  # fmt: skip
            calls.append(batch_idx)

    writer = Counting("epoch")
    _trainer(tmp_path, writer).predict(_net(), DataLoader(_dataset(), batch_size=5))
    assert calls == [0, 1, 2] and writer.batches == [] and len(writer.epochs) == 1


def test_the_record_is_dropped_after_predict(tmp_path: Path) -> None:
    writer = Recorder("epoch")
    trainer = _trainer(tmp_path, writer)
    trainer.predict(_net(), DataLoader(_dataset(), batch_size=5))
    assert trainer.prediction_record is None and len(writer.epochs) == 1


# -- two processes -----------------------------------------------------------------------------------
class _Permutation(Sampler[int]):
    """A user's sampler: a fixed order the prepared loader must follow."""

    def __iter__(self) -> Iterator[int]:
        return iter((5 * i) % N for i in range(N))

    def __len__(self) -> int:
        return N


class FileWriter(BasePredictionWriter):
    """Each rank writes its own files: one per batch and one at the epoch's end."""

    def __init__(self, root: str) -> None:
        super().__init__("batch_and_epoch")
        self.root = Path(root)
        self.tag = ""

    def write_on_batch_end(self, trainer, module, prediction, batch_indices, batch, batch_idx, dataloader_idx):  # type: ignore[no-untyped-def]  # fmt: skip
        assert batch[1].tolist() == batch_indices  # the indices name the batch's own samples
        name = f"{self.tag}-rank{trainer.global_rank}-loader{dataloader_idx}-batch{batch_idx}"
        torch.save(prediction, self.root / f"{name}.pt")
        (self.root / f"{name}.json").write_text(json.dumps(batch_indices))

    def write_on_epoch_end(self, trainer, module, predictions, batch_indices):  # type: ignore[no-untyped-def]
        path = self.root / f"{self.tag}-rank{trainer.global_rank}-epoch.pt"
        torch.save({"predictions": predictions, "batch_indices": batch_indices}, path)


def _ddp_worker(root: str) -> Any:
    writer = FileWriter(root)
    trainer = _trainer(Path(root), writer, strategy="ddp")
    net = _net()
    writer.tag = "sequential"
    kept = trainer.predict(net, DataLoader(_dataset(), batch_size=3), return_predictions=False)
    writer.tag = "mixed"
    loaders = [DataLoader(_dataset(), batch_size=2, sampler=_Permutation()),
               DataLoader(_dataset(), batch_size=4, shuffle=True)]  # fmt: skip
    returned = trainer.predict(net, loaders, return_predictions=True)
    assert returned is not None
    return {"kept": kept, "returned": [torch.cat(r).tolist() for r in returned], "world": trainer.world_size}


def _rank_files(root: Path, tag: str, rank: int, loader: int) -> list[tuple[list[int], torch.Tensor]]:
    """``(indices, prediction)`` of each batch file of ``rank`` and ``loader``, in batch order."""
    found = []
    for batch_idx in range(100):
        name = root / f"{tag}-rank{rank}-loader{loader}-batch{batch_idx}"
        if not name.with_suffix(".json").exists():
            break
        found.append((json.loads(name.with_suffix(".json").read_text()), torch.load(name.with_suffix(".pt"))))
    return found


def _check_loader(root: Path, tag: str, loader: int, net: Net) -> list[list[list[int]]]:
    """Every rank's files: each prediction is the model's output for its samples, and together the
    ranks cover the dataset. Returns each rank's batch indices."""
    per_rank = []
    for rank in range(2):
        batches = _rank_files(root, tag, rank, loader)
        for indices, prediction in batches:
            torch.testing.assert_close(prediction, _expected(net, indices, loader))
        epoch = torch.load(root / f"{tag}-rank{rank}-epoch.pt")
        assert epoch["batch_indices"][loader] == [indices for indices, _ in batches]
        epoch_predictions = epoch["predictions"][loader] if tag == "mixed" else epoch["predictions"]
        for (_, prediction), kept in zip(batches, epoch_predictions, strict=True):
            torch.testing.assert_close(kept, prediction)
        per_rank.append([indices for indices, _ in batches])
    written = sorted(i for rank in per_rank for batch in rank for i in batch)
    assert written == list(range(N))  # each sample once
    return per_rank


def test_two_processes_each_write_their_own_predictions_and_indices(tmp_path: Path) -> None:
    results = run_processes(_ddp_worker, str(tmp_path))
    assert [r["world"] for r in results] == [2, 2]
    net = _net()
    # As Lightning's UnrepeatedDistributedSampler: rank r takes samples r, r + 2, ... (no padding)
    # and batches them. Rank 1 runs a repeat batch to even out the last step, but its writer does
    # not get it: each sample is written once, as in Lightning.
    assert _check_loader(tmp_path, "sequential", 0, net) == [
        [[0, 2, 4], [6, 8, 10], [12]],
        [[1, 3, 5], [7, 9, 11]],
    ]
    # The user's sampler's order, dealt the same way.
    order = [(5 * i) % N for i in range(N)]
    mine = [order[0::2], order[1::2]]
    assert _check_loader(tmp_path, "mixed", 0, net) == [
        [share[i : i + 2] for i in range(0, len(share), 2)] for share in mine
    ]
    # Shuffled: the ranks agree on one permutation and split it.
    shuffled = _check_loader(tmp_path, "mixed", 1, net)
    assert sorted(i for batch in shuffled[0] + shuffled[1] for i in batch) == list(
        range(N)
    )  # 4 batches: none repeated
    # What predict returns: gathered, each sample once, in the sampler's order, the same on both ranks.
    assert results[0]["kept"] is None and results[0]["returned"] == results[1]["returned"]
    torch.testing.assert_close(torch.tensor(results[0]["returned"][0]), _expected(net, order))
    assert len(results[0]["returned"][1]) == N
