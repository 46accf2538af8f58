"""What a spec can be wrong in: one ``Problem`` per key, raised together as ``SpecError``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec."""

    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "" if self.value is MISSING else f" (got {self.value!r})"
        return f"{self.key}: {self.message}{shown}"


MISSING = object()


class SpecError(ValueError):
    """Every problem found in a job spec."""

    def __init__(self, problems: Iterable[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        """One screen: a line per problem."""
        where = f" in {self.source}" if self.source else ""
        n = len(self.problems)
        head = f"invalid job spec{where}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class FieldProblems(ValueError):
    """Raised inside a section validator to report several fields at once."""

    def __init__(self, problems: list[tuple[str, Any, str]]) -> None:
        super().__init__("; ".join(m for _, _, m in problems))
        self.problems = problems
