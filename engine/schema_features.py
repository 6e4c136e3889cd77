"""Which JSON Schema features a constrained request may use: what the grammar engine would not enforce.

xgrammar compiles most of JSON Schema into a grammar but silently ignores a few keywords; a request
using them would get output that does not validate. We refuse those with a message naming each one
and where it is (a JSON pointer), instead of breaking the promise that the output validates.
"""

from __future__ import annotations

from typing import Any

UNSUPPORTED = {
    "not": "negation",
    "if": "conditionals",
    "then": "conditionals",
    "else": "conditionals",
    "allOf": "intersections",
    "dependentSchemas": "dependent schemas",
    "unevaluatedProperties": "unevaluated properties",
    "unevaluatedItems": "unevaluated items",
    "$dynamicRef": "dynamic references",
    "$recursiveRef": "recursive references",
}
"""Validation keywords the grammar would ignore, with what they are called in the error."""

FORMATS = frozenset(
    {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"}
)
"""String formats the grammar enforces."""

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames", "contains", "not", "if", "then", "else")


def unsupported_features(schema: Any, path: str = "#") -> list[str]:
    """Every unsupported keyword or format in `schema` and its subschemas, as "'not' (negation) at #/...".

    Example: {"properties": {"a": {"not": {}}}} -> ["'not' (negation) at #/properties/a"].
    """
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        return [f"a schema must be an object or a boolean, got {type(schema).__name__} at {path}"]
    problems = [f"'{key}' ({UNSUPPORTED[key]}) at {path}" for key in schema if key in UNSUPPORTED]
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in FORMATS:
        problems.append(f"format '{fmt}' at {path} (supported: {', '.join(sorted(FORMATS))})")
    for key, sub in _subschemas(schema):
        problems += unsupported_features(sub, f"{path}/{key}")
    return problems


def _subschemas(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """(pointer suffix, subschema) for every schema nested directly in `schema`."""
    found: list[tuple[str, Any]] = []
    for key in _SCHEMA_MAPS:
        value = schema.get(key)
        if isinstance(value, dict):
            found += [(f"{key}/{name}", sub) for name, sub in value.items()]
    for key in _SCHEMA_LISTS:
        value = schema.get(key)
        if isinstance(value, list):
            found += [(f"{key}/{i}", sub) for i, sub in enumerate(value)]
    found += [(key, schema[key]) for key in _SCHEMA_VALUES if isinstance(schema.get(key), dict | bool)]
    return found
