"""An arithmetic evaluator for the agent's `calculator` tool: no Python builtins, no names
but a fixed table, and bounds on sizes so no expression can eat the CPU or memory.

It walks the parsed syntax tree itself; nothing is ever passed to eval().
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 256
MAX_NODES = 64
MAX_POWER = 64  # |exponent| of a ** b
MAX_MAGNITUDE = 1e100  # any intermediate value beyond this is refused

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin,
             "cos": math.cos, "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil,
             "min": min, "max": max}
CONSTANTS = {"pi": math.pi, "e": math.e}


class CalcError(ValueError):
    """The expression is not allowed or cannot be computed; the message says why."""


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


def _checked(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalcError("the result is not a number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalcError("a value is too large")
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
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise CalcError(f"exponent beyond ±{MAX_POWER}")
        return _checked(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _checked(UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        fn = FUNCTIONS.get(node.func.id)
        if fn is None:
            raise CalcError(f"unknown function {node.func.id!r}; known: {sorted(FUNCTIONS)}")
        return _checked(fn(*(_eval(arg) for arg in node.args)))
    raise CalcError(f"{type(node).__name__} is not allowed in an arithmetic expression")
