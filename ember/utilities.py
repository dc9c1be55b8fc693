"""Helpers a Lightning project imports from ``lightning.pytorch.utilities``, under the same names and
with the same behaviour: ``from ember.utilities import grad_norm, rank_zero_only, ...``.

Example::

    from ember.utilities import grad_norm, rank_zero_info


    class Classifier(TrainModule):
        def on_before_optimizer_step(self, optimizer):
            self.log_dict(grad_norm(self, norm_type=2))  # grad_2.0_norm/<param>, grad_2.0_norm_total

        def on_train_start(self):
            rank_zero_info("training starts")  # logged by global rank 0 only
"""

from __future__ import annotations

import functools
import logging
import pickle
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, overload

import torch
from torch import nn
from typing_extensions import ParamSpec

from ember._tree import move_to_device
from ember._validation import check_int, show
from ember.strategies.environment import detect_environment, usable_cpus
from ember.trainer.combined import CombinedLoader
from ember.trainer.hparams import AttributeDict

__all__ = [
    "AttributeDict",
    "CombinedLoader",
    "EmberDeprecationWarning",
    "find_shared_parameters",
    "grad_norm",
    "is_picklable",
    "measure_flops",
    "move_data_to_device",
    "rank_zero_debug",
    "rank_zero_deprecation",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
    "set_shared_parameters",
    "suggested_max_num_workers",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def grad_norm(
    module: nn.Module, norm_type: float | int | str, group_separator: str = "/"
) -> dict[str, torch.Tensor]:
    """The ``norm_type``-norm of each parameter's gradient, under ``grad_{p}_norm{group_separator}{name}``
    (``p`` as a float: ``grad_2.0_norm/layer.weight``, ``grad_inf_norm/...``), and the norm of all of
    them together (the gradients seen as one vector) under ``grad_{p}_norm_total``. Parameters without
    a gradient are left out; with none, the dict is empty.

    ``norm_type``: a positive number, or ``"inf"`` for the largest absolute value.

    Example::

        def on_before_optimizer_step(self, optimizer):
            self.log_dict(grad_norm(self.layer, norm_type=2))
    """
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        p = float("nan")
    if isinstance(norm_type, bool) or not p > 0:  # (NaN is not > 0)
        raise ValueError(
            f"grad_norm(norm_type={show(norm_type)}) must be a positive number or 'inf' (the infinity norm)"
        )
    norms = {
        f"grad_{p}_norm{group_separator}{name}": torch.linalg.vector_norm(param.grad.detach(), p)
        for name, param in module.named_parameters()
        if param.grad is not None
    }
    if norms:
        values = list(norms.values())
        # The norm of the per-parameter norms is the norm of all the gradients as one vector (p < inf
        # and p = inf alike); on the first one's device, as parameters may sit on several.
        stacked = torch.stack([value.to(values[0].device) for value in values])
        norms[f"grad_{p}_norm_total"] = torch.linalg.vector_norm(stacked, p)
    return norms


def _process_rank() -> int:
    """This process's global rank: the one the run's Accelerator (a Trainer's included) knows, else
    the launcher's (the environment; 0 in a plain process)."""
    from ember import state  # (here: ember.state imports the Accelerator, which needs this module's peers)

    accelerator = state._current() if state._current is not None else None
    if accelerator is not None:
        return int(accelerator.process_index)  # what trainer.global_rank / trainer.is_global_zero read
    return detect_environment().rank


class _RankZeroOnly:
    """Decorate a function to run it on global rank 0 only; the other ranks get ``default`` (None
    unless given) without calling it.

    ``rank_zero_only.rank`` is this process's global rank: the run's (see :func:`_process_rank`),
    read at each call, unless a value was set (``rank_zero_only.rank = 1``; None follows the run again).

    Example::

        @rank_zero_only
        def save_report(path): ...


        count = rank_zero_only(count_files, default=0)(folder)  # 0 on the other ranks
    """

    def __init__(self) -> None:
        self._rank: int | None = None

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else _process_rank()

    @rank.setter
    def rank(self, value: int | None) -> None:
        check_int("rank", value, minimum=0, owner="rank_zero_only", optional=True)
        self._rank = value

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T | None]: ...

    @overload
    def __call__(self, fn: Callable[P, T], default: T) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, T], default: T | None = None) -> Callable[P, T | None]:
        if not callable(fn):
            raise TypeError(f"rank_zero_only(fn={show(fn)}): fn must be a function")

        @functools.wraps(fn)
        def on_rank_zero(*args: P.args, **kwargs: P.kwargs) -> T | None:
            return fn(*args, **kwargs) if self.rank == 0 else default

        return on_rank_zero


rank_zero_only = _RankZeroOnly()
"""Decorate a function to run it on global rank 0 only: ``@rank_zero_only``, or
``rank_zero_only(fn, default=0)`` for a function whose other ranks get ``default`` (None unless given).

``rank_zero_only.rank`` is this process's global rank, read at each call: the rank the run's
Accelerator (a Trainer's included) knows, else the launcher's (``RANK`` with ``WORLD_SIZE``, SLURM's;
0 in a plain process). Setting it (as Lightning's strategies do) overrides that; ``None`` follows the run again.
"""

# The helpers below call the standard function one frame deeper than the user's call plus this
# wrapper, so a ``stacklevel`` means the same as with Lightning's helpers (the default names the
# caller's line).


def _emit_warning(message: str | Warning, stacklevel: int, **kwargs: Any) -> None:
    warnings.warn(message, stacklevel=stacklevel, **kwargs)


