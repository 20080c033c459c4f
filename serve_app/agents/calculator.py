"""An arithmetic evaluator for the agent's `calculator` tool: no Python builtins, no names
but a fixed table, and bounds on sizes so no expression can eat the CPU or memory.

It walks the parsed syntax tree itself; nothing is ever passed to eval().

The bounds, and why each is enough: every literal, argument and intermediate value is a
finite number of magnitude at most MAX_MAGNITUDE (about 333 bits), so + - * / // % and
the math functions cost microseconds. Two operations cost more than the size of their
arguments: a ** b (checked before computing: the result's size must stay under the same
bound) and round(x, n) on an integer (CPython computes 10**|n|: n is held to ±MAX_NDIGITS).
A timeout still guards the tool (serve_app/agents/tools.py runs it in a child process).
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 256
MAX_NODES = 64
MAX_MAGNITUDE = 1e100  # any literal, argument, intermediate or result beyond this is refused
MAX_NDIGITS = 20  # round(x, n): |n| at most this (a double carries 17 significant digits)


class CalcError(ValueError):
    """The expression is not allowed or cannot be computed; the message says why."""


def _power(base, exponent):
    # |base| ** exponent has log10 = exponent * log10|base|: refuse before computing a huge integer.
    if base != 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise CalcError(f"exponent too large: the result would pass {MAX_MAGNITUDE:g}")
    return operator.pow(base, exponent)


def _round(number, ndigits=None):
    if ndigits is None:
        return round(number)
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_NDIGITS:
        raise CalcError(f"round's ndigits must be a whole number from -{MAX_NDIGITS} to {MAX_NDIGITS}")
    return round(number, ndigits)


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS = {  # name -> (function, fewest and most arguments)
    "sqrt": (math.sqrt, 1, 1), "log": (math.log, 1, 2), "log10": (math.log10, 1, 1), "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1), "cos": (math.cos, 1, 1), "tan": (math.tan, 1, 1), "abs": (abs, 1, 1),
    "round": (_round, 1, 2), "floor": (math.floor, 1, 1), "ceil": (math.ceil, 1, 1),
    "min": (min, 2, MAX_NODES), "max": (max, 2, MAX_NODES),
}
CONSTANTS = {"pi": math.pi, "e": math.e}


def evaluate(expression: str) -> float | int:
    if len(expression) > MAX_CHARS:
        raise CalcError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise CalcError(f"not an arithmetic expression: {exc.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalcError(f"expression has more than {MAX_NODES} parts")
    try:
        return _checked(_eval(tree.body))
    except (ArithmeticError, ValueError, TypeError) as exc:
        if isinstance(exc, CalcError):
            raise
        raise CalcError(f"cannot compute: {exc}") from None


class Calculator:
    """`evaluate` as an engine, for the tool's child process (serve_app/agents/tools.py)."""

    evaluate = staticmethod(evaluate)


def _checked(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalcError("the result is not a number")
    if abs(value) > MAX_MAGNITUDE:  # inf included
        raise CalcError("a value is too large")
    if value != value:
        raise CalcError("the result is not a number (nan)")
    return value


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalcError("only numbers are allowed")
        return _checked(node.value)
    if isinstance(node, ast.Name):
        if node.id not in CONSTANTS:
            raise CalcError(f"unknown name {node.id!r}; known: {sorted(CONSTANTS)}")
        return CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return _checked(BINARY[type(node.op)](_eval(node.left), _eval(node.right)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _checked(UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        if node.func.id not in FUNCTIONS:
            raise CalcError(f"unknown function {node.func.id!r}; known: {sorted(FUNCTIONS)}")
        fn, fewest, most = FUNCTIONS[node.func.id]
        if not fewest <= len(node.args) <= most:
            count = f"{fewest} argument{'s' * (fewest > 1)}" if fewest == most else f"{fewest} to {most} arguments"
            raise CalcError(f"{node.func.id} takes {count}")
        return _checked(fn(*(_eval(arg) for arg in node.args)))
    raise CalcError(f"{type(node).__name__} is not allowed in an arithmetic expression")
