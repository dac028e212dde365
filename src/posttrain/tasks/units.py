"""The unit table of the unit-conversion task: every unit's exact size in its dimension's base
unit (a Fraction: 1 inch = 0.0254 m exactly, 1 US gallon = 3.785411784 L, ...), the names people
write for it, and exact conversion (temperatures by their affine formulas). A test checks the
table against `pint` on every unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Unit:
    key: str
    dimension: str
    singular: str
    plural: str
    abbrev: str
    factor: Fraction  # value in the dimension's base unit (unused for temperature)
    pint: str  # the same unit as a pint expression (checked in tests)


def _u(dim: str, key: str, singular: str, plural: str, abbrev: str, factor: str, pint: str) -> Unit:
    return Unit(key, dim, singular, plural, abbrev, Fraction(factor), pint)


UNITS: list[Unit] = [
    # length, base metre
    _u("length", "mm", "millimeter", "millimeters", "mm", "0.001", "millimeter"),
    _u("length", "cm", "centimeter", "centimeters", "cm", "0.01", "centimeter"),
    _u("length", "m", "meter", "meters", "m", "1", "meter"),
    _u("length", "km", "kilometer", "kilometers", "km", "1000", "kilometer"),
    _u("length", "in", "inch", "inches", "in", "0.0254", "inch"),
    _u("length", "ft", "foot", "feet", "ft", "0.3048", "foot"),
    _u("length", "yd", "yard", "yards", "yd", "0.9144", "yard"),
    _u("length", "mi", "mile", "miles", "mi", "1609.344", "mile"),
    _u("length", "nmi", "nautical mile", "nautical miles", "nmi", "1852", "nautical_mile"),
    # mass, base kilogram
    _u("mass", "mg", "milligram", "milligrams", "mg", "0.000001", "milligram"),
    _u("mass", "g", "gram", "grams", "g", "0.001", "gram"),
    _u("mass", "kg", "kilogram", "kilograms", "kg", "1", "kilogram"),
    _u("mass", "t", "metric ton", "metric tons", "t", "1000", "metric_ton"),
    _u("mass", "oz", "ounce", "ounces", "oz", "0.028349523125", "ounce"),
    _u("mass", "lb", "pound", "pounds", "lb", "0.45359237", "pound"),
    _u("mass", "st", "stone", "stones", "st", "6.35029318", "stone"),
    # volume, base litre (US customary units)
    _u("volume", "ml", "milliliter", "milliliters", "mL", "0.001", "milliliter"),
    _u("volume", "l", "liter", "liters", "L", "1", "liter"),
    _u("volume", "m3", "cubic meter", "cubic meters", "m^3", "1000", "meter ** 3"),
    _u("volume", "gal", "gallon", "gallons", "gal", "3.785411784", "gallon"),
    _u("volume", "qt", "quart", "quarts", "qt", "0.946352946", "quart"),
    _u("volume", "pt", "pint", "pints", "pt", "0.473176473", "pint"),
    _u("volume", "cup", "cup", "cups", "cup", "0.2365882365", "cup"),
    _u("volume", "floz", "fluid ounce", "fluid ounces", "fl oz", "0.0295735295625", "fluid_ounce"),
    _u("volume", "tbsp", "tablespoon", "tablespoons", "tbsp", "0.01478676478125", "tablespoon"),
    _u("volume", "tsp", "teaspoon", "teaspoons", "tsp", "0.00492892159375", "teaspoon"),
    # time, base second
    _u("time", "ms", "millisecond", "milliseconds", "ms", "0.001", "millisecond"),
    _u("time", "s", "second", "seconds", "s", "1", "second"),
    _u("time", "min", "minute", "minutes", "min", "60", "minute"),
    _u("time", "h", "hour", "hours", "h", "3600", "hour"),
    _u("time", "day", "day", "days", "day", "86400", "day"),
    _u("time", "week", "week", "weeks", "week", "604800", "week"),
    # speed, base metre per second
    _u("speed", "m/s", "meter per second", "meters per second", "m/s", "1", "meter / second"),
    _u(
        "speed",
        "km/h",
        "kilometer per hour",
        "kilometers per hour",
        "km/h",
        "5/18",
        "kilometer / hour",
    ),
    _u("speed", "mph", "mile per hour", "miles per hour", "mph", "0.44704", "mile / hour"),
    _u("speed", "kn", "knot", "knots", "kn", "463/900", "knot"),
    _u("speed", "ft/s", "foot per second", "feet per second", "ft/s", "0.3048", "foot / second"),
    # area, base square metre
    _u(
        "area",
        "cm2",
        "square centimeter",
        "square centimeters",
        "cm^2",
        "0.0001",
        "centimeter ** 2",
    ),
    _u("area", "m2", "square meter", "square meters", "m^2", "1", "meter ** 2"),
    _u("area", "km2", "square kilometer", "square kilometers", "km^2", "1000000", "kilometer ** 2"),
    _u("area", "ha", "hectare", "hectares", "ha", "10000", "hectare"),
    _u("area", "acre", "acre", "acres", "acre", "4046.8564224", "43560 * foot ** 2"),
    _u("area", "ft2", "square foot", "square feet", "ft^2", "0.09290304", "foot ** 2"),
    _u("area", "in2", "square inch", "square inches", "in^2", "0.00064516", "inch ** 2"),
    _u("area", "mi2", "square mile", "square miles", "mi^2", "2589988.110336", "mile ** 2"),
    # data size, base byte (kilo = 1000, kibi = 1024)
    _u("data", "bit", "bit", "bits", "bit", "0.125", "bit"),
    _u("data", "B", "byte", "bytes", "B", "1", "byte"),
    _u("data", "kB", "kilobyte", "kilobytes", "kB", "1000", "kilobyte"),
    _u("data", "MB", "megabyte", "megabytes", "MB", "1000000", "megabyte"),
    _u("data", "GB", "gigabyte", "gigabytes", "GB", "1000000000", "gigabyte"),
    _u("data", "TB", "terabyte", "terabytes", "TB", "1000000000000", "terabyte"),
    _u("data", "KiB", "kibibyte", "kibibytes", "KiB", "1024", "kibibyte"),
    _u("data", "MiB", "mebibyte", "mebibytes", "MiB", "1048576", "mebibyte"),
    _u("data", "GiB", "gibibyte", "gibibytes", "GiB", "1073741824", "gibibyte"),
    # temperature (affine; factor unused)
    _u("temperature", "C", "degree Celsius", "degrees Celsius", "°C", "1", "degC"),
    _u("temperature", "F", "degree Fahrenheit", "degrees Fahrenheit", "°F", "1", "degF"),
    _u("temperature", "K", "kelvin", "kelvins", "K", "1", "kelvin"),
]
BY_KEY = {u.key: u for u in UNITS}
DIMENSIONS = sorted({u.dimension for u in UNITS})


ALIASES = {  # other names people write for a unit (British spellings, short forms)
    "mm": ["millimetres"], "cm": ["centimetres"], "m": ["metres"], "km": ["kilometres", "kms"],
    "in": ["in."], "ft": ["ft."], "mi": ["mi."], "lb": ["lbs"], "oz": ["oz."], "t": ["tonnes"],
    "ml": ["ml", "millilitres"], "l": ["litres", "l"], "m3": ["m³"], "h": ["hrs", "hr"],
    "min": ["mins"], "s": ["sec", "secs"], "ms": ["msec"], "km/h": ["kph", "km/hr", "kilometres per hour"],
    "m/s": ["metres per second"], "kn": ["kt", "knots"], "m2": ["m²", "sq m", "square metres"],
    "ft2": ["sq ft"], "in2": ["sq in"], "km2": ["km²", "sq km"], "mi2": ["sq mi"], "cm2": ["cm²"],
    "C": ["C", "Celsius", "degrees C"], "F": ["F", "Fahrenheit", "degrees F"], "K": ["Kelvin"],
    "kB": ["KB"], "bit": ["b"], "day": ["d"], "week": ["wk", "wks"],
}  # fmt: skip


TEMPERATURE_RULES = {  # (from, to) -> (rule, arithmetic) for worked solutions
    ("C", "F"): ("°F = °C * 9/5 + 32", "{v} * 9/5 + 32"),
    ("F", "C"): ("°C = (°F - 32) * 5/9", "({v} - 32) * 5/9"),
    ("C", "K"): ("K = °C + 273.15", "{v} + 273.15"),
    ("K", "C"): ("°C = K - 273.15", "{v} - 273.15"),
    ("F", "K"): ("K = (°F - 32) * 5/9 + 273.15", "({v} - 32) * 5/9 + 273.15"),
    ("K", "F"): ("°F = (K - 273.15) * 9/5 + 32", "({v} - 273.15) * 9/5 + 32"),
}


def to_kelvin(value: Fraction, unit: str) -> Fraction:
    if unit == "C":
        return value + Fraction("273.15")
    if unit == "F":
        return (value - 32) * Fraction(5, 9) + Fraction("273.15")
    return value


def from_kelvin(value: Fraction, unit: str) -> Fraction:
    if unit == "C":
        return value - Fraction("273.15")
    if unit == "F":
        return (value - Fraction("273.15")) * Fraction(9, 5) + 32
    return value


def convert(value: str | Fraction | float, src: str, dst: str) -> float:
    """Exact conversion of `value` from unit key `src` to unit key `dst`, rounded once to float."""
    a, b = BY_KEY[src], BY_KEY[dst]
    if a.dimension != b.dimension:
        raise ValueError(f"cannot convert {a.dimension} ({src}) to {b.dimension} ({dst})")
    v = Fraction(str(value)) if not isinstance(value, Fraction) else value
    if a.dimension == "temperature":
        return float(from_kelvin(to_kelvin(v, src), dst))
    return float(v * a.factor / b.factor)
