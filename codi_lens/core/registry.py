"""Registries: every string choice of the project (an intervention, a scope, a patch kind, an SAE architecture,
a dataset, a shipped model) is one entry in one :class:`Registry`, which also answers ``--help``,
validation and dispatch, so adding a choice is one entry in one file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from codi_lens.core.errors import ChoiceError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Names mapped to entries, in the order they were added.

    Args:
        what: the noun a message uses (``"intervention"``: "unknown intervention 'zap'; choose from ...").
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> Entry:
        """Register ``entry`` as ``name``; a name registered twice is a bug and raises ``ValueError``."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[Entry], Entry]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def __getitem__(self, name: str) -> Entry:
        """The entry of ``name``; :class:`ChoiceError` naming the choices otherwise."""
        if name not in self._entries:
            raise ChoiceError(f"unknown {self.what} {name!r}; choose from {self.help()}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterable[tuple[str, Entry]]:
        return self._entries.items()

    def help(self) -> str:
        """The choices as ``--help`` and error messages list them."""
        return ", ".join(self._entries)

    def check(self, names: Iterable[str], flag: str | None = None) -> list[str]:
        """``names`` as a list, each a choice (:class:`ChoiceError` naming ``flag`` and the first unknown one)."""
        names = list(names)
        unknown = [n for n in names if n not in self._entries]
        if unknown or not names:
            where = f"{flag}: " if flag else ""
            bad = repr(unknown[0]) if unknown else "(empty)"
            raise ChoiceError(f"{where}unknown {self.what} {bad}; choose from {self.help()}")
        return names

    def parse_list(self, text: str, flag: str) -> list[str]:
        """A comma-separated flag value as checked choices (``"zero,mean"`` -> ``["zero", "mean"]``)."""
        return self.check([item.strip() for item in text.split(",") if item.strip()], flag)