def _emit_log(level: int, *args: Any, stacklevel: int, **kwargs: Any) -> None:
    log.log(level, *args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_warn(message: str | Warning, stacklevel: int = 4, **kwargs: Any) -> None:
    """``warnings.warn(message, **kwargs)`` on global rank 0 only (the warning names the caller's line).

    Example::

        rank_zero_warn("the validation set is empty", category=UserWarning)
    """
    _emit_warning(message, stacklevel, **kwargs)


class EmberDeprecationWarning(DeprecationWarning):
    """The category of :func:`rank_zero_deprecation`: a ``DeprecationWarning`` that is shown by
    default (as Lightning's ``LightningDeprecationWarning``), wherever the call is."""


# Python shows a DeprecationWarning only when __main__ raises it; this category always, once per
# place (a user's own filters, set after this import, still win).
warnings.simplefilter("default", category=EmberDeprecationWarning)


def rank_zero_deprecation(message: str | Warning, stacklevel: int = 5, **kwargs: Any) -> None:
    """An :class:`EmberDeprecationWarning` (unless ``category`` says otherwise) on global rank 0 only.

    Example::

        rank_zero_deprecation("`old_arg` is deprecated; use `new_arg`")
    """
    kwargs.setdefault("category", EmberDeprecationWarning)
    rank_zero_warn(message, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_info(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """``logging.info`` on the ``ember.utilities`` logger, on global rank 0 only.

    Example::

        rank_zero_info("resuming from %s", ckpt_path)
    """
    _emit_log(logging.INFO, *args, stacklevel=stacklevel, **kwargs)


@rank_zero_only
def rank_zero_debug(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """``logging.debug`` on the ``ember.utilities`` logger, on global rank 0 only.

    Example::

        rank_zero_debug("batch %d: %s", batch_idx, batch.shape)
    """
    _emit_log(logging.DEBUG, *args, stacklevel=stacklevel, **kwargs)


def measure_flops(
    model: nn.Module,
    forward_fn: Callable[[], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """The floating-point operations of ``forward_fn()`` (a forward pass of ``model``), and with
    ``loss_fn`` those of ``loss_fn(forward_fn()).backward()`` too, as torch's ``FlopCounterMode``
    counts them. Build the model and its input on the ``meta`` device: nothing is computed nor allocated.

    Example::

        with torch.device("meta"):
            model = MyModel()
            x = torch.randn(8, 32)
        forward_flops = measure_flops(model, lambda: model(x))
        training_flops = measure_flops(model, lambda: model(x), lambda y: y.sum())
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not callable(forward_fn):
        raise TypeError(f"measure_flops(forward_fn={show(forward_fn)}) must be a function of no arguments")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"measure_flops(loss_fn={show(loss_fn)}) must be a function of the output, or None")
    counter = FlopCounterMode(display=False)
    with counter:
        output = forward_fn()
        if loss_fn is not None:
            loss_fn(output).backward()
    return int(counter.get_total_flops())


def move_data_to_device(batch: Any, device: torch.device | str | int) -> Any:
    """``batch`` with every tensor in its lists, tuples, dicts and dataclasses moved to ``device``, as
    the Trainer moves a batch (the default ``transfer_batch_to_device``).

    Example::

        batch = move_data_to_device({"x": x, "y": [y1, y2]}, "cuda:0")
    """
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(f"move_data_to_device(device={show(device)}) must be a torch.device, a str or an int")
    return move_to_device(batch, torch.device(device))


def is_picklable(obj: object) -> bool:
    """True when ``pickle.dumps(obj)`` succeeds (a lambda, a lock or an open file: False).

    Example::

        assert is_picklable({"lr": 0.1}) and not is_picklable(lambda: 0)
    """
    try:
        pickle.dumps(obj)
    except (pickle.PickleError, AttributeError, RuntimeError, TypeError):
        return False
    return True


def find_shared_parameters(module: nn.Module) -> list[list[str]]:
    """The groups of names under which one parameter appears several times in ``module`` (tied
    weights), each group in registration order.

    Example::

        model.decoder.weight = model.encoder.weight
        find_shared_parameters(model)  # [["encoder.weight", "decoder.weight"]]
    """
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def set_shared_parameters(module: nn.Module, shared_params: list[list[str]]) -> nn.Module:
    """Tie ``module``'s parameters again: in each group of names (as :func:`find_shared_parameters`
    lists them), the later names get the first name's parameter. Returns ``module``.

    Example::

        tied = find_shared_parameters(model)
        model = move_somewhere(model)  # something that unties them
        set_shared_parameters(model, tied)
    """
    for group in shared_params:
        if isinstance(group, str) or not all(isinstance(name, str) for name in group):
            raise TypeError(
                f"set_shared_parameters(shared_params=...): each group must be a list of parameter names, "
                f"got {show(group)}"
            )
        first = module.get_parameter(group[0])
        for name in group[1:]:
            owner, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(owner), attribute, first)
    return module


def suggested_max_num_workers(local_world_size: int) -> int:
    """An upper bound for a DataLoader's ``num_workers``: the CPUs this process may use, shared by
    the ``local_world_size`` processes of this machine, less one each for the process itself (at least 1).

    Example::

        DataLoader(dataset, num_workers=suggested_max_num_workers(trainer.num_devices))
    """
    check_int("local_world_size", local_world_size, minimum=1, owner="suggested_max_num_workers")
    return max(1, usable_cpus() // local_world_size - 1)
