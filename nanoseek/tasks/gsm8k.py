"""GSM8K grade-school maths word problems (openai/grade-school-math, MIT), bundled in nanoseek/corpus/gsm8k/.

Split "test" is test.jsonl (an evaluation set: never train on it); "val" is the ~5% of train.jsonl whose question
hashes into the validation bucket (base.in_validation), held out for choosing settings; "train" is the rest.
The gold answer is the number after the last "####" with commas removed; the model's answer is the content of its
single \\boxed{}, a plain number ("$" and thousands commas allowed, no unit words), compared as a Decimal so
"18.00" == "18".
"""

import json
import re
from decimal import Decimal
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.tasks.base import BOXED_INSTRUCTION, Problem, Task, check_split, in_validation, rng_for

DATA_DIR = Path(__file__).resolve().parents[1] / "corpus" / "gsm8k"
CALC_RE = re.compile(r"<<[^<>]*>>")  # calculator annotations such as <<48/2=24>>
NUMBER_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")
MAX_NUMBER_CHARS = 40


def parse_number(text: str) -> Decimal | None:
    """A plain number, ignoring whitespace, "$" (also LaTeX "\\$") and thousands separators ("," "{,}" "\\,"); None
    for anything else, including a unit word ("18 dollars"): the task asks for the number alone."""
    t = re.sub(r"\s+", "", text)
    for junk in ("\\$", "$", "{,}", "\\,", ","):
        t = t.replace(junk, "")
    t = t.replace("\u2212", "-")
    if len(t) > MAX_NUMBER_CHARS or not NUMBER_RE.fullmatch(t):
        return None
    return Decimal(t)


def load_gsm8k(path: Path) -> list[Problem]:
    """Problems of one GSM8K jsonl file; a bad line raises NanoseekError naming file:line."""
    if not path.is_file():
        raise NanoseekError(f"{path}: GSM8K file not found")
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoseekError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("question", "answer"))):
                raise NanoseekError(f"{path}:{lineno}: expected an object with string fields 'question' and 'answer'")
            solution, sep, gold = row["answer"].rpartition("####")
            gold = gold.strip().replace(",", "")
            if not sep or parse_number(gold) is None:
                raise NanoseekError(f"{path}:{lineno}: field 'answer' must end with '#### <number>'")
            prompt = f"{row['question'].strip()}\n{BOXED_INSTRUCTION}"
            problems.append(Problem(prompt, gold, {"line": lineno, "solution": solution.strip()}))
    return problems


class GSM8KTask(Task):
    """GSM8K from data_dir (default: the copy bundled in nanoseek/corpus/gsm8k)."""

    name = "gsm8k"

    def __init__(self, data_dir: str | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
        self._cache: dict[str, list[Problem]] = {}

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Problem]:
        """All problems of split in file order if n is None or at least the split's size, else n chosen by seed."""
        check_split(split)
        if split not in self._cache:
            if split == "test":
                self._cache[split] = load_gsm8k(self.data_dir / "test.jsonl")
            else:
                rows = load_gsm8k(self.data_dir / "train.jsonl")
                self._cache[split] = [q for q in rows if in_validation(f"gsm8k:{q.prompt}") == (split == "val")]
        rows = self._cache[split]
        if n is not None and (not isinstance(n, int) or n < 0):
            raise NanoseekError(f"task gsm8k: n must be None or a non-negative int, got {n!r}")
        if n is None or n >= len(rows):
            return list(rows)
        return rng_for(self.name, split, seed).sample(rows, n)

    def check(self, problem: Problem, answer: str) -> bool:
        value = parse_number(answer)
        return value is not None and value == Decimal(problem.answer)

    def answer_key(self, problem: Problem, answer: str) -> tuple:
        value = parse_number(answer)  # "$18.00" and "18" are the same answer
        return ("number", str(value.normalize())) if value is not None else super().answer_key(problem, answer)

    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        """The reference solution without its <<...>> calculator annotations, and the gold number boxed."""
        reasoning = CALC_RE.sub("", problem.meta["solution"]).strip()
        return reasoning, f"\\boxed{{{problem.answer}}}"
