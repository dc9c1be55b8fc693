"""A strategy's options given to the strategy itself, as Lightning's strategies take them
(``DDPStrategy(find_unused_parameters=True)``), or in its config object
(``DDPStrategy(DDPConfig(find_unused_parameters=True))``): one config either way."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["config_of"]

C = TypeVar("C")


def config_of(
    owner: str,
    kind: type[C],
    config: C | None,
    options: dict[str, Any],
    renamed: Mapping[str, str] | None = None,
    refused: Mapping[str, str] | None = None,
) -> C:
    """``config``, or a ``kind`` made of ``options`` (its fields; Lightning's names in ``renamed``,
    field by field); not both. A name in ``refused`` raises ``TypeError`` saying what to do instead."""
    if not options:
        return config if config is not None else kind()
    fields = [f.name for f in dataclasses.fields(kind)]  # type: ignore[arg-type]
    given: dict[str, Any] = {}
    for name, value in options.items():
        if refused and name in refused:
            raise TypeError(f"{owner}({name}=...): {refused[name]}")
        field = (renamed or {}).get(name, name)
        if field not in fields:
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {name!r}. Valid keywords: "
                + ", ".join(fields + sorted(renamed or {}))
            )
        given[field] = value
    if config is not None:
        raise TypeError(
            f"{owner}({kind.__name__}(...), {', '.join(f'{n}=...' for n in options)}): give the options in the "
            f"{kind.__name__} or as keywords, not both"
        )
    return kind(**given)
