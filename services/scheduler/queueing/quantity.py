"""Resource quantities as the admin writes them and as reasons say them.

cpu: cores as a number (``4``, ``0.5``) or millicores (``"500m"``); memory: bytes as a number or
a quantity with a binary (``Ki``, ``Mi``, ``Gi``, ``Ti``) or decimal (``K``, ``M``, ``G``, ``T``)
suffix; gpu: a whole number of devices. Pure functions, no I/O.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

__all__ = ["amount", "format_amount", "format_memory", "parse_quantity"]

_MEMORY_UNITS: dict[str, int] = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"
_MEMORY_RE = re.compile(_NUMBER + r"([A-Za-z]*)")
_CPU_RE = re.compile(_NUMBER + r"(m?)")


def parse_quantity(resource: str, value: object) -> float:
    """The amount ``value`` means for ``resource`` (cores, bytes or devices).

    Raises:
        ValueError: not a quantity of that resource, or negative; the message says what is
            expected (it becomes a config problem).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected {_EXPECTED[resource]}, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"expected {_EXPECTED[resource]}, got {value!r}")
        if number < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        if resource == "gpu" and not number.is_integer():
            raise ValueError(f"expected {_EXPECTED[resource]}, got {value!r}")
        if resource == "memory":
            return float(math.ceil(number))
        return number
    if not isinstance(value, str):
        raise ValueError(f"expected {_EXPECTED[resource]}, got {value!r}")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"must not be negative, got {value!r}")
    if resource == "memory":
        match = _MEMORY_RE.fullmatch(text)
        if match is None or match.group(2) not in _MEMORY_UNITS:
            raise ValueError(f"expected {_EXPECTED[resource]}, got {value!r}")
        scaled = _decimal(match.group(1), value) * _MEMORY_UNITS[match.group(2)]
        return float(scaled.to_integral_value(rounding=ROUND_CEILING))
    if resource == "cpu":
        match = _CPU_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"expected {_EXPECTED[resource]}, got {value!r}")
        cores = _decimal(match.group(1), value)
        return float(cores / 1000 if match.group(2) else cores)
    if resource == "gpu" and text.isdigit():
        return float(int(text))
    raise ValueError(f"expected {_EXPECTED.get(resource, 'a number')}, got {value!r}")


_EXPECTED = {
    "cpu": "cores (4, 0.5) or millicores ('500m')",
    "memory": "bytes or a quantity like 512Mi, 32Gi, 1T",
    "gpu": "a whole number of devices",
}


def _decimal(text: str, original: object) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regexes only let decimals through
        raise ValueError(f"not a number: {original!r}") from None


def format_memory(value: float) -> str:
    """``32Gi``, ``512Mi``, ``1.5Gi`` or the bytes: the way an admin would write it."""
    for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= size:
            scaled = value / size
            if scaled.is_integer():
                return f"{int(scaled)}{suffix}"
            if value >= 4 * size or suffix == "Ki":
                return f"{scaled:.1f}{suffix}"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def amount(resource: str, value: float) -> str:
    """Just the number as a sentence shows it: ``4``, ``0.5``, ``32Gi``."""
    if resource == "memory":
        return format_memory(value)
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}"


def format_amount(resource: str, value: float) -> str:
    """The amount with its resource: ``4 cpu``, ``32Gi memory``, ``2 gpu``."""
    return f"{amount(resource, value)} {resource}"
