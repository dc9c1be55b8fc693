"""Print a table of the module's layers and parameter counts when fitting starts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from typing_extensions import override

from ember.callbacks.base import Callback
from ember.strategies.environment import may_be_terminal

if TYPE_CHECKING:
    from rich.table import Table

    from ember.trainer.module import TrainModule
    from ember.trainer.trainer import Trainer

__all__ = ["ModelSummary", "RichModelSummary", "SummaryRow", "SummaryTotals", "summarize", "summarize_totals"]


# Named tuples, not frozen dataclasses: a frozen dataclass's generated methods cost ~2 ms of every
# run's start-up (benchmarks/startup.py); a named tuple is as immutable and costs a tenth of that.
class SummaryRow(NamedTuple):
    """One submodule: its dotted name, class, parameter counts and train/eval mode; with an
    ``example_input_array``, the sizes of its input and output (``"?"``: not called by the forward)."""

    name: str
    type: str
    params: int
    trainable: int
    mode: str
    in_size: str | None = None
    out_size: str | None = None


class SummaryTotals(NamedTuple):
    trainable: int
    non_trainable: int
    total: int
    size_mb: float


def _numel(parameter: nn.Parameter) -> int:
    # A lazy module's parameters have no shape until the first forward pass.
    return 0 if isinstance(parameter, nn.parameter.UninitializedParameter) else parameter.numel()


def _shape(value: Any) -> Any:
    """Lightning's sizes: a tensor's shape as a list, lists and tuples element-wise, else ``"?"``."""
    if hasattr(value, "shape"):
        return list(value.shape)
    if isinstance(value, list | tuple):
        return [_shape(item) for item in value]
    return "?"


def _layer_sizes(module: nn.Module, layers: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """``{name: (input size, output size)}`` of the layers the example input's forward calls (the
    first call of each), as Lightning measures them: in eval mode, without gradients, the module's
    batch-transfer hooks moving the example to its device; every submodule's mode is restored."""
    from ember.trainer.module_tools import call_forward, eval_mode

    example = getattr(module, "example_input_array", None)
    prepare = getattr(module, "_example_on_device", None)
    if prepare is not None:
        example = prepare(example, "ModelSummary")
    sizes: dict[str, tuple[str, str]] = {}
    handles = []

    def record(name: str) -> Any:
        def hook(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if name not in sizes:
                inputs: Any = (*args, *kwargs.values())
                sizes[name] = (str(_shape(inputs[0] if len(inputs) == 1 else inputs)), str(_shape(output)))

        return hook

    try:
        for name, layer in layers.items():
            if not isinstance(layer, torch.jit.ScriptModule):  # (which take no hooks)
                handles.append(layer.register_forward_hook(record(name), with_kwargs=True))
        with eval_mode(module), torch.no_grad():
            call_forward(module, example)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def summarize(module: nn.Module, max_depth: int = 1) -> list[SummaryRow]:
    """Rows for the submodules of ``module`` nested at most ``max_depth`` deep (-1: all).

    Depth 1 is the direct children. A parameter shared by two submodules counts in both rows,
    but once in :func:`summarize_totals`. When ``module.example_input_array`` is set (a
    :class:`~ember.TrainModule`'s), one forward pass with it fills each row's input and output sizes.
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
        raise ValueError(f"max_depth={max_depth!r} must be an int >= -1 (-1 shows every level)")
    layers = {
        name: submodule
        for name, submodule in module.named_modules()
        if name and (max_depth == -1 or name.count(".") + 1 <= max_depth)
    }
    sized = bool(layers) and getattr(module, "example_input_array", None) is not None
    sizes = _layer_sizes(module, layers) if sized else {}
    rows = []
    for name, submodule in layers.items():
        params = list(submodule.parameters())
        rows.append(
            SummaryRow(
                name=name,
                type=type(submodule).__name__,
                params=sum(_numel(p) for p in params),
                trainable=sum(_numel(p) for p in params if p.requires_grad),
                mode="train" if submodule.training else "eval",
                in_size=sizes.get(name, ("?", "?"))[0] if sized else None,
                out_size=sizes.get(name, ("?", "?"))[1] if sized else None,
            )
        )
    return rows


def summarize_totals(module: nn.Module) -> SummaryTotals:
    """Parameter counts of the whole module, and its parameters' size in MB at their own dtypes."""
    params = list(module.parameters())  # shared parameters appear once
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    total = sum(_numel(p) for p in params)
    size = sum(_numel(p) * p.element_size() for p in params)
    return SummaryTotals(trainable, total - trainable, total, size / 1e6)


def _human(count: int) -> str:
    """``1234567`` -> ``"1.2 M"``; small counts stay exact."""
    for divisor, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= divisor:
            return f"{count / divisor:.1f} {suffix}"
    return str(count)


_HEADER = ("", "Name", "Type", "Params", "Trainable", "Mode")
_SIZES = ("In sizes", "Out sizes")  # with an example_input_array, as in Lightning
_RIGHT = ("", "Params", "Trainable")  # columns aligned right


def _header(rows: list[SummaryRow]) -> tuple[str, ...]:
    return _HEADER + _SIZES if rows and rows[0].in_size is not None else _HEADER


def _cells(rows: list[SummaryRow]) -> list[tuple[str, ...]]:
    sized = _header(rows) != _HEADER
    return [
        (str(i), r.name, r.type, _human(r.params), _human(r.trainable), r.mode)
        + ((r.in_size or "?", r.out_size or "?") if sized else ())
        for i, r in enumerate(rows)
    ]


def _totals(totals: SummaryTotals) -> list[tuple[str, str]]:
    return [
        (_human(totals.trainable), "Trainable params"),
        (_human(totals.non_trainable), "Non-trainable params"),
        (_human(totals.total), "Total params"),
        (f"{totals.size_mb:,.3f}", "Total estimated params size (MB)"),
    ]


def _plain(rows: list[SummaryRow], totals: SummaryTotals) -> str:
    """The summary as plain text, for a log file: no rich import, no box drawing."""
    lines = []
    if rows:
        header = _header(rows)
        cells = [header, *_cells(rows)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        for row in cells:
            parts = [
                c.rjust(w) if h in _RIGHT else c.ljust(w) for c, w, h in zip(row, widths, header, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
        lines.append("")
    width = max(len(number) for number, _ in _totals(totals))
    lines += [f"{number.rjust(width)}  {what}" for number, what in _totals(totals)]
    return "\n".join(lines)


def _table(rows: list[SummaryRow], header_style: str = "bold") -> Table:
    from rich.table import Table

    table = Table(header_style=header_style)
    for column in _header(rows):
        table.add_column(column, justify="right" if column in _RIGHT else "left")
    for cells in _cells(rows):
        table.add_row(*cells)
    return table


class ModelSummary(Callback):
    """On global rank 0, print the module's submodules up to ``max_depth`` and the parameter totals.

    ``max_depth=0`` prints only the totals; ``-1`` prints every level. When the module's
    ``example_input_array`` is set, the table also shows each layer's input and output sizes.
    ``summarize_kwargs``: Lightning's one, ``header_style``, the rich table header's style.

    Example::

        trainer = Trainer(callbacks=[ModelSummary(max_depth=2)])
        trainer.fit(module, loader)  # a table of layers, then "Total params  1.2 M" etc.
    """

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        owner = type(self).__name__
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(f"{owner}(max_depth={max_depth!r}) must be an int >= -1 (-1 shows every level)")
        unknown = sorted(set(summarize_kwargs) - {"header_style"})
        if unknown:
            raise TypeError(
                f"{owner}({unknown[0]}={summarize_kwargs[unknown[0]]!r}) is not a summarize keyword: "
                "the valid one is 'header_style'"
            )
        header_style = summarize_kwargs.get("header_style", "bold")
        if not isinstance(header_style, str):
            raise TypeError(f"{owner}(header_style={header_style!r}) must be a rich style string")
        self._max_depth = max_depth
        self._header_style = header_style

    def _table(self, rows: list[SummaryRow]) -> Table:
        """The rich table of ``rows``, with this summary's header style."""
        return _table(rows, self._header_style)

    @override
    def on_fit_start(self, trainer: Trainer, module: TrainModule) -> None:
        # The example input's forward runs on every process, as in Lightning: under FSDP or DeepSpeed
        # it gathers parameters, which takes all of them.
        if not trainer.is_global_zero:
            if self._max_depth and getattr(module, "example_input_array", None) is not None:
                summarize(module, self._max_depth)
            return
        rows = summarize(module, self._max_depth)
        totals = summarize_totals(module)
        if not may_be_terminal():  # a log file: plain text, and rich's modules stay unimported
            print(_plain(rows, totals), flush=True)
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        if rows:
            console.print(self._table(rows))
        summary = Table.grid(padding=(0, 2))
        summary.add_column(justify="right")
        summary.add_column()
        for number, what in _totals(totals):
            summary.add_row(number, what)
        console.print(summary)


class RichModelSummary(ModelSummary):
    """Lightning's name for its rich-drawn summary. Ember's :class:`ModelSummary` draws with rich
    already (plain text when the output is not a terminal): this is the same callback."""
