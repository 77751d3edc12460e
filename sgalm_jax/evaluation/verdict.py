"""Test verdicts decided by the trusted parent, never by the process that runs untrusted code.

A test file (MBPP's ``test_setup_code`` + ``test_list``, or a generated sample's asserts) is
split by :func:`plan_tests` into

* *setup statements* (everything that is not a top-level ``assert``): run in the sandbox after
  the program, in order;
* one *plan* per top-level ``assert``: its expression with every sub-expression that needs the
  program replaced by a numbered *probe*. A probe is the smallest sub-expression that mentions a
  name the parent must not evaluate: a name the program or the setup code defines (the function
  under test, ``root`` built by setup code...) or any name outside the harness's trusted set.
  Only probes run in the sandbox.

The sandboxed process returns each probe's value as plain data (see ``_sandbox_child.encode``:
``None``/bool/int/float/complex/str/bytes, list/tuple/set/frozenset/dict, a few standard
containers, Decimal/Fraction, range, materialised iterators), which :func:`decode_value` turns
back into fresh objects of those exact built-in types, refusing anything else. The parent then
evaluates the rest of each assert itself (:class:`TrustedEvaluator`: comparisons, ``set()``,
``sorted()``, ``math.isclose``, arithmetic..., with size guards), so an object "equal to
everything", a patched ``builtins``, ``math.isclose = lambda *a: True`` or a forged "passed" line
cannot make an assert pass: the only thing a program controls is the plain values its own
expressions produce, exactly what a correct program also controls.

Which names are the program's: ``names_under_test`` (for MBPP, the names the *reference*
solution defines, so a candidate cannot move ``set`` or ``sorted`` to its side by redefining them)
plus whatever the setup statements define; without a reference, the names the program itself
defines at top level (Python's own shadowing rules). Asserts that cannot be split soundly (a
program name inside a comprehension or lambda, an assignment expression...) are not run: the
verdict is False with the reason, never a pass.
"""

from __future__ import annotations

import ast
import builtins
import collections
import decimal
import fractions
import math
import operator
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sgalm_jax.errors import SgalmError
from sgalm_jax.evaluation.plain_values import MAX_SEQ, VerdictError, decode_value

__all__ = ["AssertPlan", "Probe", "TestPlan", "TrustedEvaluator", "UnsupportedTest", "VerdictError", "decode_value",
           "defined_names", "judge", "plan_tests"]


class UnsupportedTest(SgalmError):
    """A test that cannot be judged outside the sandbox (the verdict is then False)."""


MAX_TEST_CHARS = 200_000
MAX_INT_BITS = 1_000_000
MAX_STEPS = 2_000_000  # evaluation steps per assert

# ------------------------------------------------------------------------ trusted names
_SAFE_BUILTINS = (
    "abs", "all", "any", "bin", "bool", "chr", "complex", "dict", "divmod", "enumerate", "float",
    "frozenset", "hex", "int", "isinstance", "len", "list", "map", "max", "min", "oct", "ord",
    "pow", "range", "repr", "reversed", "round", "set", "sorted", "str", "sum", "tuple", "type",
    "zip", "filter",
)
_MODULE_ATTRS: dict[str, tuple[Any, frozenset[str]]] = {
    "math": (math, frozenset({
        "isclose", "sqrt", "floor", "ceil", "fabs", "pi", "e", "tau", "inf", "nan", "isnan", "isinf",
        "isfinite", "trunc", "log", "log2", "log10", "exp", "sin", "cos", "tan", "asin", "acos",
        "atan", "atan2", "degrees", "radians", "hypot", "gcd", "lcm", "copysign", "fsum", "pow",
        "factorial", "comb", "perm", "prod", "dist", "isqrt", "modf", "frexp", "ldexp",
    })),
    "sys": (sys, frozenset({"getsizeof", "maxsize", "float_info", "maxunicode"})),
    "string": (__import__("string"), frozenset({
        "ascii_letters", "ascii_lowercase", "ascii_uppercase", "digits", "hexdigits", "octdigits",
        "punctuation", "whitespace", "printable",
    })),
    "collections": (collections, frozenset({"Counter", "OrderedDict", "deque", "defaultdict"})),
}
TRUSTED_NAMES = frozenset(_SAFE_BUILTINS) | frozenset(_MODULE_ATTRS) | frozenset({"True", "False", "None"})

