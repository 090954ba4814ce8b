"""Units in scenario files: parse suffixed strings into SI floats.

Theory of operation
-------------------
A scenario author writes durations and frequencies the way a human would
(``30s``, ``250ms``, ``1.5us``, ``1GHz``); the rest of qnetem only ever sees SI
floats (seconds, hertz) in attributes whose names carry the unit (``t2_s``,
``pulse_rate_hz``).  This module is the only place that knows the suffixes.

Two layers:

* pure parse functions (``parse_duration_s``, ``parse_frequency_hz``,
  ``parse_number``, ...) that take what ``yaml.safe_load`` produced and return a
  float or raise :class:`UnitError` (a ``ValueError``) whose message names the
  accepted suffixes;
* pydantic ``Annotated`` types (``Duration``, ``Frequency``, ``Probability``, ...)
  that wrap those functions in a ``BeforeValidator`` and turn :class:`UnitError`
  into a ``PydanticCustomError`` so the message reaches the user unchanged.

Numbers are accepted as YAML numbers or as plain numeric strings, because
PyYAML follows YAML 1.1 and reads ``1e9`` (no dot) as the *string* ``"1e9"``.
Booleans are never numbers (``True`` is an ``int`` in Python, not in a scenario),
NaN is never accepted, and infinity only where a type says so (memory T1/T2).

Fields whose name already carries the unit (``length_km``,
``attenuation_db_per_km``) take plain numbers: a suffix there would say the unit
twice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, PlainSerializer
from pydantic_core import PydanticCustomError

__all__ = [
    "DURATION_UNITS_S",
    "FREQUENCY_UNITS_HZ",
    "Count",
    "Duration",
    "Efficiency",
    "Frequency",
    "Lifetime",
    "NonNegativeFloat",
    "Number",
    "OpenProbability",
    "PositiveDuration",
    "PositiveFloat",
    "Probability",
    "TypeDoc",
    "UnitError",
    "parse_count",
    "parse_duration_s",
    "parse_efficiency",
    "parse_frequency_hz",
    "parse_lifetime_s",
    "parse_non_negative_float",
    "parse_number",
    "parse_open_probability",
    "parse_positive_duration_s",
    "parse_positive_float",
    "parse_probability",
]

#: Duration suffix -> seconds.  Both the micro sign (U+00B5) and the Greek mu
#: (U+03BC) are accepted for microseconds because keyboards produce either.
DURATION_UNITS_S: Final[dict[str, float]] = {
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ns": 1e-9,
    "min": 60.0,
    "h": 3600.0,
}

#: Frequency suffix -> hertz.  Case-sensitive on purpose: ``mHz`` (millihertz)
#: and ``MHz`` (megahertz) differ by nine orders of magnitude.
FREQUENCY_UNITS_HZ: Final[dict[str, float]] = {
    "Hz": 1.0,
    "kHz": 1e3,
    "MHz": 1e6,
    "GHz": 1e9,
}

_DURATION_SUFFIXES: Final = "s, ms, us, µs, ns, min, h"
_FREQUENCY_SUFFIXES: Final = "Hz, kHz, MHz, GHz"
_INFINITY_WORDS: Final = frozenset({"inf", "+inf", "infinity", "+infinity", ".inf", "+.inf"})

# A decimal number (optional sign, optional fraction, optional exponent) and an
# optional alphabetic suffix, with optional blanks between and around them.
_QUANTITY_RE: Final = re.compile(
    r"^\s*(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>[A-Za-z\u00b5\u03bc]*)\s*$"
)
_MAX_TEXT: Final = 64  # longer strings are not quantities; keeps messages short


class UnitError(ValueError):
    """A value could not be read as the quantity a field expects.

    ``code`` is a short machine-readable kind (``duration``, ``frequency``,
    ``number``, ...); ``str(err)`` is the human message.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _show(value: Any) -> str:
    """Short, safe rendering of a user value for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _as_float(value: Any, code: str, what: str) -> float:
    """Read an int, float or numeric string (no suffix) as a float; reject bool/NaN."""
    if isinstance(value, bool):
        raise UnitError(code, f"expected {what}, got a boolean ({_show(value)})")
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise UnitError(code, f"{what} {_show(value)} is too large") from None
    if isinstance(value, float):
        if math.isnan(value):
            raise UnitError(code, f"expected {what}, got NaN")
        return value
    if isinstance(value, str):
        match = _QUANTITY_RE.match(value) if len(value) <= _MAX_TEXT else None
        if match is None or match["unit"]:
            raise UnitError(code, f"expected {what}, got {_show(value)}")
        return float(match["num"])
    raise UnitError(code, f"expected {what}, got {type(value).__name__}")


def _finite(x: float, code: str, what: str, original: Any) -> float:
    if not math.isfinite(x):
        raise UnitError(code, f"{what} must be finite, got {_show(original)}")
    return x


def parse_number(value: Any) -> float:
    """Any finite number: YAML int/float or a numeric string such as ``"1e9"``."""
    return _finite(_as_float(value, "number", "a number"), "number", "number", value)


def parse_positive_float(value: Any) -> float:
    """A finite number > 0."""
    x = parse_number(value)
    if not x > 0:
        raise UnitError("positive_number", f"must be > 0, got {_show(value)}")
    return x


def parse_non_negative_float(value: Any) -> float:
    """A finite number >= 0."""
    x = parse_number(value)
    if not x >= 0:
        raise UnitError("non_negative_number", f"must be >= 0, got {_show(value)}")
    return x


def parse_probability(value: Any) -> float:
    """A number in the closed interval [0, 1]."""
    x = _as_float(value, "probability", "a probability (number between 0 and 1)")
    if not 0.0 <= x <= 1.0:
        raise UnitError("probability", f"must be between 0 and 1, got {_show(value)}")
    return x


def parse_open_probability(value: Any) -> float:
    """A number in the open interval (0, 1): a security parameter, a basis choice, a sample share."""
    x = _as_float(value, "open_probability", "a number > 0 and < 1")
    if not 0.0 < x < 1.0:
        raise UnitError("open_probability", f"must be > 0 and < 1, got {_show(value)}")
    return x


def parse_efficiency(value: Any) -> float:
    """A number in the half-open interval (0, 1]: an efficiency of 0 never detects anything."""
    x = _as_float(value, "efficiency", "an efficiency (number in (0, 1])")
    if not 0.0 < x <= 1.0:
        raise UnitError("efficiency", f"must be > 0 and <= 1, got {_show(value)}")
    return x


def parse_count(value: Any) -> int:
    """An integer; integral floats and numeric strings (``"1e3"``) are accepted."""
    if isinstance(value, bool):
        raise UnitError("integer", f"expected an integer, got a boolean ({_show(value)})")
    if isinstance(value, int):
        return value
    x = _as_float(value, "integer", "an integer")
    if not math.isfinite(x) or x != math.floor(x):
        raise UnitError("integer", f"expected an integer, got {_show(value)}")
    return int(x)


def _parse_quantity(value: Any, units: dict[str, float], code: str, what: str, suffixes: str,
                    example: str) -> float:
    hint = f"use a number of {what} or a number with one of the suffixes {suffixes} (e.g. {example})"
    if isinstance(value, str):
        match = _QUANTITY_RE.match(value) if len(value) <= _MAX_TEXT else None
        if match is None:
            raise UnitError(code, f"invalid {code} {_show(value)}: {hint}")
        unit = match["unit"]
        if unit and unit not in units:
            raise UnitError(code, f"unknown unit {unit!r} in {_show(value)}: {hint}")
        return float(match["num"]) * (units[unit] if unit else 1.0)
    try:
        return _as_float(value, code, f"a {code}")
    except UnitError:
        raise UnitError(code, f"invalid {code} {_show(value)}: {hint}") from None


def parse_duration_s(value: Any) -> float:
    """A finite duration >= 0 in seconds: a number, or ``30s``, ``250ms``, ``1.5us``, ``2min``."""
    x = _parse_quantity(value, DURATION_UNITS_S, "duration", "seconds", _DURATION_SUFFIXES, "30s, 250ms")
    _finite(x, "duration", "duration", value)
    if x < 0:
        raise UnitError("duration", f"duration must be >= 0, got {_show(value)}")
    return x


def parse_positive_duration_s(value: Any) -> float:
    """A finite duration > 0 in seconds."""
    x = parse_duration_s(value)
    if x == 0:
        raise UnitError("duration", f"duration must be > 0, got {_show(value)}")
    return x


def parse_lifetime_s(value: Any) -> float:
    """A duration > 0 in seconds, or ``inf`` (never decays): memory T1 and T2."""
    if isinstance(value, str) and value.strip().lower() in _INFINITY_WORDS:
        return math.inf
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return math.inf  # YAML `.inf`
    try:
        return parse_positive_duration_s(value)
    except UnitError as err:
        raise UnitError("lifetime", f"{err} (or inf for no decay)") from None


def parse_frequency_hz(value: Any) -> float:
    """A finite frequency > 0 in hertz: a number, ``"1e9"``, ``1GHz``, ``10MHz``, ``1kHz``, ``50Hz``."""
    x = _parse_quantity(value, FREQUENCY_UNITS_HZ, "frequency", "hertz", _FREQUENCY_SUFFIXES, "1GHz, 10MHz")
    _finite(x, "frequency", "frequency", value)
    if not x > 0:
        raise UnitError("frequency", f"frequency must be > 0, got {_show(value)}")
    return x


@dataclass(frozen=True, slots=True)
class TypeDoc:
    """Annotated metadata: how the scenario reference names and explains a type."""

    label: str
    explanation: str = ""


def _pydantic(parse: Any) -> BeforeValidator:
    """Wrap a parse function so its UnitError message reaches the user verbatim."""

    def validate(value: Any) -> Any:
        try:
            return parse(value)
        except UnitError as err:
            # The text goes in the context, not the template: user input may hold braces.
            raise PydanticCustomError(err.code, "{message}", {"message": str(err)}) from None

    return BeforeValidator(validate)


def _inf_as_text(x: float) -> float | str:
    # JSON has no infinity: the normalised (JSON) form writes "inf", which
    # parse_lifetime_s reads back.
    return "inf" if math.isinf(x) else x


_NUMBER_TEXT: Final = 'a finite number; numeric text such as "1e9" counts'
Number = Annotated[float, _pydantic(parse_number), TypeDoc("number", _NUMBER_TEXT)]
PositiveFloat = Annotated[float, _pydantic(parse_positive_float), TypeDoc("number > 0", _NUMBER_TEXT + ", > 0")]
NonNegativeFloat = Annotated[float, _pydantic(parse_non_negative_float), TypeDoc("number >= 0", _NUMBER_TEXT + ", >= 0")]
Probability = Annotated[float, _pydantic(parse_probability), TypeDoc("probability", "a number from 0 to 1")]
OpenProbability = Annotated[
    float, _pydantic(parse_open_probability), TypeDoc("probability in (0, 1)", "a number > 0 and < 1")
]
Efficiency = Annotated[float, _pydantic(parse_efficiency), TypeDoc("efficiency", "a number > 0 and <= 1")]
Count = Annotated[int, _pydantic(parse_count), TypeDoc("integer", 'a whole number; integral text such as "1e3" counts')]
Duration = Annotated[
    float, _pydantic(parse_duration_s),
    TypeDoc("duration", f"seconds >= 0, as a number or with a suffix ({_DURATION_SUFFIXES})"),
]
PositiveDuration = Annotated[
    float, _pydantic(parse_positive_duration_s),
    TypeDoc("duration > 0", f"seconds > 0, as a number or with a suffix ({_DURATION_SUFFIXES})"),
]
Lifetime = Annotated[
    float, _pydantic(parse_lifetime_s), PlainSerializer(_inf_as_text, when_used="json"),
    TypeDoc("duration or inf", "a duration > 0, or `inf` for no decay"),
]
Frequency = Annotated[
    float, _pydantic(parse_frequency_hz),
    TypeDoc("frequency", f"hertz > 0, as a number or with a suffix ({_FREQUENCY_SUFFIXES})"),
]
