"""DeepSpeed ZeRO (stages 1-3, CPU offload) on DeepSpeed's own engine.

``prepare`` hands the model and optimizer to ``deepspeed.initialize``; the engine then owns the
step: the Accelerator's ``backward`` runs ``engine.backward`` and ``engine.step`` (which applies
the optimizer only at the end of an accumulation window), ``optimizer.step()`` is a no-op, and
``clip_grad_norm_`` returns the norm the engine clipped to. The DeepSpeed configuration has one
source of truth: what ember already knows (micro batch size, accumulation, clipping, precision)
is written into it, and a user value that contradicts it is an error naming both.
"""

from ember.strategies.deepspeed.config import DeepSpeedConfig
from ember.strategies.deepspeed.strategy import DeepSpeedStrategy, zero_checkpoint_weights

__all__ = ["DeepSpeedConfig", "DeepSpeedStrategy", "zero_checkpoint_weights"]