# Methods the parent may call on plain values (none of them amplifies its input's size).
_SAFE_METHODS = {
    str: frozenset({"lower", "upper", "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines",
                    "startswith", "endswith", "isdigit", "isalpha", "isalnum", "isspace", "islower",
                    "isupper", "istitle", "isnumeric", "isdecimal", "count", "find", "rfind", "index",
                    "rindex", "title", "capitalize", "swapcase", "casefold", "partition", "rpartition"}),
    bytes: frozenset({"decode", "hex", "count", "find", "startswith", "endswith"}),
    list: frozenset({"count", "index", "copy"}),
    tuple: frozenset({"count", "index"}),
    dict: frozenset({"keys", "values", "items", "get", "copy"}),
    set: frozenset({"issubset", "issuperset", "isdisjoint", "union", "intersection", "difference",
                    "symmetric_difference", "copy"}),
    frozenset: frozenset({"issubset", "issuperset", "isdisjoint", "union", "intersection",
                          "difference", "symmetric_difference", "copy"}),
    int: frozenset({"bit_length", "bit_count"}),
    float: frozenset({"is_integer", "hex"}),
    complex: frozenset({"conjugate"}),
}
_SAFE_METHOD_NAMES = frozenset().union(*_SAFE_METHODS.values())
_PLAIN_ATTRS = {complex: frozenset({"real", "imag"}), int: frozenset({"real", "imag"}),
                float: frozenset({"real", "imag"}), fractions.Fraction: frozenset({"numerator", "denominator"})}


# CPython 3.11 keeps the AST constructor's recursion counter in interpreter-wide state, so two
# threads parsing at once can fail with "SystemError: AST constructor recursion depth mismatch"
# (seen with the sandbox's worker threads under load; fixed in later CPython releases). Every
# parse of the evaluation path goes through this lock.
_PARSE_LOCK = threading.Lock()


def parse_source(source: str) -> ast.Module:
    """``ast.parse(source)``, one thread at a time (see ``_PARSE_LOCK``)."""
    with _PARSE_LOCK:
        return ast.parse(source)

