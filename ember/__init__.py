"""ember: a PyTorch training library.

- Accelerate-style layer: :class:`Accelerator` (``prepare`` / ``backward`` in your own loop).
- Lightning-style layer: ``TrainModule`` + ``Trainer`` (built on the Accelerator).
- Strategies (``ember.strategies``) and precision plugins (``ember.precision``) shared by both.
"""

__version__ = "0.1.0"

from ember._rng import seed_everything
from ember.accelerator import Accelerator
from ember.data import PreparedDataLoader, skip_first_batches
from ember.strategies.checkpoint_io import CheckpointError
from ember.trainer import CSVLogger, DataModule, Logger, Trainer, TrainModule
from ember.trainer.loggers import TensorBoardLogger, WandbLogger  # wandb/tensorboard load on first use

set_seed = seed_everything  # the name 🤗 Accelerate users know

__all__ = [
    "Accelerator",
    "CSVLogger",
    "CheckpointError",
    "DataModule",
    "Logger",
    "PreparedDataLoader",
    "TensorBoardLogger",
    "TrainModule",
    "Trainer",
    "WandbLogger",
    "__version__",
    "seed_everything",
    "set_seed",
    "skip_first_batches",
]
