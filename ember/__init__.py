"""ember: a PyTorch training library.

- Accelerate-style layer: :class:`Accelerator` (``prepare`` / ``backward`` in your own loop).
- Lightning-style layer: ``TrainModule`` + ``Trainer`` (built on the Accelerator).
- Strategies (``ember.strategies``) and precision plugins (``ember.precision``) shared by both.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from ember._lazy import lazy_exports
from ember._processes import DistributedType
from ember._rng import seed_everything
from ember._skip import skip_first_batches
from ember._utilities import broadcast_object_list, gather_object, send_to_device, wait_for_everyone
from ember.accelerator import Accelerator
from ember.data import PreparedDataLoader
from ember.dataloader_config import DataLoaderConfiguration
from ember.empty_weights import init_empty_weights, init_on_device
from ember.memory import find_executable_batch_size, release_memory
from ember.notebook import notebook_launcher
from ember.plugins import GradientAccumulationPlugin, TorchDynamoPlugin
from ember.project import ProjectConfiguration
from ember.state import AcceleratorState, GradientState, PartialState
from ember.strategies.checkpoint_io import CheckpointError

if TYPE_CHECKING:
    from ember.kwargs_handlers import (
        AutocastKwargs,
        DistributedDataParallelKwargs,
        GradScalerKwargs,
        InitProcessGroupKwargs,
        ProfileKwargs,
    )
    from ember.plugins import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from ember.trainer import CSVLogger, DataModule, Logger, Trainer, TrainerCLI, TrainModule, Tuner
    from ember.trainer.loggers import CometLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

set_seed = seed_everything  # the name 🤗 Accelerate users know

# The Trainer layer loads on first use of one of its names: a script that only uses the Accelerator
# does not import the Trainer, its callbacks and loggers (about 11 ms of start-up). So do the
# DeepSpeed and FSDP plugins' modules, and 🤗 Accelerate's kwargs handlers (five dataclasses, ~3 ms).
_TRAINER_NAMES = ("CSVLogger", "CometLogger", "DataModule", "Logger", "MLFlowLogger", "TensorBoardLogger",
                  "Trainer", "TrainerCLI", "TrainModule", "Tuner", "WandbLogger")  # fmt: skip
_HANDLER_NAMES = ("AutocastKwargs", "DistributedDataParallelKwargs", "GradScalerKwargs", "InitProcessGroupKwargs",
                  "ProfileKwargs")  # fmt: skip
_LAZY = {
    **dict.fromkeys(_TRAINER_NAMES, "ember.trainer"),
    **dict.fromkeys(("DeepSpeedPlugin", "FullyShardedDataParallelPlugin"), "ember.plugins"),
    **dict.fromkeys(_HANDLER_NAMES, "ember.kwargs_handlers"),
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "Accelerator",
    "AcceleratorState",
    "AutocastKwargs",
    "CSVLogger",
    "CheckpointError",
    "CometLogger",
    "DataLoaderConfiguration",
    "DataModule",
    "DeepSpeedPlugin",
    "DistributedDataParallelKwargs",
    "DistributedType",
    "FullyShardedDataParallelPlugin",
    "GradScalerKwargs",
    "GradientAccumulationPlugin",
    "GradientState",
    "InitProcessGroupKwargs",
    "Logger",
    "MLFlowLogger",
    "PartialState",
    "PreparedDataLoader",
    "ProfileKwargs",
    "ProjectConfiguration",
    "TensorBoardLogger",
    "TorchDynamoPlugin",
    "TrainModule",
    "Trainer",
    "TrainerCLI",
    "Tuner",
    "WandbLogger",
    "__version__",
    "broadcast_object_list",
    "find_executable_batch_size",
    "gather_object",
    "init_empty_weights",
    "init_on_device",
    "notebook_launcher",
    "release_memory",
    "seed_everything",
    "send_to_device",
    "set_seed",
    "skip_first_batches",
    "wait_for_everyone",
]
