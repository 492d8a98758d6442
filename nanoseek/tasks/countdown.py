"""Countdown: combine the given numbers with + - * / to reach a target, each given number used at most once.

Every problem is solvable by construction: a random expression over the numbers is built first (positive integer
intermediate values) and its value becomes the target. The answer is the expression in \\boxed{}, optionally followed
by "= target". It is verified with Python's ast parser and exact Fraction arithmetic, never with eval.
"""

import ast
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from nanoseek.errors import NanoseekError
from nanoseek.tasks.base import BOXED_INSTRUCTION, Problem, Task, draw_problems, rng_for

MAX_EXPR_CHARS = 200  # parse and evaluation cost stay tiny even for adversarial answers
# Common ways of writing the four operators; anything else (e.g. ** or names) fails the character whitelist below.
SYMBOLS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "\u00d7": "*", "\u00f7": "/", "\u2212": "-"}
ALLOWED_CHARS = re.compile(r"[0-9+\-*/() ]*")
BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.Constant, *BIN_OPS)
PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True)
class Node:
    """A value built from some of the numbers, with its expression string using as few parentheses as needed."""

    value: int
    expr: str
    prec: int = 3  # 3 for a bare number


def combine(x: Node, op: str, y: Node) -> Node | None:
    """x op y if its value is a positive integer (the space the generator and the trace solver search), else None."""
    if op == "+":
        v = x.value + y.value
    elif op == "*":
        v = x.value * y.value
    elif op == "-":
        v = x.value - y.value
    else:
        v = x.value // y.value if x.value % y.value == 0 else 0
    if v <= 0:
        return None
    left = x.expr if x.prec >= PREC[op] else f"({x.expr})"
    # the right operand of - and / needs parentheses at equal precedence too: a - (b - c) != a - b - c
    right_bare = y.prec > PREC[op] or (y.prec == PREC[op] and op in "+*")
    right = y.expr if right_bare else f"({y.expr})"
    return Node(v, f"{left} {op} {right}", PREC[op])


def random_expression(rng: random.Random, numbers: list[int]) -> tuple[Node, list[str]]:
    """Combine all numbers in a random order with random valid operators; returns the result and its steps."""
    pool, steps = [Node(n, str(n)) for n in numbers], []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        x, y = pool[i], pool[j]
        node, op = rng.choice([(c, op) for op in "+-*/" if (c := combine(x, op, y)) is not None])
        steps.append(f"{x.value} {op} {y.value} = {node.value}")
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [node]
    return pool[0], steps


def _search(pool: list[Node], target: int, depth: int, steps: list[str]) -> tuple[Node, list[str]] | None:
    if len(steps) == depth:
        return None
    for i, x in enumerate(pool):
        for j, y in enumerate(pool):
            for op in "+-*/":
                if i == j or (op in "+*" and i > j):  # one order suffices for commutative ops
                    continue
                node = combine(x, op, y)
                if node is None:
                    continue
                step = steps + [f"{x.value} {op} {y.value} = {node.value}"]
                if node.value == target:
                    return node, step
                found = _search([p for k, p in enumerate(pool) if k not in (i, j)] + [node], target, depth, step)
                if found:
                    return found
    return None


def solve(numbers: list[int], target: int) -> tuple[Node, list[str]] | None:
    """A solution with the fewest operations (iterative deepening) over positive integer intermediates, or None."""
    leaves = [Node(n, str(n)) for n in numbers]
    for depth in range(1, len(numbers)):
        found = _search(leaves, target, depth, [])
        if found:
            return found
    return None


def _evaluate(node: ast.AST) -> Fraction | None:
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    left, right = _evaluate(node.left), _evaluate(node.right)
    if left is None or right is None or (isinstance(node.op, ast.Div) and right == 0):
        return None  # division by zero is a wrong answer, not a crash
    return BIN_OPS[type(node.op)](left, right)