def defined_names(source: str) -> frozenset[str]:
    """Names a module binds at top level (defs, classes, assignments, imports, for/with targets).

    A source that does not parse defines nothing (it will fail in the sandbox anyway)."""
    try:
        tree = parse_source(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()
    out: set[str] = set()

    def targets(node: ast.AST) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                out.add(n.id)

    def visit(body: Iterable[ast.stmt]) -> None:
        for st in body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(st.name)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                for a in st.names:
                    out.add((a.asname or a.name).split(".")[0])
            elif isinstance(st, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for t in st.targets if isinstance(st, ast.Assign) else [st.target]:
                    targets(t)
            elif isinstance(st, (ast.For, ast.AsyncFor)):
                targets(st.target)
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                for item in st.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
                visit(st.body)
            elif isinstance(st, (ast.If, ast.While)):
                visit(st.body)
                visit(st.orelse)
            elif isinstance(st, ast.Try):
                visit(st.body)
                visit(st.orelse)
                visit(st.finalbody)
                for h in st.handlers:
                    if h.name:
                        out.add(h.name)
                    visit(h.body)
            elif isinstance(st, ast.Expr):
                for n in ast.walk(st):
                    if isinstance(n, ast.NamedExpr):
                        targets(n.target)
            if isinstance(st, ast.Global):
                out.update(st.names)
    visit(tree.body)
    return frozenset(out)


# ------------------------------------------------------------------------ planning
class Probe(ast.expr):
    """A placeholder for a sub-expression evaluated in the sandbox (field ``index``)."""

    _fields = ("index",)


@dataclass
class AssertPlan:
    source: str
    line: int
    expr: ast.expr
    probes: list[int]


@dataclass
class TestPlan:
    """What the sandbox runs (``steps``) and what the parent judges (``asserts``)."""

    steps: list[list]
    asserts: list[AssertPlan]
    probe_sources: dict[int, str] = field(default_factory=dict)


_FORBIDDEN_WITH_PROGRAM = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
                           ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)


def plan_tests(tests: str, names_under_test: Iterable[str] = ()) -> TestPlan:
    """Split ``tests`` into sandbox steps and parent-side assert plans (see module docstring).

    Raises UnsupportedTest for tests that do not parse or an assert that cannot be split."""
    if len(tests) > MAX_TEST_CHARS:
        raise UnsupportedTest(f"tests longer than {MAX_TEST_CHARS} characters")
    try:
        tree = parse_source(tests)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UnsupportedTest(f"tests do not parse: {type(e).__name__}: {e}") from None
    # Module names of the judge (math, sys...) always stay the judge's: a reference that imports
    # ``math`` does not make ``math.isclose`` in the asserts the program's.
    program_names = set(names_under_test) - set(_MODULE_ATTRS)
    steps: list[list] = []
    asserts: list[AssertPlan] = []
    probe_sources: dict[int, str] = {}
    for st in tree.body:
        if not isinstance(st, ast.Assert):
            for n in ast.walk(st):
                if isinstance(n, ast.Assert):
                    raise UnsupportedTest(f"line {n.lineno}: an assert inside a compound statement cannot be "
                                          "judged outside the sandbox")
            steps.append(["exec", ast.get_source_segment(tests, st) or ast.unparse(st)])
            program_names |= defined_names(ast.unparse(st)) - set(_MODULE_ATTRS)
            continue
        seg = ast.get_source_segment(tests, st) or ast.unparse(st)
        try:
            expr = _split(st.test, program_names, frozenset(), probe_sources, steps, truth=True)
        except RecursionError:
            raise UnsupportedTest(f"line {st.lineno}: assert nested too deeply") from None
        idx = [n.index for n in ast.walk(expr) if isinstance(n, Probe)]
        asserts.append(AssertPlan(seg, st.lineno, expr, idx))
    return TestPlan(steps, asserts, probe_sources)


def _bound_inside(node: ast.AST) -> set[str]:
    """Names bound by comprehension targets and lambda parameters anywhere inside ``node``."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.comprehension):
            out |= {x.id for x in ast.walk(n.target) if isinstance(x, ast.Name)}
        elif isinstance(n, ast.Lambda):
            out |= {a.arg for a in (*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs)}
            out |= {a.arg for a in (n.args.vararg, n.args.kwarg) if a is not None}
    return out


def _mentions_program(node: ast.AST, program: set[str], local: frozenset[str]) -> bool:
    """Whether ``node`` uses a name the judge must not evaluate (the program's, or unknown).

    Comprehension variables and lambda parameters bound inside ``node`` are local: the judge
    evaluates ``[i * i for i in range(3)]`` itself. A program name that is also bound locally
    somewhere inside counts as the program's (conservative)."""
    bound = _bound_inside(node) | local
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and (n.id in program or (n.id not in TRUSTED_NAMES and n.id not in bound)):
            return True
    return False


def _split(node: ast.expr, program: set[str], local: frozenset[str], probes: dict[int, str], steps: list,
           truth: bool = False) -> ast.expr:
    """``node`` with its program-dependent sub-expressions replaced by probes.

    ``truth``: only the node's truth value matters (the assert's test, an operand of ``not``,
    ``and``/``or`` there): a probe in such a place returns ``bool(value)``, so ``assert
    match(s)`` works for a function returning a ``re.Match`` (a truthy object is what it tests)."""
    if not _mentions_program(node, program, local):
        return node
    if truth and isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ast.copy_location(ast.UnaryOp(node.op, _split(node.operand, program, local, probes, steps, True)), node)
    if truth and isinstance(node, ast.BoolOp):
        return ast.copy_location(ast.BoolOp(node.op, [_split(v, program, local, probes, steps, True) for v in node.values]), node)
    if isinstance(node, _FORBIDDEN_WITH_PROGRAM):
        raise UnsupportedTest(f"{type(node).__name__} using the program's names: {ast.unparse(node)[:120]} "
                              "(cannot be judged outside the sandbox)")
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in _SAFE_METHOD_NAMES and not isinstance(
            f.value, (ast.Name, ast.Attribute)
        ) and _mentions_program(f.value, program, local) and not (
            _mentions_program(ast.Tuple([*node.args, *[k.value for k in node.keywords]], ast.Load()), program, local)
        ):
            # f(x).lower(): the call's value is probed, a safe method of plain data runs here (a
            # method of a program object, ``obj.area()``, is probed whole below).
            return ast.Call(ast.Attribute(_split(f.value, program, local, probes, steps), f.attr, ast.Load()),
                            node.args, node.keywords)
        if _mentions_program(f, program, local):
            return _probe(node, probes, steps, truth)
    elif isinstance(node, (ast.Name, ast.Attribute)):
        return _probe(node, probes, steps, truth)
    new = type(node)()
    for name, value in ast.iter_fields(node):
        if isinstance(value, ast.expr):
            value = _split(value, program, local, probes, steps)
        elif isinstance(value, list):
            value = [_split(v, program, local, probes, steps) if isinstance(v, ast.expr)
                     else _split_keyword(v, program, local, probes, steps) if isinstance(v, ast.keyword)
                     else v for v in value]
        setattr(new, name, value)
    return ast.copy_location(new, node)


def _split_keyword(kw: ast.keyword, program, local, probes, steps) -> ast.keyword:
    return ast.keyword(kw.arg, _split(kw.value, program, local, probes, steps))


def _probe(node: ast.expr, probes: dict[int, str], steps: list, truth: bool = False) -> Probe:
    index = len(probes)
    probes[index] = ast.unparse(node)
    steps.append(["probe", index, probes[index], "truth" if truth else "value"])
    p = Probe(index=index)
    return ast.copy_location(p, node)


# ------------------------------------------------------------------------ trusted evaluation
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
           ast.BitXor: operator.xor, ast.BitAnd: operator.and_}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_, ast.Invert: operator.invert}
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, set, frozenset,
                dict, range, decimal.Decimal, fractions.Fraction, collections.deque, collections.OrderedDict,
                collections.Counter, collections.defaultdict, type({}.keys()), type({}.values()),
                type({}.items()), type(iter([])))


