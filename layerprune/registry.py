"""Registries of pruning methods: one per kind (solvers, allocators), filled by a decorator on each method's class.

A method is a class with a ``name`` and ``options``, its settings declared once (typed, with a default and a help
line); the CLI builds its flags from them (``layerprune prune --help`` groups them per method):

    from layerprune.registry import Option, register_solver

    @register_solver
    class Toy:
        name = "toy"
        needs = frozenset()
        options = (Option("knob", int, None, "how hard to prune (default 1)"),)

        def prune(self, weight, stats, sparsity, nm=None, knob=1): ...

Option.default is the flag's default: a value that is not None is always passed to the method, None means "not
given, the method's own keyword default applies" (so a run record lists what the user set). A bool option is a flag
that flips its default (``flag="--no-compensate"`` for a default of True). An optional classmethod
``resolve_options(values) -> dict`` turns the flag values into the keyword options and checks how they combine.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

from layerprune.errors import UserError


def _int_at_least(v: str, low: int, words: str) -> int:
    """``v`` as an integer >= ``low``, or an argparse error saying it must be ``words``."""
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"{v} must be {words}")
    return n


def positive_int(v: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(v, 1, "at least 1")


def nonneg_int(v: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(v, 0, "0 or more")


@dataclass(frozen=True)
class Option:
    name: str  # the keyword the method takes
    type: Callable = str  # parses the flag's text (bool: a flag without value)
    default: Any = None  # see the module docstring
    help: str = ""
    choices: tuple | None = None
    flag: str | None = None  # default: --name with "_" -> "-"

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:  # the argparse attribute of the flag
        return self.cli_flag.lstrip("-").replace("-", "_")


class Registry:
    """name -> class, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator. A second class under a taken name is refused."""
        old = self._entries.get(cls.name)
        if old is not None:
            raise ValueError(f"two {self.kind}s named {cls.name!r}: {old.__module__}.{old.__qualname__} and "
                             f"{cls.__module__}.{cls.__qualname__}; rename one")
        for o in getattr(cls, "options", ()):
            if not isinstance(o, Option):
                raise ValueError(f"{self.kind} {cls.name!r}: options must be Option(...), got {o!r}")
        self._entries[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        del self._entries[name]

    @contextmanager
    def registered(self, cls: type):
        """Register ``cls`` for the duration of a with-block (tests)."""
        self.register(cls)
        try:
            yield cls
        finally:
            self.unregister(cls.name)

    def get(self, name: str) -> type:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> type:
        return self._entries[name]

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return list(self._entries.items())

    def options(self) -> dict[str, tuple[Option, list[str]]]:
        """Every declared option by flag, once: (the first declaration, the names of the methods declaring it).
        Methods sharing a flag must declare it alike (type, default, choices, keyword)."""
        out: dict[str, tuple[Option, list[str]]] = {}
        for name, cls in self._entries.items():
            for o in getattr(cls, "options", ()):
                if o.cli_flag not in out:
                    out[o.cli_flag] = (o, [name])
                    continue
                first, owners = out[o.cli_flag]
                if (o.name, o.type, o.default, o.choices) != (first.name, first.type, first.default, first.choices):
                    raise ValueError(f"{o.cli_flag} is declared differently by {self.kind}s {owners[0]!r} and "
                                     f"{name!r}: make the declarations agree or rename the flag")
                owners.append(name)
        return out


def resolve(cls: type, values: dict) -> dict:
    """The keyword options a method runs with, from its declared options' values (None: not given)."""
    hook = getattr(cls, "resolve_options", None)
    return hook(values) if hook is not None else {k: v for k, v in values.items() if v is not None}


SOLVER_REGISTRY = Registry("solver")
ALLOCATOR_REGISTRY = Registry("allocation")
register_solver = SOLVER_REGISTRY.register
register_allocator = ALLOCATOR_REGISTRY.register