def expression_value(text: str, numbers: list[int]) -> Fraction | None:
    """The exact value of text if it is a legal expression over a sub-multiset of numbers (the rules of
    check_expression; an optional trailing "= <n>" must claim the true value), else None."""
    if len(text) > MAX_EXPR_CHARS:
        return None
    for symbol, plain in SYMBOLS.items():
        text = text.replace(symbol, plain)
    text = re.sub(r"\s+", " ", text)
    lhs, eq, rhs = text.partition("=")
    if eq and not re.fullmatch(r" ?[0-9]+ ?", rhs):
        return None
    if not ALLOWED_CHARS.fullmatch(lhs):
        return None
    try:
        tree = ast.parse(lhs.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    nodes = list(ast.walk(tree))
    if not all(isinstance(n, ALLOWED_NODES) for n in nodes):
        return None
    literals = [n.value for n in nodes if isinstance(n, ast.Constant)]
    if not all(type(v) is int for v in literals) or not Counter(literals) <= Counter(numbers):
        return None
    try:
        value = _evaluate(tree.body)
    except RecursionError:
        return None
    if value is None or (eq and int(rhs) != value):  # a wrong claimed value is wrong
        return None
    return value


def check_expression(text: str, numbers: list[int], target: int) -> bool:
    """Whether text is an expression over a sub-multiset of numbers whose exact value is target.

    Rules, and why:
    - at most MAX_EXPR_CHARS characters: bounds the cost of parsing and evaluating a hostile answer;
    - an optional trailing "= <target>" is accepted, but only with the true target (a wrong claimed value is wrong);
    - only integer literals, + - * / and parentheses (Python ast: BinOp, Constant): no ** (9**9**9 hangs a
      scorer), no names or calls, no unary minus (not one of the four operations), no decimals such as 3.5
      (a digit regex would read it as the numbers 3 and 5);
    - each literal must be one of the given numbers, each used at most once (literals form a sub-multiset);
    - the value is computed with Fractions, so intermediate fractions are fine ((8 / 3) * 3 = 8) and no float
      tolerance can be exploited; division by zero scores 0.
    """
    return expression_value(text, numbers) == target


class CountdownTask(Task):
    """Reach a target in min_target..max_target from min_numbers..max_numbers numbers drawn from 1..max_number."""

    name = "countdown"

    def __init__(
        self,
        min_numbers: int = 3,
        max_numbers: int = 4,
        max_number: int = 25,
        min_target: int = 1,
        max_target: int = 100,
    ):
        if not all(isinstance(v, int) for v in (min_numbers, max_numbers, max_number, min_target, max_target)):
            raise NanoseekError("task countdown: all arguments must be integers")
        if not 2 <= min_numbers <= max_numbers <= 6:
            raise NanoseekError(
                f"task countdown: need 2 <= min_numbers <= max_numbers <= 6, got {min_numbers}, {max_numbers}"
            )
        if not 1 <= max_number <= 1000 or not 1 <= min_target <= max_target <= 10**6:
            raise NanoseekError(
                f"task countdown: need 1 <= max_number <= 1000 and 1 <= min_target <= max_target <= 1e6, "
                f"got {max_number}, {min_target}, {max_target}"
            )
        self.min_numbers, self.max_numbers, self.max_number = min_numbers, max_numbers, max_number
        self.min_target, self.max_target = min_target, max_target

    def _make(self, rng: random.Random) -> tuple[str, Problem]:
        for _ in range(1000):
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(self.min_numbers, self.max_numbers))]
            node, _ = random_expression(rng, numbers)
            # a target equal to a given number would be solved by writing that number alone
            if self.min_target <= node.value <= self.max_target and node.value not in numbers:
                listed = ", ".join(map(str, numbers))
                prompt = (
                    f"Using the numbers {listed}, write an expression that equals {node.value}. "
                    f"You may use +, -, *, / and parentheses, and each number at most once.\n{BOXED_INSTRUCTION}"
                )
                key = f"{sorted(numbers)}->{node.value}"  # same numbers and target: same split, whatever the order
                return key, Problem(prompt, node.expr, {"numbers": numbers, "target": node.value})
        raise NanoseekError("task countdown: cannot reach a target in min_target..max_target with these numbers")

    def problems(self, split: str, n: int | None, seed: int = 0) -> list[Problem]:
        return draw_problems(self.name, split, n, seed, self._make)

    def check(self, problem: Problem, answer: str) -> bool:
        return check_expression(answer, problem.meta["numbers"], problem.meta["target"])

    def answer_key(self, problem: Problem, answer: str) -> tuple:
        """A legal expression votes for its value: "3 * 4 + 5" and "5 + 4 * 3" are the same answer."""
        value = expression_value(answer, problem.meta["numbers"])
        return ("value", str(value)) if value is not None else super().answer_key(problem, answer)

    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        """A short search narrative: one failed random attempt (when it misses), then the solver's solution."""
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        found = solve(numbers, target)
        if found is None:
            raise NanoseekError(f"task countdown: no solution for numbers {numbers} and target {target}")
        node, steps = found
        lines = [f"Numbers {', '.join(map(str, numbers))}; target {target}."]
        miss, miss_steps = random_expression(rng_for(self.name, "trace", numbers, target), numbers)
        if all(int(s.rsplit("= ", 1)[1]) != target for s in miss_steps):
            lines.append(f"Try {', '.join(miss_steps)}. That gives {miss.value}, not {target}.")
        lines.append(f"Try {', '.join(steps)}. That gives {target}.")
        lines.append(f"So {node.expr} = {target}.")
        return "\n".join(lines), f"\\boxed{{{node.expr}}}"
