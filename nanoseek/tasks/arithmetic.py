"""Multi-digit integer arithmetic: a + b, a - b, a * b, with column-by-column SFT traces (carries, borrows, partial
products). The answer is an integer in \\boxed{}; "-1,234" and "- 1234" read as -1234, anything else scores 0."""

import random
import re

from nanoseek.errors import NanoseekError
from nanoseek.tasks.base import BOXED_INSTRUCTION, Problem, Task, draw_problems

OPS = "+-*"
MAX_DIGITS = 12
INT_RE = re.compile(r"[+-]?[0-9]+")


def parse_int(text: str) -> int | None:
    """An integer answer, tolerant of thousands commas, spaces and a Unicode minus; None if it is anything else
    (decimals such as "12.0", words, expressions): the task asks for an exact integer."""
    t = re.sub(r"\s+", "", text).replace(",", "").replace("\u2212", "-")
    if len(t) > 2 * MAX_DIGITS + 2 or not INT_RE.fullmatch(t):  # short cap: int() of huge strings is slow
        return None
    return int(t)


def _digits(x: int) -> list[int]:
    """Digits of x >= 0, ones digit first."""
    return [int(c) for c in reversed(str(x))]


def add_trace(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    lines = [f"Add {a} + {b} column by column, starting from the ones digit:"]
    carry = 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        lines.append(f"{x} + {y} + carry {carry} = {s}: write {s % 10}, carry {s // 10}")
        carry = s // 10
    if carry:
        lines.append(f"the last carry {carry} is the leading digit")
    return lines


def sub_trace(a: int, b: int) -> list[str]:
    """a - b for a >= b, with borrows."""
    da, db = _digits(a), _digits(b)
    lines = [f"Subtract {a} - {b} column by column, starting from the ones digit:"]
    borrow = 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        d = x - y - borrow
        if d < 0:
            lines.append(f"{x} - {y} - borrow {borrow} = {d} is negative, so add 10: write {d + 10}, borrow 1")
        else:
            lines.append(f"{x} - {y} - borrow {borrow} = {d}: write {d}, borrow 0")
        borrow = 1 if d < 0 else 0
    if len(str(a - b)) < len(da):
        lines.append("drop the leading zeros")
    return lines


def mul_trace(a: int, b: int) -> list[str]:
    db = _digits(b)
    lines = [f"Multiply {a} * {b} with one partial product per digit of {b}, starting from the ones digit:"]
    partials = []
    for i, y in enumerate(db):
        p = a * y * 10**i
        shift = f", shifted {i} place{'s' if i > 1 else ''}: {p}" if i else ""
        lines.append(f"{a} * {y} = {a * y}{shift}")
        partials.append(p)
    total = partials[0]
    for p in partials[1:]:
        lines.append(f"{total} + {p} = {total + p}")
        total += p
    return lines


class ArithmeticTask(Task):
    """a op b for non-negative operands of min_digits..max_digits digits each and op drawn from ops ("+-*")."""

    name = "arithmetic"

    def __init__(self, min_digits: int = 2, max_digits: int = 3, ops: str = OPS):
        if not (isinstance(min_digits, int) and isinstance(max_digits, int) and 1 <= min_digits <= max_digits):
            raise NanoseekError(f"task arithmetic: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if max_digits > MAX_DIGITS:
            raise NanoseekError(f"task arithmetic: max_digits must be <= {MAX_DIGITS}, got {max_digits}")
        ops = str(ops)
        if not ops or any(op not in OPS for op in ops):
            raise NanoseekError(f"task arithmetic: ops must be a non-empty string of {OPS!r}, got {ops!r}")
        self.min_digits, self.max_digits, self.ops = min_digits, max_digits, "".join(sorted(set(ops), key=OPS.index))

    def _number(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)

    def _make(self, rng: random.Random) -> tuple[str, Problem]:
        a, b, op = self._number(rng), self._number(rng), rng.choice(self.ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        problem = Problem(f"What is {a} {op} {b}?\n{BOXED_INSTRUCTION}", str(value), {"a": a, "b": b, "op": op})
        # a + b and b + a are the same problem for split purposes, so both land in the same split
        key = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
        return key, problem

    def problems(self, split: str, n: int | None, seed: int = 0) -> list[Problem]:
        return draw_problems(self.name, split, n, seed, self._make)

    def check(self, problem: Problem, answer: str) -> bool:
        return parse_int(answer) == int(problem.answer)

    def answer_key(self, problem: Problem, answer: str) -> tuple:
        value = parse_int(answer)  # "-1,234" and "-1234" are the same answer
        return ("int", value) if value is not None else super().answer_key(problem, answer)

    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        a, b, op = problem.meta["a"], problem.meta["b"], problem.meta["op"]
        if op == "+":
            lines = add_trace(a, b)
        elif op == "*":
            lines = mul_trace(a, b)
        elif a >= b:
            lines = sub_trace(a, b)
        else:
            lines = [f"{a} is smaller than {b}, so {a} - {b} = -({b} - {a}).", *sub_trace(b, a), f"{b} - {a} = {b - a}"]
        lines.append(f"So {a} {op} {b} = {problem.answer}.")
        return "\n".join(lines), f"\\boxed{{{problem.answer}}}"
