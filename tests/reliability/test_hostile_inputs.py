"""Hostile inputs: checkpoints that carry a pickle or odd JSON, and invalid arguments to every public constructor.

A checkpoint is only ever read as JSON and safetensors: a pickle payload in place of a file (with
the manifest's checksums rewritten to match, so that only the format protects) is refused with a
``CheckpointError`` naming the file, and the payload never runs. Arguments: for each public
constructor and ``ember launch`` / ``ember config`` option, hypothesis draws values that are not
valid for it; each gives a ``ValueError`` / ``TypeError`` (argparse: exit 2) naming the argument,
and leaves no file and no process behind.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.prune as prune
import xxhash
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import ember.cli
from ember import Accelerator, AutocastKwargs, CheckpointError, DataLoaderConfiguration, PartialState, Trainer
from ember.callbacks import (
    DeviceStatsMonitor,
    EarlyStopping,
    EMAWeightAveraging,
    LambdaCallback,
    ModelCheckpoint,
    ModelPruning,
    OnExceptionCheckpoint,
    RichProgressBar,
    SpikeDetection,
    TQDMProgressBar,
)
from ember.plugins import (
    DeepSpeedPlugin,
    FullyShardedDataParallelPlugin,
    GradientAccumulationPlugin,
    TorchDynamoPlugin,
)
from ember.precision import PRECISION_REGISTRY
from ember.strategies import STRATEGY_REGISTRY
from ember.strategies.ddp import DDPConfig
from ember.strategies.deepspeed import DeepSpeedConfig
from ember.strategies.fsdp import FSDPConfig
from ember.strategies.single_device import SingleDeviceStrategy
from ember.strategies.xla_spmd import XLASPMDConfig
from ember.trainer.loggers import CometLogger, CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger


# -- checkpoints carrying a pickle -------------------------------------------------------------------
class _ShardedSingleDevice(SingleDeviceStrategy):
    """One process writing the ``"sharded"`` layout (DCP shard files), like FSDP does per rank."""

    @property
    def sharded_checkpoints(self) -> bool:
        return True


class _Payload:
    """Unpickling this creates the marker file: proof that the checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _rewrite_manifest(ckpt: Path, name: str) -> None:
    """Update the manifest's size and digest of ``name`` (listing it if new): only the format protects."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _prepared() -> tuple[Accelerator, nn.Module]:
    torch.manual_seed(0)
    accelerator = Accelerator()
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.backward(model(torch.randn(2, 3)).sum())
    optimizer.step()
    return accelerator, model


@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.safetensors", "rng_rank0.safetensors"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_in_place_of_a_tensor_file_is_refused_unrun(
    tmp_path: Path, target: str, writer: str
) -> None:
    accelerator, model = _prepared()
    ckpt = accelerator.save_state(tmp_path / "ckpt")
    marker = tmp_path / "payload-ran"
    with open(ckpt / target, "wb") as f:
        if writer == "pickle":
            pickle.dump(_Payload(marker), f)
        else:
            torch.save({"weight": _Payload(marker)}, f)
    _rewrite_manifest(ckpt, target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"{target}.*is not a valid safetensors file"):
        accelerator.load_state(ckpt)
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing restored
    # `ember consolidate` refuses it too, before writing anything
    if target == "model.safetensors":
        with pytest.raises(SystemExit) as exit_info:
            ember.cli.main(["consolidate", str(ckpt), str(tmp_path / "out.safetensors")])
        assert exit_info.value.code == 2 and not (tmp_path / "out.safetensors").exists()
        assert not marker.exists()


def test_pickles_that_ember_does_not_read_stay_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP's pickled ``.metadata`` is never read (the reader rebuilds it from safetensors headers);
    an unlisted file is refused; loading never reaches pickle or torch.load."""
    accelerator = Accelerator(strategy=_ShardedSingleDevice())
    model = accelerator.prepare(nn.Linear(3, 2))
    ckpt = accelerator.save_state(tmp_path / "ckpt")
    marker = tmp_path / "payload-ran"
    (ckpt / "model.shards" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(ckpt, "model.shards/.metadata")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading unpickled something")

    for owner, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)
    accelerator.load_state(ckpt)
    assert not marker.exists()
    # a file the save did not write, where a loader would read it
    (ckpt / "model.shards" / "shard-00009-model-00001-of-00001.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"shard-00009.*not listed in the manifest"):
        accelerator.load_state(ckpt)
    assert isinstance(model, nn.Module)


_ODD_JSON: list[tuple[str, Any, str]] = [  # file, content (for the manifest: fields replaced), message
    ("dataloaders.json", "hello", "one dict per dataloader"),
    ("precision.json", [1, 2], "holds a list, not a state dict"),
    ("optimizer.json", {"state": {"__tensor__": "nowhere"}, "param_groups": []}, "does not hold an ember state tree"),
    ("optimizer.json", {"__items__": [[[1], 2]]}, "does not hold an ember state tree"),
    ("optimizer.json", {"__tuple__": 5}, "does not hold an ember state tree"),
    ("rng_rank0.json", None, "holds a NoneType, not a state dict"),
    ("rng_rank0.json", "{", "is not valid JSON"),
    ("manifest.json", {"files": "all"}, "malformed: 'files'"),
    ("manifest.json", {"files": {"../../etc/passwd": {"size": 1, "xxh3_128": "x"}}}, "not a path inside the checkpoint"),
    ("manifest.json", {"files": {"/etc/passwd": {"size": 1, "xxh3_128": "x"}}}, "not a path inside the checkpoint"),
    ("manifest.json", {"files": {"a.json": {"size": 1, "md5": "x"}}}, "entry of 'a.json' must be"),
    ("manifest.json", {"files": {"a.json": {"size": 1, "sha256": "x", "xxh3_128": "x"}}}, "entry of 'a.json' must be"),
    ("manifest.json", {"version": 3}, "manifest version 3; this ember reads versions 1 to 2"),
    ("manifest.json", {"version": None}, "manifest version None"),
    ("manifest.json", {"extra": ["../../secret"]}, "lowercase names"),
    ("manifest.json", {"counts": {"models": -1}}, "'counts'"),
    ("manifest.json", {"counts": None}, "'counts'"),
    ("manifest.json", {"world_size": "2"}, "'world_size'"),
    ("manifest.json", {"format": "pickle"}, "is not an ember checkpoint manifest"),
    ("manifest.json", [], "is not an ember checkpoint manifest"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "message"), _ODD_JSON)
def test_json_holding_something_unexpected_is_named(
    tmp_path: Path, name: str, content: Any, message: str
) -> None:
    accelerator, model = _prepared()
    ckpt = accelerator.save_state(tmp_path / "ckpt")
    if name == "manifest.json" and isinstance(content, dict):
        content = {**json.loads((ckpt / name).read_text()), **content}
    text = content if isinstance(content, str) and content == "{" else json.dumps(content)
    (ckpt / name).write_text(text)
    if name != "manifest.json":
        _rewrite_manifest(ckpt, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message) as err:
        accelerator.load_state(ckpt)
    assert name in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- invalid arguments ---------------------------------------------------------------------------------
_HUGE = [2**63, -(2**63) - 1, 10**30, -(10**30)]
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from(_HUGE),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.binary(max_size=4),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=2),
    st.tuples(st.integers(min_value=0, max_value=3)),
    st.dictionaries(st.text(max_size=3), st.integers(min_value=-3, max_value=3), max_size=2),
    st.sampled_from(
        [
            object(),
            timedelta(seconds=-5),
            timedelta(0),
            Path("x"),
            torch.float32,
            torch.int64,
            1 + 2j,
            set(),
            math.nan,
        ]
    ),
)


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], bool]:
    return lambda v: (
        isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
    )


