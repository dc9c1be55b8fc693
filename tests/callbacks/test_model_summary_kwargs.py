"""``ModelSummary(max_depth, **summarize_kwargs)`` as Lightning's: ``header_style`` styles the rich
table's header; any other keyword is refused, naming the valid one."""

from __future__ import annotations

import pytest
from torch import nn

from ember.callbacks import ModelSummary, RichModelSummary
from ember.callbacks.model_summary import summarize


def test_header_style_styles_the_rich_table() -> None:
    summary = RichModelSummary(max_depth=1, header_style="bold red")
    rows = summarize(nn.Sequential(nn.Linear(2, 2)), 1)
    assert summary._table(rows).header_style == "bold red"
    assert ModelSummary()._table(rows).header_style == "bold"


def test_an_unknown_summarize_keyword_is_refused() -> None:
    with pytest.raises(TypeError, match=r"ModelSummary\(colour='red'\).*'header_style'"):
        ModelSummary(colour="red")
