"""GSM8K-style answers: number normalisation, final-answer extraction and step checking.

GSM8K worked answers annotate every computation as ``<<expr=result>>`` followed by the visible
result, and end with ``#### <final answer>``::

    Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.
    She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.
    #### 18

:func:`check_steps` verifies such an answer step by step (each annotation evaluates to its
result; the visible number repeats it; optionally every operand is a number from the question or
an earlier result; the final answer equals the last computed value). It is used both on real
GSM8K data and to measure whether *generated* samples are internally valid.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# A number as written in text: optional sign and $, digits with optional thousands commas,
# optional decimals; or a bare decimal like .5
_NUM_RE = re.compile(r"(?<![\w.])[-−]?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_ANNOT_RE = re.compile(r"<<([^<>]*?)=([^<>=]*)>>")
_AFTER_RE = re.compile(r"\$?([-−]?(?:\d[\d,]*(?:\.\d+)?(?:/\d+)?|\.\d+))")
_FINAL_RE = re.compile(r"####\s*(.*)")


def normalize_number(text: str | None) -> str | None:
    """Canonical string of a written number: no ``$``/commas/trailing ``.``; ``18.00`` -> ``18``.

    Returns None when ``text`` holds no number.
    """
    if text is None:
        return None
    s = text.strip().replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    s = s.rstrip(".")
    if not s:
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _first_number(text: str) -> str | None:
    m = _NUM_RE.search(text)
    return normalize_number(m.group(0)) if m else None


def extract_final_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style output.

    The number after the last ``####`` if there is one, otherwise the last number in the text.
    Commas, ``$`` and a trailing ``.`` are removed (see :func:`normalize_number`).
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        n = _first_number(tail)
        if n is not None:
            return n
    nums = _NUM_RE.findall(text)
    for raw in reversed(nums):
        n = normalize_number(raw)
        if n is not None:
            return n
    return None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Exact match of two normalised numbers (None never matches)."""
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


# ------------------------------------------------------------------------------ safe arithmetic
class ExprError(ValueError):
    """An annotation expression that is not plain arithmetic."""


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


def _clean_expr(expr: str) -> str:
    e = expr.strip().replace("−", "-").replace("×", "*").replace("÷", "/").replace("$", "")
    e = re.sub(r"(?<=\d),(?=\d{3}\b)", "", e)  # thousands separators
    e = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)", e)
    return e


def eval_expr(expr: str) -> Fraction:
    """Evaluate an arithmetic expression exactly (Fractions). Only numbers, + - * / // % ** ()."""
    e = _clean_expr(expr)
    try:
        tree = ast.parse(e, mode="eval")
    except SyntaxError as err:
        raise ExprError(f"not an arithmetic expression: {expr!r}") from err

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow):
                if b.denominator != 1 or abs(b) > 64 or abs(a) > 10**12:
                    raise ExprError(f"exponent too large or not an integer in {expr!r}")
                return a ** int(b)
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise ExprError(f"operator {type(node.op).__name__} not allowed in {expr!r}")
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
                raise ExprError(f"division by zero in {expr!r}")
            return op(a, b)
        raise ExprError(f"not an arithmetic expression: {expr!r}")

    return ev(tree)


def operand_numbers(expr: str) -> list[Fraction]:
    """The literal numbers appearing in an expression (percent literals count as written)."""
    e = _clean_expr(expr)
    return [Fraction(m) for m in re.findall(r"\d+(?:\.\d+)?|\.\d+", e)]


def text_numbers(text: str) -> set[Fraction]:
    """All numbers written in a text (commas and ``$`` removed)."""
    out = set()
    for raw in _NUM_RE.findall(text):
        n = normalize_number(raw)
        if n is not None:
            out.add(abs(Fraction(n)))
    return out


def _frac(s: str) -> Fraction | None:
    n = normalize_number(s)
    return None if n is None else Fraction(n)


def _decimals(s: str) -> int:
    s = s.strip().replace(",", "")
    return len(s.split(".", 1)[1]) if "." in s else 0