def _number(lo: float = -math.inf, *, above: bool = False, finite: bool = True) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or math.isnan(v)
            or (finite and math.isinf(v))
        ):
            return False
        return v > lo if above else v >= lo

    return ok


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _predicate(v: Any) -> bool:
    """A callable that is not a class (a class is callable, but no predicate)."""
    return callable(v) and not isinstance(v, type)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: any(v is c or (type(v) is type(c) and v == c) for c in choices)


def _is_path(v: Any) -> bool:
    return isinstance(v, (str, os.PathLike))


def _timeout(v: Any) -> bool:
    return isinstance(v, timedelta) and v > timedelta(0)


def _seconds(v: Any) -> bool:  # collective_timeout
    return (isinstance(v, timedelta) and v > timedelta(0)) or _number(0, above=True)(v)


def _duration(v: Any) -> bool:  # Trainer(max_time=)
    if v is None or isinstance(v, timedelta):
        return v is None or v >= timedelta(0)
    try:
        return isinstance(v, dict) and timedelta(**v) >= timedelta(0)
    except (TypeError, ValueError, OverflowError):
        return False


def _interval_time(v: Any) -> bool:  # Trainer(val_check_interval=) as a time: max_time's forms
    if isinstance(v, str):
        return re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", v) is not None
    return v is not None and _duration(v)


