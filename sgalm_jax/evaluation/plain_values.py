"""Plain values from the sandbox: the strict decoder of ``_sandbox_child.encode``'s format.

The sandboxed process is untrusted, so what it sends is parsed as data only: JSON, then this
tagged format, rebuilt as fresh objects of exact built-in (or standard-library) types. Anything
else, or anything too deep or too large, is a :class:`VerdictError`. The format:

* ``null`` / ``true`` / ``false`` / a JSON string / a JSON integer below 2**53;
* ``["int", hex]`` ``["float", float.hex]`` ``["complex", re_hex, im_hex]`` ``["bytes"|"bytearray", hex]``;
* ``["list"|"tuple"|"set"|"frozenset"|"deque"|"iter"|"keys"|"values", [items]]``;
* ``["dict"|"OrderedDict"|"Counter"|"defaultdict"|"items", [[key, value], ...]]``;
* ``["Decimal", str]`` ``["Fraction", num, den]`` ``["range", start, stop, step]`` ``["type", name]``.
"""

from __future__ import annotations

import collections
import decimal
import fractions
from typing import Any

MAX_SEQ = 1_000_000  # elements / characters the parent builds for one operation
MAX_DECODE_DEPTH = 120
MAX_HEX_DIGITS = 100_000


class VerdictError(Exception):
    """Evaluation of an assert failed in the parent (a probe raised, a value was not plain...)."""


_SEQ_TAGS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "deque": collections.deque}
_MAP_TAGS = {"dict": dict, "OrderedDict": collections.OrderedDict, "Counter": lambda items: collections.Counter(dict(items)),
             "defaultdict": lambda items: collections.defaultdict(None, items)}
_TYPES = {t.__name__: t for t in (int, float, str, bool, list, tuple, dict, set, frozenset, bytes,
                                  complex, bytearray, range, type(None))}


def decode_value(obj: Any, _depth: int = 0) -> Any:
    """A probe's encoded value as a fresh object of a plain built-in type; VerdictError otherwise."""
    if _depth > MAX_DECODE_DEPTH:
        raise VerdictError("value nested too deeply")
    t = type(obj)
    if obj is None or t is bool or t is str:
        return obj
    if t is int:
        if not -(1 << 53) < obj < (1 << 53):
            raise VerdictError("malformed value: unencoded large integer")
        return obj
    if t is not list or not obj or type(obj[0]) is not str:
        raise VerdictError(f"malformed value of type {t.__name__}")
    tag, args, d = obj[0], obj[1:], _depth + 1
    try:
        if tag in _SEQ_TAGS and len(args) == 1 and type(args[0]) is list:
            return _SEQ_TAGS[tag](decode_value(v, d) for v in args[0])
        if tag == "iter" and len(args) == 1 and type(args[0]) is list:
            return iter([decode_value(v, d) for v in args[0]])
        if tag == "keys" and len(args) == 1 and type(args[0]) is list:
            return dict.fromkeys(decode_value(v, d) for v in args[0]).keys()
        if tag == "values" and len(args) == 1 and type(args[0]) is list:
            return {i: decode_value(v, d) for i, v in enumerate(args[0])}.values()
        if (tag in _MAP_TAGS or tag == "items") and len(args) == 1 and type(args[0]) is list:
            pairs = []
            for kv in args[0]:
                if type(kv) is not list or len(kv) != 2:
                    raise VerdictError("malformed mapping")
                pairs.append((decode_value(kv[0], d), decode_value(kv[1], d)))
            if tag == "items":
                return dict(pairs).items()
            return _MAP_TAGS[tag](pairs)
        if tag == "int" and len(args) == 1 and type(args[0]) is str and len(args[0]) <= MAX_HEX_DIGITS:
            return int(args[0], 16)
        if tag == "float" and len(args) == 1 and type(args[0]) is str and len(args[0]) < 64:
            return float.fromhex(args[0])
        if tag == "complex" and len(args) == 2 and all(type(a) is str and len(a) < 64 for a in args):
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag in ("bytes", "bytearray") and len(args) == 1 and type(args[0]) is str:
            return (bytes if tag == "bytes" else bytearray).fromhex(args[0])
        if tag == "Decimal" and len(args) == 1 and type(args[0]) is str and len(args[0]) <= MAX_HEX_DIGITS:
            return decimal.Decimal(args[0])
        if tag == "Fraction" and len(args) == 2:
            n, m = decode_value(args[0], d), decode_value(args[1], d)
            if type(n) is not int or type(m) is not int:
                raise VerdictError("malformed Fraction")
            return fractions.Fraction(n, m)
        if tag == "range" and len(args) == 3 and all(type(a) is int for a in args):
            r = range(*args)
            if len(r) > MAX_SEQ:
                raise VerdictError("range too long")
            return r
        if tag == "type" and len(args) == 1 and args[0] in _TYPES:
            return _TYPES[args[0]]
    except VerdictError:
        raise
    except (ValueError, TypeError, ArithmeticError, decimal.InvalidOperation, OverflowError) as e:
        raise VerdictError(f"malformed value: {type(e).__name__}") from None
    raise VerdictError(f"malformed value tagged {tag[:40]!r}")