def _size(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v.bit_length() // 8
    try:
        return len(v)
    except TypeError:
        return 1


def _guard_binop(op: type, a: Any, b: Any) -> None:
    if op is ast.Mult:
        for x, n in ((a, b), (b, a)):
            if isinstance(n, int) and isinstance(x, (str, bytes, list, tuple, bytearray)) and len(x) * max(n, 0) > MAX_SEQ:
                raise VerdictError("sequence repetition too large")
    elif op is ast.Pow and isinstance(a, int) and isinstance(b, int):
        if abs(a) > 1 and b > 0 and a.bit_length() * b > MAX_INT_BITS:
            raise VerdictError("power too large")
    elif op is ast.LShift and isinstance(b, int) and b > MAX_INT_BITS:
        raise VerdictError("shift too large")
    elif op is ast.Mod and isinstance(a, (str, bytes)):
        raise VerdictError("%-formatting is not evaluated")


class TrustedEvaluator:
    """Evaluates an assert plan's expression on plain values (probe values from the sandbox)."""

    def __init__(self, probe_values: Mapping[int, Any], probe_errors: Mapping[int, str]):
        self.values, self.errors = probe_values, probe_errors
        self.steps = 0

    def run(self, node: ast.expr) -> Any:
        return self.eval(node, {})

    def _call(self, f: Any, args: list, kwargs: dict) -> Any:
        if f is pow and len(args) >= 2:
            _guard_binop(ast.Pow, args[0], args[1])
        if f in (math.factorial, math.comb, math.perm) and any(isinstance(a, int) and a > 100_000 for a in args):
            raise VerdictError("argument too large")
        if f is range:
            r = range(*args)
            if len(r) > MAX_SEQ:
                raise VerdictError("range too long")
            return r
        if f in (str, repr, bin, hex, oct) and args and isinstance(args[0], int) and args[0].bit_length() > MAX_INT_BITS:
            raise VerdictError("integer too large")
        if f in (bytes, bytearray, list, tuple, set, str) and args and isinstance(args[0], int) and args[0] > MAX_SEQ:
            raise VerdictError("size too large")
        if f is sum and (len(args) > 1 or "start" in kwargs):
            raise VerdictError("sum() with a start value is not evaluated")
        return f(*args, **kwargs)

    def eval(self, node: ast.AST, env: dict) -> Any:  # noqa: C901 - one branch per node type
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise VerdictError("assert too expensive to evaluate")
        if isinstance(node, Probe):
            if node.index in self.errors:
                raise VerdictError(self.errors[node.index])
            if node.index not in self.values:
                raise VerdictError("no value")
            return self.values[node.index]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id in _MODULE_ATTRS:
                return _ModuleRef(node.id)
            if node.id in _SAFE_BUILTINS:
                return getattr(builtins, node.id)
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            raise VerdictError(f"name {node.id!r} is not available to the judge")
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items: list = []
            for e in node.elts:
                if isinstance(e, ast.Starred):
                    items.extend(self._iterable(self.eval(e.value, env)))
                else:
                    items.append(self.eval(e, env))
            return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
        if isinstance(node, ast.Dict):
            out = {}
            for k, v in zip(node.keys, node.values):
                if k is None:
                    out.update(self.eval(v, env))
                else:
                    out[self.eval(k, env)] = self.eval(v, env)
            return out
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self.eval(node.operand, env))
        if isinstance(node, ast.BinOp):
            a, b = self.eval(node.left, env), self.eval(node.right, env)
            if type(node.op) not in _BINOPS:
                raise VerdictError(f"operator {type(node.op).__name__} is not evaluated")
            _guard_binop(type(node.op), a, b)
            return _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.BoolOp):
            value: Any = None
            for v in node.values:
                value = self.eval(v, env)
                if isinstance(node.op, ast.And) and not value:
                    return value
                if isinstance(node.op, ast.Or) and value:
                    return value
            return value
        if isinstance(node, ast.Compare):
            left = self.eval(node.left, env)
            for op, comp in zip(node.ops, node.comparators):
                right = self.eval(comp, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body if self.eval(node.test, env) else node.orelse, env)
        if isinstance(node, ast.Subscript):
            return self.eval(node.value, env)[self.eval(node.slice, env)]
        if isinstance(node, ast.Slice):
            return slice(*(None if x is None else self.eval(x, env) for x in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Attribute):
            base = self.eval(node.value, env)
            if isinstance(base, _ModuleRef):
                return base.get(node.attr)
            for t, attrs in _PLAIN_ATTRS.items():
                if type(base) is t and node.attr in attrs:
                    return getattr(base, node.attr)
            methods = _SAFE_METHODS.get(type(base), frozenset())
            if node.attr in methods:
                return getattr(base, node.attr)
            raise VerdictError(f"attribute {node.attr!r} of {type(base).__name__} is not evaluated")
        if isinstance(node, ast.Call):
            f = self.eval(node.func, env)
            args: list = []
            for a in node.args:
                if isinstance(a, ast.Starred):
                    args.extend(self._iterable(self.eval(a.value, env)))
                else:
                    args.append(self.eval(a, env))
            kwargs = {}
            for k in node.keywords:
                if k.arg is None:
                    kwargs.update(self.eval(k.value, env))
                else:
                    kwargs[k.arg] = self.eval(k.value, env)
            if isinstance(f, _ModuleRef) or not callable(f):
                raise VerdictError(f"{ast.unparse(node.func)} is not callable")
            return self._call(f, args, kwargs)
        if isinstance(node, ast.Lambda):
            return self._lambda(node, env)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            return self._comprehension(node, env)
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                if isinstance(v, ast.FormattedValue):
                    if v.format_spec is not None or v.conversion not in (-1, 114, 115):
                        raise VerdictError("formatted f-string fields are not evaluated")
                    x = self.eval(v.value, env)
                    parts.append(repr(x) if v.conversion == 114 else str(x))
                else:
                    parts.append(self.eval(v, env))
            return "".join(parts)
        raise VerdictError(f"{type(node).__name__} is not evaluated by the judge")

    def _iterable(self, v: Any) -> Any:
        if not isinstance(v, _PLAIN_TYPES):
            raise VerdictError(f"cannot iterate {type(v).__name__}")
        return v

    def _lambda(self, node: ast.Lambda, env: dict) -> Any:
        a = node.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.kw_defaults or a.posonlyargs:
            raise VerdictError("only simple lambdas are evaluated")
        names = [x.arg for x in a.args]

        def fn(*values: Any) -> Any:
            if len(values) != len(names):
                raise VerdictError("lambda called with the wrong number of arguments")
            return self.eval(node.body, {**env, **dict(zip(names, values))})

        return fn

    def _comprehension(self, node: ast.expr, env: dict) -> Any:
        results: list = []

        def bind(target: ast.expr, value: Any, scope: dict) -> None:
            if isinstance(target, ast.Name):
                scope[target.id] = value
            elif isinstance(target, (ast.Tuple, ast.List)):
                vals = list(self._iterable(value))
                if len(vals) != len(target.elts):
                    raise VerdictError("cannot unpack")
                for t, v in zip(target.elts, vals):
                    bind(t, v, scope)
            else:
                raise VerdictError("unsupported comprehension target")

        def loop(i: int, scope: dict) -> None:
            if i == len(node.generators):
                if isinstance(node, ast.DictComp):
                    results.append((self.eval(node.key, scope), self.eval(node.value, scope)))
                else:
                    results.append(self.eval(node.elt, scope))
                return
            g = node.generators[i]
            for v in self._iterable(self.eval(g.iter, scope)):
                self.steps += 1
                if self.steps > MAX_STEPS:
                    raise VerdictError("assert too expensive to evaluate")
                inner = dict(scope)
                bind(g.target, v, inner)
                if all(self.eval(c, inner) for c in g.ifs):
                    loop(i + 1, inner)

        loop(0, dict(env))
        if isinstance(node, ast.ListComp):
            return results
        if isinstance(node, ast.SetComp):
            return set(results)
        if isinstance(node, ast.DictComp):
            return dict(results)
        return iter(results)


class _ModuleRef:
    def __init__(self, name: str):
        self.name = name

    def get(self, attr: str) -> Any:
        module, allowed = _MODULE_ATTRS[self.name]
        if attr not in allowed:
            raise VerdictError(f"{self.name}.{attr} is not available to the judge")
        return getattr(module, attr)


def judge(plan: TestPlan, probe_values: Mapping[int, Any], probe_errors: Mapping[int, str]) -> tuple[bool, str]:
    """``(passed, reason)``: every assert of ``plan`` evaluated here on the probes' plain values."""
    for i, a in enumerate(plan.asserts):
        ev = TrustedEvaluator(probe_values, probe_errors)
        try:
            ok = ev.run(a.expr)
            truth = bool(ok) if isinstance(ok, _PLAIN_TYPES) else None
        except VerdictError as e:
            return False, f"assert {i + 1} (line {a.line}) failed: {e}"
        except (RecursionError, MemoryError):
            return False, f"assert {i + 1} (line {a.line}) failed: too large to evaluate"
        except Exception as e:  # noqa: BLE001 - e.g. TypeError comparing the program's values
            return False, f"assert {i + 1} (line {a.line}) failed: {type(e).__name__}: {str(e)[:200]}"
        if truth is None:
            return False, f"assert {i + 1} (line {a.line}) failed: its value is not plain data"
        if not truth:
            return False, f"assert {i + 1} (line {a.line}) failed: {a.source[:200]}{_got(a, probe_values)}"
    return True, "ok"


def _got(a: AssertPlan, values: Mapping[int, Any]) -> str:
    shown = []
    for i in a.probes[:2]:
        if i in values:
            r = repr(values[i])
            shown.append(r if len(r) <= 120 else r[:117] + "...")
    return f" (got {', '.join(shown)})" if shown else ""