def _checkpoint_name(v: Any) -> bool:  # OnExceptionCheckpoint(filename=): a directory's name
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and os.sep not in v


def _pruning_fn(v: Any) -> bool:  # with use_global_unstructured=True (the default): unstructured only
    if isinstance(v, str):
        return v.lower() in ("l1_unstructured", "random_unstructured")
    return isinstance(v, type) and issubclass(v, prune.BasePruningMethod) and v.PRUNING_TYPE == "unstructured"


def _flag_or_function(v: Any) -> bool:
    return isinstance(v, bool) or callable(v)


_PRUNING_ARGUMENTS: dict[str, Callable[[Any], bool]] = {
    "parameters_to_prune": lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 0),
    "parameter_names": lambda v: (
        v is None
        or (isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(n, str) and n for n in v))
    ),
    "use_global_unstructured": _is_bool,
    "amount": lambda v: callable(v) or _int(0)(v) or (isinstance(v, float) and 0.0 <= v <= 1.0),
    "apply_pruning": _flag_or_function,
    "make_pruning_permanent": _is_bool,
    "use_lottery_ticket_hypothesis": _flag_or_function,
    "resample_parameters": _is_bool,
    "pruning_dim": _optional(_int()),
    "pruning_norm": lambda v: v is None or (not isinstance(v, bool) and isinstance(v, (int, float, str))),
    "verbose": _one_of(0, 1, 2),
    "prune_on_train_epoch_end": _is_bool,
}
_STRATEGIES = {"auto", *STRATEGY_REGISTRY.names()}
_DYNAMO_BACKENDS = {"no", *torch._dynamo.list_backends(exclude_tags=())}


def _dynamo_backend(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.lower() in _DYNAMO_BACKENDS)


_PRECISIONS = {*PRECISION_REGISTRY.names(), "16", "32", "64", "bf16", "half", 16, 32, 64}


@dataclass(frozen=True)
class Case:
    """An argument of a constructor: its name, which values are valid, and the other arguments."""

    build: Callable[..., Any]
    argument: str
    valid: Callable[[Any], bool]
    others: tuple[tuple[str, Any], ...] = ()
    choices: tuple[str, ...] = ()  # named in the message of a value outside them

    def __str__(self) -> str:
        return f"{getattr(self.build, '__name__', self.build)}-{self.argument}"


