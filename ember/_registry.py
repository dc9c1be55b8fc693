"""A name -> factory registry, filled by the classes themselves (strategies and precision plugins)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")


class _Entry(NamedTuple):
    # (a NamedTuple: a frozen dataclass costs ~2 ms of code generation at import, paid by every run)
    factory: Callable[..., Any]
    description: str
    preset: dict[str, Any]


class Registry(Generic[T]):
    """Maps names such as ``"ddp"`` or ``"bf16-mixed"`` to a factory plus preset keyword arguments."""

    def __init__(self, kind: str, argument: str) -> None:
        self._kind = kind
        self._argument = argument
        self._entries: dict[str, _Entry] = {}
        self._refused: dict[str, str] = {}  # names known from elsewhere (Lightning's), not offered: why
        # Names whose class lives in a module not imported yet: the loader imports it, which registers
        # them (a single-device run never pays for the DDP/FSDP/DeepSpeed/XLA modules).
        self._deferred: dict[str, Callable[[], None]] = {}

    def register(self, name: str, factory: Callable[..., T], description: str = "", **preset: Any) -> None:
        if name in self._entries and self._entries[name].factory is not factory:
            raise ValueError(f"{self._kind} name {name!r} is already registered")
        self._entries[name] = _Entry(factory, description, dict(preset))

    def defer(self, names: Iterable[str], load: Callable[[], None]) -> None:
        """Know ``names`` now; call ``load`` (which must register them) when one is first used."""
        for name in names:
            self._deferred[name] = load

    def _load(self, name: str) -> None:
        load = self._deferred.get(name)
        if load is None or name in self._entries:
            return
        load()
        for known, loader in list(self._deferred.items()):
            if loader is load:
                del self._deferred[known]
        if name not in self._entries:
            raise RuntimeError(f"loading {self._kind} {name!r} did not register it")

    def _load_all(self) -> None:
        """Load every deferred module: their refusals are known only then (errors only, never a run)."""
        for name in list(self._deferred):
            self._load(name)

    def refuse(self, name: str, reason: str) -> None:
        """Name one that users of another library may try, which is not offered: ``reason`` says what to use."""
        self._refused[name] = reason

    def refusal(self, name: str) -> str:
        """Why ``name`` is refused, ending in ". " (empty for a name not refused), for an error message."""
        if name not in self:
            self._load_all()
        return f"{self._refused[name]}. " if name in self._refused else ""

    def names(self) -> list[str]:
        return sorted({*self._entries, *self._deferred})

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._deferred

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check(self, name: str) -> None:
        """Raise the user-facing error for a name that is not registered."""
        if name not in self:
            raise ValueError(
                f"{self._argument}={name!r} is not a known {self._kind}. {self.refusal(name)}Valid choices: "
                + ", ".join(repr(n) for n in self.names())
            )

    def description(self, name: str) -> str:
        self.check(name)
        self._load(name)
        return self._entries[name].description

    def create(self, name: str, **kwargs: Any) -> T:
        self.check(name)
        self._load(name)
        entry = self._entries[name]
        made: T = entry.factory(**{**entry.preset, **kwargs})
        return made
