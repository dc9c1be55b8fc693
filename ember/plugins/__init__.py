"""🤗 Accelerate's plugin arguments of the Accelerator, under Accelerate's names, so that its loops
switch by import. Each plugin is only a translation: it holds no behaviour of its own.

- :class:`DeepSpeedPlugin` (``Accelerator(deepspeed_plugin=...)``) becomes the DeepSpeed strategy
  with a :class:`~ember.strategies.DeepSpeedConfig`.
- :class:`FullyShardedDataParallelPlugin` (``fsdp_plugin=...``) becomes the FSDP strategy (FSDP2)
  with an :class:`~ember.strategies.FSDPConfig`.
- :class:`GradientAccumulationPlugin` (``gradient_accumulation_plugin=...``) sets the Accelerator's
  gradient accumulation.
- :class:`TorchDynamoPlugin` (``dynamo_plugin=...``) makes ``prepare`` compile each model with
  ``torch.compile``.

A field ember cannot honour raises ``ValueError`` naming the plugin, the field, its value and the
valid choices: it would otherwise be dropped without a word. Unlike Accelerate's, the plugins do
not read ``ACCELERATE_*`` environment variables: a field left at ``None`` means ember's default.

Example::

    from ember import Accelerator, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Block"])
    accelerator = Accelerator(fsdp_plugin=plugin)  # strategy FSDPStrategy(FSDPConfig(wrap={"Block"}))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember._lazy import lazy_exports
from ember.plugins.loop import GradientAccumulationPlugin, TorchDynamoPlugin

if TYPE_CHECKING:
    from ember.plugins.deepspeed import DeepSpeedPlugin
    from ember.plugins.fsdp import FullyShardedDataParallelPlugin

# The DeepSpeed and FSDP plugins load on first use of their name: a run without them never imports them.
_LAZY = {
    "DeepSpeedPlugin": "ember.plugins.deepspeed",
    "FullyShardedDataParallelPlugin": "ember.plugins.fsdp",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "DeepSpeedPlugin",
    "FullyShardedDataParallelPlugin",
    "GradientAccumulationPlugin",
    "TorchDynamoPlugin",
]
