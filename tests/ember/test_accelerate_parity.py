"""🤗 Accelerate idioms a migrating script uses, each checked against what Accelerate 1.x does:
``accelerator.state`` / ``gradient_state`` / ``scaler``, ``prepare(..., device_placement=[...])``,
``autocast(autocast_handler=AutocastKwargs(...))``, ``gather_for_metrics(use_gather_object=True)``
and the shape of a gathered 0-dim tensor (one process and two real gloo processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_processes
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

from ember import Accelerator, AcceleratorState, AutocastKwargs, GradientState


# -- accelerator.state / gradient_state / scaler ---------------------------------------------------
def test_state_describes_the_processes_and_the_precision() -> None:
    accelerator = Accelerator(precision="bf16-mixed")
    state = accelerator.state
    assert isinstance(state, AcceleratorState) and accelerator.state is state
    assert (state.num_processes, state.process_index, state.local_process_index) == (1, 0, 0)
    assert state.device == torch.device("cpu") and state.distributed_type == "NO"
    assert state.is_main_process and state.is_local_main_process and state.is_last_process
    assert not state.use_distributed and state.backend is None and state.initialized
    assert state.mixed_precision == "bf16"
    assert "AcceleratorState(distributed_type=NO, num_processes=1" in repr(state)
    later = Accelerator()
    assert accelerator.state.mixed_precision == "bf16"  # still this Accelerator's, not the last one's
    assert later.state.mixed_precision == AcceleratorState().mixed_precision == "no"  # the last one made
    assert GradientState().num_steps == 1


def test_scaler_is_the_grad_scaler_of_16_mixed_only() -> None:
    fp16 = Accelerator(precision="16-mixed")
    assert isinstance(fp16.scaler, torch.amp.GradScaler) and fp16.scaler is fp16.precision.scaler
    assert Accelerator(precision="bf16-mixed").scaler is None
    assert Accelerator().scaler is None


def test_gradient_state_follows_accumulation_and_the_loader() -> None:
    # What Accelerate 1.15 reports for 5 samples, batch 2, 2 accumulation steps, one process.
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = torch.nn.Linear(2, 1)
    model, optimizer, loader = accelerator.prepare(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(TensorDataset(torch.arange(10.0).view(5, 2)), batch_size=2),
    )
    state = accelerator.gradient_state
    assert accelerator.gradient_state is state
    assert (state.sync_gradients, state.end_of_dataloader, state.remainder, state.in_dataloader) == (
        True,
        False,
        -1,
        False,
    )
    seen = []
    for (x,) in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(x).sum())
            optimizer.step()
            optimizer.zero_grad()
            seen.append((state.sync_gradients, state.end_of_dataloader, state.remainder, state.num_steps))
            assert state.active_dataloader is loader and state.in_dataloader
    assert seen == [(False, False, 1, 2), (True, False, 1, 2), (True, True, 1, 2)]
    assert (state.sync_gradients, state.remainder, state.active_dataloader) == (True, -1, None)
    accelerator.gradient_accumulation_steps = 3
    assert state.num_steps == 3 and "num_steps=3" in repr(state)
    # A batch sampler's batch size counts, as Accelerate reads it: 11 samples in batches of 3.
    sampled = accelerator.prepare(
        DataLoader(torch.arange(11), batch_sampler=BatchSampler(range(11), 3, False))
    )
    assert sampled.total_batch_size == 3
    assert [state.remainder for _ in sampled] == [2, 2, 2, 2]


# -- trackers: Accelerate's attribute names -------------------------------------------------------
def test_trackers_answer_to_accelerates_attribute_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    accelerator = Accelerator(
        log_with=["tensorboard", "wandb", "mlflow", "comet_ml", "csv"], project_dir=tmp_path
    )
    comet = {"online": False, "display_summary_level": 0, "auto_output_logging": False}
    accelerator.init_trackers("proj", init_kwargs={"comet_ml": comet})
    # (name, Accelerate's attribute for the underlying object, its type's name)
    expected = [("tensorboard", "writer", "SummaryWriter"), ("wandb", "run", "Run"), ("comet_ml", "writer", "OfflineExperiment")]  # fmt: skip
    for name, attribute, kind in expected:
        tracker = accelerator.get_tracker(name)
        underlying = accelerator.get_tracker(name, unwrap=True)
        assert type(underlying).__name__ == kind
        assert getattr(tracker, attribute) is underlying and tracker.tracker is underlying
    mlflow = accelerator.get_tracker("mlflow")
    assert type(mlflow.active_run).__name__ == "ActiveRun" and mlflow.active_run.info.run_id == mlflow.run_id
    assert accelerator.get_tracker("mlflow", unwrap=True) is mlflow.tracker is mlflow.experiment
    csv = accelerator.get_tracker("csv")
    assert csv.tracker is csv  # no underlying object: the logger itself
    accelerator.end_training()


# -- device_placement ------------------------------------------------------------------------------
def _meta_model() -> torch.nn.Module:
    return torch.nn.Linear(
        2, 2, device="meta"
    )  # moving it to the CPU fails: it shows whether prepare moved it


def _meta_loader() -> DataLoader[Any]:
    return DataLoader([torch.zeros(2, device="meta") for _ in range(4)], batch_size=2)


def test_prepare_device_placement_per_object() -> None:
    accelerator = Accelerator()
    assert accelerator.device_placement is True
    objects = (
        torch.nn.Linear(2, 2),
        _meta_model(),
        _meta_loader(),
        DataLoader(TensorDataset(torch.zeros(4, 2))),
    )
    model, kept, loader, moved = accelerator.prepare(*objects, device_placement=[True, False, False, True])
    assert next(kept.parameters()).device.type == "meta" and next(model.parameters()).device.type == "cpu"
    assert loader.device is None and {batch.device.type for batch in loader} == {"meta"}
    assert moved.device == torch.device("cpu")
    with pytest.raises(ValueError, match="on the meta device"):  # the default places it: no values to copy
        accelerator.prepare(_meta_model())
    for bad in ([True], [True, False, True], True, [1, 0]):
        with pytest.raises(ValueError, match=r"prepare\(device_placement=.*\): expected a list of 2 bools"):
            accelerator.prepare(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), device_placement=bad)


def test_accelerator_device_placement_false() -> None:
    accelerator = Accelerator(device_placement=False)
    assert accelerator.device_placement is False
    model, loader = accelerator.prepare(_meta_model(), _meta_loader())
    assert next(model.parameters()).device.type == "meta" and loader.device is None
    assert next(accelerator.prepare_model(_meta_model()).parameters()).device.type == "meta"
    assert accelerator.prepare_data_loader(_meta_loader()).device is None
    assert accelerator.prepare_data_loader(_meta_loader(), device_placement=True).device == torch.device(
        "cpu"
    )
    with pytest.raises(ValueError, match="on the meta device"):  # placed: it has no values to copy
        accelerator.prepare(_meta_model(), device_placement=[True])
    with pytest.raises(TypeError, match=r"device_placement='no' must be True or False"):
        Accelerator(device_placement="no")  # type: ignore[arg-type]


def test_device_placement_false_is_refused_where_the_strategy_places_parameters() -> None:
    accelerator = Accelerator(strategy="fsdp")
    with pytest.raises(ValueError, match=r"prepare\(device_placement=\[False\]\): strategy 'fsdp' places"):
        accelerator.prepare(torch.nn.Linear(2, 2), device_placement=[False])
    with pytest.raises(ValueError, match=r"Accelerator\(device_placement=False\): strategy 'fsdp'"):
        Accelerator(strategy="fsdp", device_placement=False).prepare(torch.nn.Linear(2, 2))


# -- autocast(autocast_handler=...) ----------------------------------------------------------------
def test_autocast_handler() -> None:
    accelerator = Accelerator(precision="bf16-mixed")
    x = torch.randn(2, 2)
    with accelerator.autocast():
        assert (x @ x).dtype == torch.bfloat16
        with accelerator.autocast(autocast_handler=AutocastKwargs(enabled=False)):
            assert (x @ x).dtype == torch.float32  # off inside an enclosing autocast too
    with accelerator.autocast(autocast_handler=AutocastKwargs(cache_enabled=False)):
        assert (x @ x).dtype == torch.bfloat16 and not torch.is_autocast_cache_enabled()
    with Accelerator().autocast(autocast_handler=AutocastKwargs(enabled=False)):
        assert not torch.is_autocast_enabled("cpu")  # 32-true: nothing autocasts, nothing changes
    with pytest.raises(TypeError, match=r"autocast\(autocast_handler=\{'enabled': False\}\): expected"):
        accelerator.autocast(autocast_handler={"enabled": False})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"AutocastKwargs\(enabled='no'\) must be True or False"):
        AutocastKwargs(enabled="no")  # type: ignore[arg-type]


def test_autocast_kwargs_handler_sets_the_autocast_of_prepared_models_and_blocks() -> None:
    # Accelerate 1.15: Accelerator(kwargs_handlers=[AutocastKwargs(...)]) sets the autocast that
    # wraps each prepared model's forward, and accelerator.autocast()'s default
    handler = AutocastKwargs(enabled=False)
    accelerator = Accelerator(precision="bf16-mixed", kwargs_handlers=[handler])
    assert accelerator.autocast_handler is handler
    model = accelerator.prepare(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    inside: list[torch.dtype] = []
    model[0].register_forward_hook(lambda module, args, out: inside.append(out.dtype))
    model(torch.randn(1, 2))
    accelerator.call_as_forward(model, lambda x: model[0](x), torch.randn(1, 2))
    assert inside == [torch.float32, torch.float32]  # without the handler: bfloat16
    with accelerator.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with accelerator.autocast(autocast_handler=AutocastKwargs()):  # a block's own handler wins
        assert torch.is_autocast_enabled("cpu")
    cached = Accelerator(precision="bf16-mixed", kwargs_handlers=[AutocastKwargs(cache_enabled=False)])
    with cached.autocast():
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
    plain = Accelerator(kwargs_handlers=[AutocastKwargs(enabled=True)])  # 32-true: nothing autocasts
    with plain.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match=r"kwargs_handlers: one AutocastKwargs at most"):
        Accelerator(kwargs_handlers=[AutocastKwargs(), AutocastKwargs()])


# -- gather: 0-dim tensors, use_gather_object ----------------------------------------------------------
def test_one_process_gathers_a_0_dim_tensor_unchanged() -> None:
    accelerator = Accelerator()
    assert accelerator.gather(torch.tensor(5.0)).shape == torch.Size([])
    assert accelerator.gather({"loss": torch.tensor(5.0)})["loss"].shape == torch.Size([])
    assert accelerator.gather_for_metrics(torch.tensor(5.0)).shape == torch.Size([])
    words = ["a", "b"]
    assert accelerator.gather_for_metrics(words, use_gather_object=True) is words
    with pytest.raises(
        TypeError, match=r"gather_for_metrics\(use_gather_object='yes'\) must be True or False"
    ):
        accelerator.gather_for_metrics(words, use_gather_object="yes")  # type: ignore[arg-type]


def _gather_worker() -> dict[str, Any]:
    accelerator = Accelerator()
    rank = accelerator.process_index
    scalar = accelerator.gather(torch.tensor(float(rank)))
    nested = accelerator.gather({"a": torch.tensor(rank), "b": torch.tensor([rank])})
    for_metrics = accelerator.gather_for_metrics(torch.tensor(float(rank)))
    loader = accelerator.prepare(DataLoader(TensorDataset(torch.arange(5)), batch_size=2))
    words, ids, remainders = [], [], []
    for (x,) in loader:  # 5 samples, 2 processes x 2: the last step repeats 3 samples
        words += accelerator.gather_for_metrics([f"s{int(i)}" for i in x], use_gather_object=True)
        ids += accelerator.gather_for_metrics(x).tolist()
        remainders.append(accelerator.gradient_state.remainder)
    try:
        accelerator.gather_for_metrics(torch.ones(2), use_gather_object=True)
        refused = ""
    except TypeError as error:
        refused = str(error)
    state = accelerator.state
    in_place = accelerator.prepare(torch.nn.Linear(2, 2), device_placement=[False])  # DDP still wraps it
    return {
        "in_place": isinstance(in_place, torch.nn.parallel.DistributedDataParallel),
        "scalar": [list(scalar.shape), scalar.tolist()],
        "nested": [list(nested["a"].shape), list(nested["b"].shape)],
        "for_metrics": list(for_metrics.shape),
        "words": words,
        "ids": ids,
        "remainders": remainders,
        "refused": refused,
        "state": [
            state.num_processes,
            state.process_index,
            state.distributed_type.value,
            state.use_distributed,
        ],
    }


def test_two_processes_gather_0_dim_tensors_and_objects() -> None:
    ranks = run_processes(_gather_worker, nprocs=2)
    for rank, result in enumerate(ranks):
        assert result["scalar"] == [[2], [0.0, 1.0]]  # Accelerate: shape [2]
        assert result["nested"] == [[2], [2]] and result["for_metrics"] == [2]
        assert result["ids"] == [0, 1, 2, 3, 4]
        assert result["words"] == ["s0", "s1", "s2", "s3", "s4"]  # the repeated samples dropped
        assert result["remainders"] == [1, 1]  # 5 % (2 processes x 2), as Accelerate's
        assert "gather_for_metrics(use_gather_object=True): Object of type Tensor" in result["refused"]
        assert result["state"] == [2, rank, "MULTI_CPU", True]
        assert result["in_place"] is True
