"""The choices a Local SGD run makes, and the one check that every front end applies to them."""

from __future__ import annotations

from typing import Literal, TypeVar

_Choice = TypeVar("_Choice", bound=str)
BufferPolicy = Literal["average", "local"]
NonfinitePolicy = Literal["raise", "skip_worker"]
OptimizerStatePolicy = Literal["local", "average", "reset"]


def check_choice(name: str, value: object, allowed: tuple[_Choice, ...]) -> _Choice:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} ({value!r}) must be one of {choices}")
    return value