def _matches(value: Fraction, claimed_text: str, exact: bool) -> bool:
    claimed = _frac(claimed_text)
    if claimed is None:
        # A result written as a fraction ("3/4") is compared by value.
        if re.fullmatch(r"\s*-?\d+\s*/\s*\d+\s*", claimed_text):
            try:
                return eval_expr(claimed_text) == value
            except ExprError:
                return False
        return False
    if value == claimed:
        return True
    if exact:
        return False
    # Lenient mode: the claimed result is `value` rounded to the digits shown.
    d = _decimals(claimed_text)
    return abs(value - claimed) * (10**d) <= Fraction(1, 2) + Fraction(1, 10**9)


@dataclass(frozen=True)
class Step:
    """One ``<<expr=result>>`` annotation and its evaluated value."""

    expr: str
    claimed: str
    value: Fraction


def check_steps(
    answer: str,
    question: str | None = None,
    *,
    exact: bool = False,
    require_steps: bool = True,
    require_visible_result: bool = False,
    check_provenance: bool = False,
    check_text_expr: bool = False,
    require_final_matches_last: bool = True,
) -> tuple[bool, str]:
    """Verify every step of a GSM8K-style worked answer. Returns ``(valid, reason)``.

    Checks, in order:
      * a final line ``#### <number>`` exists;
      * (``require_steps``) there is at least one ``<<expr=result>>`` annotation;
      * each annotation's expression is plain arithmetic and evaluates to its result (exactly when
        ``exact``, else allowing the result to be rounded to the digits shown);
      * the number right after ``>>`` (if any; required with ``require_visible_result``) equals
        the annotation's result;
      * (``check_text_expr``) text of the form ``a + b = `` just before ``<<`` is the same
        expression as the annotation;
      * (``check_provenance``, needs ``question``) every operand is a number from the question or
        the result of an earlier step, i.e. results are used consistently;
      * (``require_final_matches_last``) the final answer equals the last computed value.
    """
    lines = [ln for ln in answer.strip().splitlines() if ln.strip()]
    if not lines:
        return False, "empty answer"
    m = _FINAL_RE.search(lines[-1])
    if not m:
        return False, "no final '#### <number>' line"
    final = _frac(m.group(1))
    if final is None:
        return False, f"final answer {m.group(1).strip()!r} is not a number"
    known = text_numbers(question) if question is not None else set()
    steps: list[Step] = []
    for am in _ANNOT_RE.finditer(answer):
        expr, claimed = am.group(1), am.group(2)
        try:
            value = eval_expr(expr)
        except ExprError as e:
            return False, f"step {len(steps) + 1}: {e}"
        if not _matches(value, claimed, exact):
            return False, f"step {len(steps) + 1}: {expr} evaluates to {_fmt(value)}, not {claimed.strip()}"
        after = _AFTER_RE.match(answer, am.end())
        if after:
            vis = after.group(1)
            if not _matches(value, vis, exact) and vis.strip() != claimed.strip():
                return False, f"step {len(steps) + 1}: visible result {after.group(1)} != {claimed.strip()}"
        elif require_visible_result:
            return False, f"step {len(steps) + 1}: no visible result after <<{expr}={claimed}>>"
        if check_text_expr:
            before = answer[: am.start()].rsplit("\n", 1)[-1]
            tm = re.search(r"([\d\.\s\+\-\*/\(\)x×÷]+)=\s*\$?\s*$", before)
            if tm and re.search(r"\d", tm.group(1)):
                try:
                    if eval_expr(tm.group(1)) != value:
                        return False, f"step {len(steps) + 1}: text {tm.group(1).strip()!r} != annotation {expr!r}"
                except ExprError:
                    pass
        if check_provenance:
            for x in operand_numbers(expr):
                if x not in known:
                    return False, f"step {len(steps) + 1}: operand {_fmt(x)} is neither in the question nor an earlier result"
        steps.append(Step(expr, claimed, value))
        known.add(abs(value))
        known.add(abs(_frac(claimed) or value))
    if require_steps and not steps:
        return False, "no <<expr=result>> steps"
    if require_final_matches_last and steps and not _matches(steps[-1].value, m.group(1).strip().rstrip("."), exact):
        return False, f"final answer {_fmt(final)} != last computed value {_fmt(steps[-1].value)}"
    return True, "ok"


def _fmt(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):g}"
