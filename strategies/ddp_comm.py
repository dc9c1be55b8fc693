"""``DDPConfig``'s communication hook options (Lightning's ``ddp_comm_hook`` / ``ddp_comm_state`` /
``ddp_comm_wrapper``, 🤗 Accelerate's ``comm_hook`` / ``comm_wrapper`` / ``comm_state_option``), and
the note that names the ``DDPConfig`` argument when DDP finds parameters that did not get a gradient.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
from torch.nn import parallel

from ember._validation import show

# Names for torch's built-in hooks, as 🤗 Accelerate spells them (its DDPCommunicationHookType).
_HOOKS: dict[str, Callable[..., Any]] = {
    "fp16": default_hooks.fp16_compress_hook,
    "bf16": default_hooks.bf16_compress_hook,
    "power_sgd": powerSGD_hook.powerSGD_hook,
    "batched_power_sgd": powerSGD_hook.batched_powerSGD_hook,
}
_WRAPPERS: dict[str, Callable[..., Any]] = {
    "fp16": default_hooks.fp16_compress_wrapper,
    "bf16": default_hooks.bf16_compress_wrapper,
}
_POWER_SGD = ("power_sgd", "batched_power_sgd")
_UNUSED = "Expected to have finished reduction in the prior iteration"


def check_comm_options(hook: Any, state: Any, wrapper: Any) -> None:
    """Raise ``ValueError`` / ``TypeError`` for ``DDPConfig``'s comm options that cannot work together."""
    for name, value, names in (("comm_hook", hook, _HOOKS), ("comm_wrapper", wrapper, _WRAPPERS)):
        if value is None or callable(value):
            continue
        if not isinstance(value, str) or value not in names:
            raise ValueError(
                f"DDPConfig({name}={show(value)}) is not valid. Valid choices: None, "
                + ", ".join(map(repr, names))
                + ", or a callable"
                + (" hook(state, bucket) -> Future" if name == "comm_hook" else " wrapper(hook) -> hook")
            )
    if hook is None and (state is not None or wrapper is not None):
        given = f"comm_state={show(state)}" if state is not None else f"comm_wrapper={show(wrapper)}"
        raise ValueError(f"DDPConfig({given}) needs a comm_hook to go with it; comm_hook is None")
    if isinstance(state, Mapping) and hook not in _POWER_SGD:
        raise ValueError(
            f"DDPConfig(comm_state={show(state)}): a dict of PowerSGDState options goes with "
            f"comm_hook='power_sgd' or 'batched_power_sgd', not comm_hook={show(hook)}"
        )
    if hook is post_localSGD_hook.post_localSGD_hook or isinstance(
        state, post_localSGD_hook.PostLocalSGDState
    ):
        # After its warm-up the hook all-reduces within a subgroup only, and the replicas stay equal
        # only if an averager also runs after each optimizer step (Lightning's model_averaging_period).
        raise ValueError(
            "DDPConfig: post-localSGD (post_localSGD_hook, PostLocalSGDState) is not supported: it needs "
            "periodic model averaging after the optimizer step (Lightning's model_averaging_period), which "
            "DDPStrategy does not do. Valid choices: comm_hook='fp16', 'bf16', 'power_sgd', "
            "'batched_power_sgd' or another hook that keeps the replicas equal"
        )


def register_comm_hook(
    wrapped: parallel.DistributedDataParallel, hook: Any, state: Any, wrapper: Any
) -> None:
    """Register ``DDPConfig``'s hook on a new ``DistributedDataParallel`` (each gets its own PowerSGD state)."""
    if hook is None:
        return
    name = hook if isinstance(hook, str) else None
    function = _HOOKS[hook] if isinstance(hook, str) else hook
    if name in _POWER_SGD and (state is None or isinstance(state, Mapping)):
        # PowerSGD keeps per-bucket low-rank matrices and error feedback: one state per model.
        state = powerSGD_hook.PowerSGDState(process_group=None, **dict(state or {}))
    if wrapper is not None:
        function = (_WRAPPERS[wrapper] if isinstance(wrapper, str) else wrapper)(function)
    try:
        wrapped.register_comm_hook(state, function)
    except (TypeError, ValueError, RuntimeError) as error:
        _add_note(error, f"ember: raised for DDPConfig(comm_hook={show(hook)}, comm_wrapper={show(wrapper)})")
        raise


class DistributedDataParallel(parallel.DistributedDataParallel):
    """torch's ``DistributedDataParallel`` (its name too: a model prints and reads as one), whose
    error for parameters that got no gradient in the previous backward names them and the
    ``DDPConfig`` options that fix it (torch's message names its own keyword). Caught in ``forward``: an ``except`` costs nothing until it catches, where a forward
    hook would put every call on ``nn.Module``'s slower path (and the Accelerator's ``call_as_forward``
    on its redirected one)."""

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        try:
            return super().forward(*inputs, **kwargs)
        except RuntimeError as error:
            if _UNUSED in str(error):
                _explain_unused(error, self)
            raise


def _explain_unused(error: RuntimeError, wrapped: parallel.DistributedDataParallel) -> None:
    ignored = set(getattr(wrapped, "parameters_to_ignore", ()))
    # DDP's parameter indices: the parameters that require grad, in named_parameters() order.
    names = [n for n, p in wrapped.module.named_parameters() if p.requires_grad and n not in ignored]
    found = re.search(r"did not receive grad for rank \d+: ([\d ]+)", str(error))
    indices = [int(i) for i in found.group(1).split()] if found else []
    unused = [names[i] for i in indices if i < len(names)]
    _add_note(
        error,
        "ember: parameters that got no gradient in the previous backward"
        + (f" ({', '.join(unused)})" if unused else "")
        + ". Pass DDPStrategy(DDPConfig(find_unused_parameters=True)) or strategy="
        "'ddp_find_unused_parameters_true' (or DDPConfig(static_graph=True) when the same parameters "
        "go unused every step), or freeze those parameters (requires_grad=False) before prepare()",
    )


def _add_note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(text)
    else:  # 3.10: into the message itself
        error.args = (f"{error.args[0] if error.args else ''}\n{text}", *error.args[1:])