def _cases() -> list[Case]:
    trainer_quiet = (("enable_progress_bar", False), ("enable_model_summary", False), ("logger", False))
    cases = [
        Case(Accelerator, "accelerator", _one_of(None, "auto", "cpu"), choices=("'cpu'", "'cuda'")),
        Case(
            Accelerator,
            "strategy",
            lambda v: v is None or (isinstance(v, str) and v in _STRATEGIES),
            choices=("'ddp'",),
        ),
        Case(Accelerator, "devices", lambda v: v == "auto" or _int(1)(v)),
        Case(
            Accelerator,
            "precision",
            lambda v: (
                v is None or (isinstance(v, (str, int)) and not isinstance(v, bool) and v in _PRECISIONS)
            ),
        ),
        Case(Accelerator, "gradient_accumulation_steps", _int(1)),
        Case(Accelerator, "seed", _optional(_int(0, 2**32 - 1))),
        Case(Accelerator, "mixed_precision", _one_of(None, "no", "fp16", "bf16"), choices=("'fp16'",)),
        Case(Accelerator, "cpu", _is_bool),
        Case(Accelerator, "device_placement", _is_bool),
        Case(AutocastKwargs, "enabled", _is_bool),
        Case(AutocastKwargs, "cache_enabled", _optional(_is_bool)),
        Case(Accelerator, "even_batches", _optional(_is_bool)),
        Case(Accelerator, "dataloader_config", lambda v: v is None),
        Case(
            Accelerator,
            "log_with",
            lambda v: v is None or v in ([], (), "all", "csv", "wandb", "tensorboard"),
        ),
        Case(Accelerator, "project_dir", _optional(_is_path)),
        Case(Accelerator, "collective_timeout", _optional(_seconds)),
        *[
            Case(Accelerator, name, lambda v: v is None)
            for name in ("deepspeed_plugin", "fsdp_plugin", "gradient_accumulation_plugin", "dynamo_plugin")
        ],
        Case(Accelerator, "dynamo_backend", _dynamo_backend, choices=("'eager'",)),
        Case(
            Accelerator,
            "rng_types",
            lambda v: (
                v is None or (isinstance(v, (list, tuple)) and all(t in ("generator", "torch") for t in v))
            ),
        ),
        Case(GradientAccumulationPlugin, "num_steps", _int(1)),
        *[
            Case(GradientAccumulationPlugin, name, _is_bool, (("num_steps", 2),))
            for name in ("adjust_scheduler", "sync_with_dataloader", "sync_each_batch")
        ],
        Case(TorchDynamoPlugin, "backend", _dynamo_backend, choices=("'eager'",)),
        Case(
            TorchDynamoPlugin,
            "mode",
            _one_of(None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
            choices=("'default'",),
        ),
        Case(TorchDynamoPlugin, "fullgraph", _optional(_is_bool)),
        Case(TorchDynamoPlugin, "dynamic", _optional(_is_bool)),
        Case(TorchDynamoPlugin, "disable", _is_bool),
        Case(TorchDynamoPlugin, "options", lambda v: v is None or isinstance(v, dict)),
        Case(DeepSpeedPlugin, "zero_stage", _optional(_int(0, 3))),
        Case(DeepSpeedPlugin, "offload_optimizer_device", _one_of(None, "none", "cpu"), choices=("'cpu'",)),
        Case(
            DeepSpeedPlugin,
            "offload_param_device",
            _one_of(None, "none", "cpu"),
            (("zero_stage", 3),),
            choices=("'cpu'",),
        ),
        Case(
            DeepSpeedPlugin, "gradient_accumulation_steps", lambda v: v is None or v == "auto" or _int(1)(v)
        ),
        Case(DeepSpeedPlugin, "is_train_batch_min", _one_of(True)),
        Case(DeepSpeedPlugin, "zero3_init_flag", _one_of(None, False)),
        Case(FullyShardedDataParallelPlugin, "fsdp_version", _one_of(None, 2)),
        Case(FullyShardedDataParallelPlugin, "reshard_after_forward", _optional(_is_bool)),
        Case(FullyShardedDataParallelPlugin, "limit_all_gathers", _one_of(True)),
        Case(FullyShardedDataParallelPlugin, "use_orig_params", _one_of(None, True)),
        Case(FullyShardedDataParallelPlugin, "sync_module_states", _one_of(None, False)),
        Case(FullyShardedDataParallelPlugin, "activation_checkpointing", _one_of(None, False)),
        Case(
            FullyShardedDataParallelPlugin,
            "min_num_params",
            _optional(_int(0)),
            (("auto_wrap_policy", "size_based_wrap"),),
        ),
    ]
    trainer_arguments: dict[str, Callable[[Any], bool]] = {
        "num_nodes": _int(1),
        "max_epochs": _optional(_int(-1)),
        "max_steps": _int(-1),
        "accumulate_grad_batches": _int(1),
        "gradient_clip_val": _optional(_number(0, finite=False)),
        "gradient_clip_algorithm": _one_of(None, "norm", "value"),
        "val_check_interval": _optional(
            lambda v: _int(1)(v) or (isinstance(v, float) and 0 < v <= 1) or _interval_time(v)
        ),
        "check_val_every_n_epoch": _optional(_int(1)),
        "limit_train_batches": _optional(lambda v: _int(0)(v) or (isinstance(v, float) and 0 <= v <= 1)),
        "num_sanity_val_steps": _optional(_int(-1)),  # None: the default (Lightning's signature)
        "fast_dev_run": lambda v: _is_bool(v) or _int(0)(v),
        "log_every_n_steps": _optional(_int(1)),
        "enable_checkpointing": _optional(_is_bool),
        "enable_progress_bar": _optional(_is_bool),
        "enable_model_summary": _optional(_is_bool),
        "enable_autolog_hparams": _is_bool,
        "barebones": _is_bool,
        "default_root_dir": _optional(_is_path),
        "deterministic": _one_of(None, True, False, "warn"),
        "detect_anomaly": _is_bool,
        "use_distributed_sampler": _is_bool,
        "seed": _optional(_int(0, 2**32 - 1)),
        "max_time": _duration,
        "auto_resume": _optional(_is_bool),
        "non_finite": _one_of("stop", "skip", None),
        "collective_timeout": _optional(_seconds),
        "logger": lambda v: _one_of(True, False, None)(v) or v in ([], ()),
        "callbacks": lambda v: v is None or v in ([], ()),
        "plugins": lambda v: v is None or v in ([], ()),
        "devices": lambda v: v == "auto" or _int(1)(v),
    }
    for name, valid in trainer_arguments.items():
        others = tuple(item for item in trainer_quiet if item[0] != name)
        cases.append(Case(Trainer, name, valid, others))
    config_bools = {
        DDPConfig: ("find_unused_parameters", "static_graph", "gradient_as_bucket_view", "broadcast_buffers"),
        FSDPConfig: ("reshard_after_forward", "offload"),
        DeepSpeedConfig: ("offload_optimizer", "offload_parameters", "overlap_comm", "contiguous_gradients"),
        XLASPMDConfig: ("shard_parameters",),
    }
    for config, names in config_bools.items():
        cases += [Case(config, name, _is_bool) for name in names]
    loader_bools = (
        "split_batches",
        "even_batches",
        "use_seedable_sampler",
        "use_stateful_dataloader",
        "non_blocking",
    )
    cases += [Case(DataLoaderConfiguration, name, _is_bool) for name in loader_bools]
    cases += [
        Case(PartialState, "cpu", _is_bool),
        Case(PartialState, "backend", _one_of(None, "gloo", "nccl", "mpi", "ucc"), choices=("'gloo'",)),
        Case(PartialState, "timeout", _optional(_timeout)),
        Case(DataLoaderConfiguration, "data_seed", _optional(_int(0))),
        Case(DataLoaderConfiguration, "dispatch_batches", _one_of(None, False), choices=("None", "False")),
    ]
    backends = _one_of(None, "gloo", "nccl", "mpi", "ucc")
    cases += [
        Case(DDPConfig, "process_group_backend", backends, choices=("'gloo'",)),
        Case(DDPConfig, "timeout", _timeout),
        Case(DDPConfig, "bucket_cap_mb", _number(0, above=True)),
        Case(FSDPConfig, "process_group_backend", backends, choices=("'gloo'",)),
        Case(FSDPConfig, "timeout", _timeout),
        Case(FSDPConfig, "wrap", lambda v: v is None or v == "auto" or _predicate(v) or v == set()),
        Case(FSDPConfig, "min_params", _int(1)),
        Case(FSDPConfig, "activation_checkpointing", lambda v: v == set() or _predicate(v)),
        Case(
            FSDPConfig,
            "device_mesh",
            _optional(lambda v: isinstance(v, tuple) and len(v) == 2 and all(_int(1)(n) for n in v)),
        ),
        Case(
            FSDPConfig,
            "reduce_dtype",
            lambda v: v is None or (isinstance(v, torch.dtype) and v.is_floating_point),
        ),
        Case(FSDPConfig, "hybrid", _optional(_is_bool)),
        Case(FSDPConfig, "state_dict_type", _one_of("sharded", "full"), choices=("'sharded'", "'full'")),
        Case(DeepSpeedConfig, "stage", _int(0, 3)),
        Case(DeepSpeedConfig, "reduce_bucket_size", _int(1)),
        Case(DeepSpeedConfig, "allgather_bucket_size", _int(1)),
        Case(DeepSpeedConfig, "config", lambda v: v is None or isinstance(v, dict)),
        Case(DeepSpeedConfig, "timeout", _timeout),
        Case(ModelCheckpoint, "dirpath", _optional(_is_path)),
        Case(ModelCheckpoint, "filename", _optional(_is_str)),
        Case(ModelCheckpoint, "monitor", _optional(_is_str), (("save_top_k", 1),)),
        Case(ModelCheckpoint, "mode", _one_of("min", "max"), choices=("'min'", "'max'")),
        Case(ModelCheckpoint, "save_top_k", lambda v: _int(-1, 1)(v)),
        Case(ModelCheckpoint, "save_last", _optional(_is_bool)),
        Case(ModelCheckpoint, "every_n_train_steps", _optional(_int(0))),
        Case(ModelCheckpoint, "every_n_epochs", _optional(_int(0))),
        Case(ModelCheckpoint, "auto_insert_metric_name", _is_bool),
        Case(EarlyStopping, "monitor", _is_str),
        Case(EarlyStopping, "min_delta", _number(), (("monitor", "val_loss"),)),
        Case(EarlyStopping, "patience", _int(0), (("monitor", "val_loss"),)),
        Case(EarlyStopping, "mode", _one_of("min", "max"), (("monitor", "val_loss"),), ("'min'", "'max'")),
        Case(EarlyStopping, "strict", _is_bool, (("monitor", "val_loss"),)),
        Case(EarlyStopping, "check_finite", _is_bool, (("monitor", "val_loss"),)),
        Case(EarlyStopping, "verbose", _is_bool, (("monitor", "val_loss"),)),
        Case(
            EarlyStopping, "stopping_threshold", _optional(_number(finite=False)), (("monitor", "val_loss"),)
        ),
        Case(
            EarlyStopping,
            "divergence_threshold",
            _optional(_number(finite=False)),
            (("monitor", "val_loss"),),
        ),
        Case(RichProgressBar, "refresh_rate", _int(0)),
        Case(RichProgressBar, "leave", _is_bool),
        Case(RichProgressBar, "plain_every_n_batches", _int(1)),
        Case(RichProgressBar, "console", lambda v: v is None),
        Case(TQDMProgressBar, "refresh_rate", _int(0)),
        Case(TQDMProgressBar, "process_position", _int(0)),
        Case(TQDMProgressBar, "leave", _is_bool),
        Case(TQDMProgressBar, "file", lambda v: v is None),
        Case(LambdaCallback, "on_fit_start", lambda v: v is None or callable(v)),
        Case(LambdaCallback, "on_train_batch_end", lambda v: v is None or callable(v)),
        Case(OnExceptionCheckpoint, "dirpath", _is_path),
        Case(OnExceptionCheckpoint, "filename", _checkpoint_name, (("dirpath", "ckpt"),)),
        Case(DeviceStatsMonitor, "cpu_stats", _optional(_is_bool)),
        Case(SpikeDetection, "mode", _one_of("min", "max"), choices=("'min'", "'max'")),
        Case(SpikeDetection, "window", _int(1)),
        Case(SpikeDetection, "warmup", _int(0)),
        Case(SpikeDetection, "atol", _optional(_number(0))),
        Case(SpikeDetection, "rtol", _optional(_number(0))),
        Case(SpikeDetection, "exclude_batches_path", _optional(_is_path)),
        Case(SpikeDetection, "finite_only", _is_bool),
        Case(EMAWeightAveraging, "decay", lambda v: _number(0)(v) and v <= 1),
        Case(EMAWeightAveraging, "use_buffers", _is_bool),
        Case(EMAWeightAveraging, "update_every_n_steps", _int(0)),
        Case(EMAWeightAveraging, "update_starting_at_step", _optional(_int(0))),
        Case(EMAWeightAveraging, "update_starting_at_epoch", _optional(_int(0))),
        Case(ModelPruning, "pruning_fn", _pruning_fn),
        *[
            Case(ModelPruning, name, valid, (("pruning_fn", "l1_unstructured"),))
            for name, valid in _PRUNING_ARGUMENTS.items()
        ],
    ]
    for logger in (CSVLogger, TensorBoardLogger, WandbLogger):
        cases += [
            Case(logger, "save_dir", _is_path),
            Case(
                logger,
                "version",
                _optional(_is_str)
                if logger is WandbLogger
                else lambda v: v is None or _is_str(v) or _int(0)(v),
            ),
        ]
    cases += [
        Case(CSVLogger, "name", _optional(_is_str)),
        Case(CSVLogger, "flush_every_n_rows", _int(1)),
        Case(CSVLogger, "flush_logs_every_n_steps", _optional(_int(1))),
        Case(CSVLogger, "prefix", _is_str),
        Case(TensorBoardLogger, "name", _is_str),
        Case(TensorBoardLogger, "prefix", _is_str),
        Case(WandbLogger, "project", _optional(_is_str)),
        Case(WandbLogger, "name", _optional(_is_str)),
        Case(WandbLogger, "offline", _is_bool),
        Case(WandbLogger, "log_model", _one_of(True, False, "all"), choices=("'all'",)),
        Case(WandbLogger, "prefix", _is_str),
        Case(WandbLogger, "entity", _optional(_is_str)),
        Case(WandbLogger, "tags", lambda v: v is None or v in ([], ())),
        Case(WandbLogger, "group", _optional(_is_str)),
        *[
            Case(CometLogger, name, _optional(_is_str))
            for name in ("api_key", "workspace", "project", "experiment_key", "prefix", "name")
        ],
        Case(CometLogger, "online", _optional(_is_bool)),
        Case(CometLogger, "mode", _one_of(None, "get_or_create", "get", "create"), choices=("'get_or_create'",)),
        Case(CometLogger, "log_model", _one_of(True, False, "all"), choices=("'all'",)),
        Case(MLFlowLogger, "experiment_name", lambda v: _is_str(v) and v != ""),
        *[
            Case(MLFlowLogger, name, _optional(_is_str))
            for name in ("run_name", "tracking_uri", "artifact_location", "run_id")
        ],
        Case(MLFlowLogger, "save_dir", _is_path),
        Case(MLFlowLogger, "log_model", _one_of(True, False, "all"), choices=("'all'",)),
        Case(MLFlowLogger, "prefix", _is_str),
        Case(MLFlowLogger, "synchronous", _optional(_is_bool)),
        Case(MLFlowLogger, "tags", lambda v: v is None or (isinstance(v, dict) and all(_is_str(k) for k in v))),
        Case(WandbLogger, "id", _optional(_is_str)),
    ]  # fmt: skip
    return cases


def _children() -> set[int]:
    """The pids of this process's children (every thread's), from /proc."""
    found = {p.pid for p in multiprocessing.active_children()}
    for task in Path("/proc/self/task").glob("*"):
        try:
            found |= {int(pid) for pid in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


@pytest.fixture
def quiet_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory (where a constructor would create files), W&B offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield tmp_path


# derandomize: CI sees the same examples every run (two random runs each found a new edge case, both
# fixed); to search further, run locally with derandomize=False and a higher max_examples.
_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
    derandomize=True,
)


@pytest.mark.parametrize("case", _cases(), ids=str)
@_SETTINGS
@given(value=ANYTHING)
def test_an_invalid_argument_is_a_clear_error(quiet_dir: Path, case: Case, value: Any) -> None:
    assume(not case.valid(value))
    children = _children()
    with pytest.raises((ValueError, TypeError)) as err:
        case.build(**dict(case.others), **{case.argument: value})
    message = str(err.value)
    assert case.argument in message, f"{case}: {type(err.value).__name__}: {message}"
    for choice in case.choices:
        assert choice in message, f"{case}: the valid choices are not listed: {message}"
    assert list(quiet_dir.iterdir()) == [], f"{case}: left files behind"
    assert _children() == children, f"{case}: left processes behind"


def test_a_misspelled_trainer_argument_suggests_the_name(quiet_dir: Path) -> None:
    with pytest.raises(TypeError, match="max_step.*max_steps"):
        Trainer(max_step=3)


# -- `ember launch` / `ember config` -----------------------------------------------------------------
_LAUNCH_OPTIONS: dict[str, Callable[[str], bool]] = {  # flag -> which text values are valid
    "--nproc-per-node": lambda t: t.strip().lstrip("+").isdecimal() and int(t) >= 1,
    "--nnodes": lambda t: t.strip().lstrip("+").isdecimal() and int(t) >= 1,
    "--node-rank": lambda t: t.strip().lstrip("+").isdecimal() and int(t) == 0,
    "--master-port": lambda t: t.strip().lstrip("+").isdecimal() and 1 <= int(t) <= 65535,
    "--max-restarts": lambda t: t.strip().lstrip("+").isdecimal(),
    "--master-addr": lambda t: bool(t) and t.isprintable() and not any(c.isspace() for c in t),
    "--strategy": lambda t: t in _STRATEGIES,
    "--precision": lambda t: t in {str(p) for p in _PRECISIONS},
    "--accelerator": lambda t: t in ("auto", "cpu", "cuda", "gpu", "xla"),
}
_TEXT = st.one_of(
    st.text(max_size=8),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(
        ["", " ", "1.5", "nan", "inf", "-1", "0", "65536", "99999999999999999999", "ddp ", "fsdp\n", "\x00"]
    ),
)


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    def launch(args: Any) -> int:
        raise AssertionError(f"ember launch started with invalid options: {args}")

    monkeypatch.setattr(ember.cli, "launch", launch)


@pytest.mark.parametrize("command", ["launch", "config"])
@pytest.mark.parametrize("flag", list(_LAUNCH_OPTIONS))
@_SETTINGS
@given(text=_TEXT)
def test_an_invalid_cli_option_exits_2_naming_it(
    quiet_dir: Path, no_launch: None, capsys: pytest.CaptureFixture[str], command: str, flag: str, text: str
) -> None:
    assume(not _LAUNCH_OPTIONS[flag](text))
    (quiet_dir / "train.py").write_text("")
    argv = [command, f"{flag}={text}"]
    argv += ["train.py"] if command == "launch" else ["--output", "out.yaml"]
    children = _children()
    with pytest.raises(SystemExit) as exit_info:
        ember.cli.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    assert flag in error, error
    if flag == "--strategy":
        assert "Valid choices: 'auto', " in error
    if flag == "--accelerator":
        assert "'auto', 'cpu', 'cuda', 'gpu', 'xla'" in error
    assert sorted(p.name for p in quiet_dir.iterdir()) == ["train.py"], "left a file behind"
    assert _children() == children
