"""Static bounds on a JSON schema's grammar cost, checked before any compiler sees it.

A schema is compiled into a grammar whose size grows with its numeric bounds, not with
its length: `{"type": "array", "maxItems": 1000000000}` is 60 bytes, and llguidance
unrolls it into a repetition that exhausted a 24 GB host. So every count a schema states
(array items, string length, object properties, `pattern` repetitions) is bounded, one
by one (`MAX_SCHEMA_BOUND`) and multiplied through nesting (`MAX_SCHEMA_PRODUCT`): an
array of arrays of strings costs items x items x length. What this check misses is still
contained by the sandboxed compile (preprocess.grammar.sandbox).
"""
from __future__ import annotations

import math
import re
from typing import Any

from ..contract import InvalidRequest

MAX_SCHEMA_BOUND = 10_000  # any one count; llguidance fails at about 100,000 array items (measured)
MAX_SCHEMA_PRODUCT = 1_000_000  # counts multiplied through nesting
MAX_SCHEMA_NODES = 10_000  # subschemas in one schema

# Keywords whose value is a count of the node's own repetitions.
COUNT_KEYWORDS = ("maxItems", "minItems", "maxLength", "minLength", "maxProperties", "minProperties",
                  "maxContains", "minContains")
# Keywords holding one subschema, a list of them, or a map of them.
ONE_SUBSCHEMA = ("items", "additionalItems", "unevaluatedItems", "contains", "additionalProperties",
                 "unevaluatedProperties", "propertyNames", "not", "if", "then", "else", "contentSchema")
LIST_OF_SUBSCHEMAS = ("prefixItems", "allOf", "anyOf", "oneOf", "items")
MAP_OF_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

_REPEAT = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")


def pattern_bound(pattern: str) -> int:
    """The largest number of repetitions a regular expression's counted quantifiers allow,
    multiplied through nested groups (`(a{100}){100}` is 10,000). Counts past the limit
    are clipped, so the product of a hostile pattern is still a small integer."""
    try:
        from re import _parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10 (the MetaX image)
        import sre_parse  # type: ignore[no-redef]
    try:
        parsed = sre_parse.parse(pattern)
    except Exception:  # JSON-schema (ECMA) syntax Python does not read: every count, multiplied
        product = 1
        for match in _REPEAT.finditer(pattern):
            low, high = match.group(1), match.group(2)
            product = min(product * max(1, min(int(high or low), MAX_SCHEMA_PRODUCT + 1)), MAX_SCHEMA_PRODUCT + 1)
        return product
    return _sre_bound(parsed, sre_parse)


def _sre_bound(parsed, sre_parse) -> int:
    repeats = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)}
    worst = 1
    for op, value in parsed:
        inner = 1
        if op in repeats:
            low, high, item = value
            count = low if high == sre_parse.MAXREPEAT else high  # "a{5,}" states 5; "a*" states none
            inner = max(1, min(count, MAX_SCHEMA_PRODUCT + 1)) * _sre_bound(item, sre_parse)
        elif op is sre_parse.SUBPATTERN:
            inner = _sre_bound(value[-1], sre_parse)
        elif op is sre_parse.BRANCH:
            inner = max((_sre_bound(branch, sre_parse) for branch in value[1]), default=1)
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            inner = _sre_bound(value[1], sre_parse)
        worst = min(max(worst, inner), MAX_SCHEMA_PRODUCT + 1)
    return worst


def check_schema_cost(schema: Any, where: str = "response_format's schema") -> None:
    """InvalidRequest naming the keyword and the limit when `schema` states a count over
    MAX_SCHEMA_BOUND, counts whose product through nesting is over MAX_SCHEMA_PRODUCT, or
    more than MAX_SCHEMA_NODES subschemas. Iterative: no recursion for a deep schema."""
    stack: list[tuple[Any, str, int]] = [(schema, "", 1)]
    nodes = 0
    while stack:
        node, path, product = stack.pop()
        if not isinstance(node, dict):
            continue
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidRequest(f"{where} has more than {MAX_SCHEMA_NODES} subschemas (the grammar limit)")
        own = 1
        for keyword in COUNT_KEYWORDS:
            value = node.get(keyword)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):  # JSON parsers here accept Infinity and NaN
                raise InvalidRequest(f"{where}: {path or '/'}{keyword} is {value}; a count must be a finite number "
                                     f"within the limit of {MAX_SCHEMA_BOUND}")
            if value > MAX_SCHEMA_BOUND:
                raise InvalidRequest(f"{where}: {path or '/'}{keyword} is {value:g}; the limit is "
                                     f"{MAX_SCHEMA_BOUND} (a grammar grows with every count)")
            own = max(own, int(value))
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            repeats = pattern_bound(pattern)
            if repeats > MAX_SCHEMA_BOUND:
                raise InvalidRequest(f"{where}: {path or '/'}pattern repeats up to {repeats} times; the limit is "
                                     f"{MAX_SCHEMA_BOUND} (a grammar grows with every count)")
            own = max(own, repeats)
        product *= own
        if product > MAX_SCHEMA_PRODUCT:
            raise InvalidRequest(f"{where}: the counts nested down to {path or '/'} multiply to {product}; "
                                 f"the limit is {MAX_SCHEMA_PRODUCT}")
        for keyword in ONE_SUBSCHEMA:
            if isinstance(node.get(keyword), dict):
                stack.append((node[keyword], f"{path}{keyword}/", product))
        for keyword in LIST_OF_SUBSCHEMAS:
            if isinstance(node.get(keyword), list):
                stack.extend((child, f"{path}{keyword}/{i}/", product) for i, child in enumerate(node[keyword]))
        for keyword in MAP_OF_SUBSCHEMAS:
            if isinstance(node.get(keyword), dict):
                # Definitions are reached through $ref from where they are used: counted from 1.
                start = 1 if keyword in ("$defs", "definitions") else product
                stack.extend((child, f"{path}{keyword}/{name}/", start) for name, child in node[keyword].items())
