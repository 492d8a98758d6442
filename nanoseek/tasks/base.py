"""Verifiable reasoning tasks: problems, rule-based rewards, SFT traces, and the task loader.

The R1 recipe trains with rewards computed by rules, never by a learned judge, so the rules below are the whole
"reward model". They are written to be hard to game (see docs/tasks.md and the GRPO reference, section 2).

A completion is the assistant text generated AFTER the prompt, which already ends with "<think>\\n". A well-formed
completion therefore looks like

    {reasoning}\\n</think>\\n\\n{answer part containing exactly one \\boxed{...}}

optionally followed by the end-of-sentence token text.
"""

import hashlib
import importlib
import importlib.util
import inspect
import random
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.errors import NanoseekError

EOS_TEXT = "<｜end▁of▁sentence｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# The maths instruction DeepSeek-R1 recommends; every built-in prompt ends with it.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# Small next to accuracy (1.0): well-formed but wrong earns 0.1, correct earns 1.1, so form alone is not worth learning
FORMAT_WEIGHT = 0.1
SPLITS = ("train", "val", "test")  # val: held out of train for choosing settings


@dataclass
class Problem:
    prompt: str  # the user message
    answer: str  # one gold answer as a canonical string (countdown: a reference expression; judge with Task.score)
    meta: dict = field(default_factory=dict)
    key: str = ""  # what makes two problems the same (countdown: sorted numbers and target); "" means the prompt

    @property
    def identity(self) -> str:
        return self.key or self.prompt


@dataclass
class Reward:
    accuracy: float  # 1.0 or 0.0, judged only on the single \boxed{} of the answer part
    format: float  # 0.0 or the task's format_weight
    parsed: str | None = None  # the \boxed{} content that was judged, None if there was none
    key: tuple | None = None  # the verified value the answer stands for (Task.answer_key), what maj@k votes on

    @property
    def total(self) -> float:
        return self.accuracy + self.format


def split_completion(text: str) -> tuple[str | None, str | None]:
    """Split a completion into (reasoning, answer), both stripped; (None, None) if there is not exactly one </think>.

    Everything from the first end-of-sentence text on is dropped: the sampler stops there, and a padded decode may
    repeat it. Exactly one </think> is required because with two the model could put a different answer after each
    and let the scorer pick; with none there is no committed answer, only thinking.
    """
    text = text.split(EOS_TEXT, 1)[0]
    if text.count(THINK_CLOSE) != 1:
        return None, None
    reasoning, answer = text.split(THINK_CLOSE)
    return reasoning.strip(), answer.strip()


def extract_boxed(text: str) -> str | None:
    """The stripped content of the only \\boxed{...} in text (braces may nest), else None.

    Several \\boxed are hedging (the model lists candidates hoping one matches), so they earn nothing; an unclosed
    brace is an unfinished answer.
    """
    if text.count("\\boxed") != 1:
        return None
    start = text.index("\\boxed") + len("\\boxed")
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i].strip()
    return None


def format_completion(reasoning: str, answer: str) -> str:
    """The completion text (after the prompt's "<think>\\n") for a reasoning trace and an answer; used for SFT."""
    return f"{reasoning}\n{THINK_CLOSE}\n\n{answer}"


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def in_validation(key: str) -> bool:
    """Whether a problem with this canonical key belongs to the validation split: about 1 in 20 keys (those whose
    hash is 1 mod 20, so never a hash_split test key)."""
    return _key_hash(key) % 20 == 1


def hash_split(key: str, test_every: int = 10) -> str:
    """Assign a synthetic problem to "train", "val" or "test" by a stable hash of its canonical key.

    Partitioning the problem space (about 1 in test_every problems is a test problem, 1 in 20 a validation problem)
    makes the splits disjoint by construction, however many problems are drawn, unlike drawing the splits from
    different seeds. "val" is held out from training for choosing settings, so the test split is looked at once.
    """
    h = _key_hash(key)
    if h % test_every == 0:
        return "test"
    return "val" if h % 20 == 1 else "train"


def rng_for(*parts: object) -> random.Random:
    """A random.Random seeded by a string of parts: stable across runs and processes (unlike hash() of a str)."""
    return random.Random(":".join(str(p) for p in parts))


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise NanoseekError(f"unknown split {split!r}: expected 'train', 'val' or 'test'")


def draw_problems(
    name: str, split: str, n: int | None, seed: int, make: Callable[[random.Random], tuple[str, Problem]]
) -> list[Problem]:
    """Draw n problems of split from a generator make(rng) -> (canonical key, problem), keeping only those whose key
    hash_split() assigns to split. Problems may repeat within a split (small spaces), never across splits."""
    check_split(split)
    if not isinstance(n, int) or n < 0:
        raise NanoseekError(f"task {name}: n must be a non-negative int for a synthetic task, got {n!r}")
    rng = rng_for(name, split, seed)
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 1):  # an empty split (tiny problem space) must fail loudly, not loop forever
            raise NanoseekError(f"task {name}: could not draw {n} {split} problems; the problem space is too small")
        key, problem = make(rng)
        if hash_split(f"{name}:{key}") == split:
            problem.key = key
            out.append(problem)
    return out


def distinct_problems(task: "Task", split: str, n: int, seed: int = 0) -> list[Problem]:
    """The first n different problems (by Problem.identity) that task.problems(split, ...) draws with seed; all of them
    if the split has fewer.

    An evaluation needs this: a synthetic split of a small space repeats problems (3 one-digit countdown numbers have
    148 test problems), and a repeat would narrow the confidence interval without adding evidence. Draws grow 4x at a
    time and stop when a draw of 64n problems still has fewer than n different ones.
    """
    drawn = n
    while True:
        unique: dict[str, Problem] = {}
        for problem in task.problems(split, drawn, seed=seed):
            unique.setdefault(problem.identity, problem)
        if len(unique) >= n or drawn >= 64 * n:
            return list(unique.values())[:n]
        drawn *= 4


class Task:
    """A verifiable task. Subclasses implement problems(), check() (or score()) and solution_trace()."""

    name: str = "task"
    format_weight: float = FORMAT_WEIGHT

    def problems(self, split: str, n: int | None, seed: int = 0) -> list[Problem]:
        """n problems of split ("train", "val" or "test"), the same for the same arguments; the splits are disjoint."""
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> bool:
        """Whether answer, the content of the single \\boxed{} in the answer part, is correct."""
        raise NotImplementedError

    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        """(reasoning, answer_text): a correct step-by-step trace and the answer text "\\boxed{...}", for SFT."""
        raise NotImplementedError

    def answer_key(self, problem: Problem, answer: str) -> tuple:
        """What an answer (the content of the \\boxed{}) stands for, for majority votes: two answers with the same
        key are the same answer and are judged alike (arithmetic: the integer; gsm8k: the number; countdown: the
        value of a legal expression). By default the text without whitespace."""
        return ("text", "".join(answer.split()))

    def score(self, problem: Problem, completion: str) -> Reward:
        """Rule-based reward of a completion.

        format = format_weight iff there is exactly one </think>, no <think> (the prompt already opened thinking, a
        second one is malformed), non-empty reasoning before it and a non-empty answer after it.
        accuracy = 1.0 iff there is exactly one </think> and the text after it holds exactly one \\boxed{} whose
        content check() accepts. The reasoning is never read for accuracy: an answer that appears only while
        thinking is not a committed answer, and reading it would reward dumping many candidates there.
        """
        reasoning, answer = split_completion(completion)
        well_formed = bool(reasoning) and bool(answer) and THINK_OPEN not in completion.split(EOS_TEXT, 1)[0]
        fmt = self.format_weight if well_formed else 0.0
        boxed = extract_boxed(answer) if answer is not None else None
        accuracy = 1.0 if boxed is not None and self.check(problem, boxed) else 0.0
        key = self.answer_key(problem, boxed) if boxed is not None else None
        return Reward(accuracy=accuracy, format=fmt, parsed=boxed, key=key)


BUILTIN_TASKS = {
    "arithmetic": "nanoseek.tasks.arithmetic:ArithmeticTask",
    "countdown": "nanoseek.tasks.countdown:CountdownTask",
    "gsm8k": "nanoseek.tasks.gsm8k:GSM8KTask",
}


def _parse_value(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_kwargs(text: str, spec: str) -> dict:
    """Parse "min_digits=3,ops=+-" into {"min_digits": 3, "ops": "+-"}: ints and floats are converted, else str."""
    kwargs = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise NanoseekError(f"task spec {spec!r}: expected key=value, got {item!r}")
        kwargs[key.strip()] = _parse_value(value.strip())
    return kwargs


def _load_plugin_class(path: Path, class_name: str) -> type:
    if not path.is_file():
        raise NanoseekError(f"task plugin {path}: file not found")
    module_name = "nanoseek_task_plugin_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise NanoseekError(f"task plugin {path}: cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here while it executes
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(module_name, None)
        raise NanoseekError(f"task plugin {path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        sys.modules.pop(module_name, None)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise NanoseekError(f"task plugin {where}: import failed: {type(e).__name__}: {e}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        found = sorted(k for k, v in vars(module).items() if inspect.isclass(v) and issubclass(v, Task) and v != Task)
        raise NanoseekError(f"task plugin {path}: no class {class_name!r} (Task subclasses found: {found or 'none'})")
    return cls


def _check_task_class(cls: object, where: str) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise NanoseekError(f"task plugin {where}: not a subclass of nanoseek.tasks.Task")
    if cls.problems is Task.problems:
        raise NanoseekError(f"task plugin {where}: does not define problems(split, n, seed)")
    if cls.score is Task.score and cls.check is Task.check:
        raise NanoseekError(f"task plugin {where}: defines neither check(problem, answer) nor score(problem, text)")


class MixedTask(Task):
    """Several tasks in one: each problem comes from sub-task i with probability weights[i] / sum(weights), and is
    scored, traced and keyed by that task's own rules (its reward, its format weight). Built by load_task from a mix
    spec such as "3*arithmetic:min_digits=3,countdown"."""

    name = "mix"

    def __init__(self, tasks: list[Task], weights: list[float], labels: list[str]):
        if not tasks or len(tasks) != len(weights) or any(not w > 0 for w in weights):
            raise NanoseekError(f"task mix: needs tasks with positive weights, got {weights}")
        self.tasks, self.weights, self.labels = tasks, weights, labels

    def problems(self, split: str, n: int | None, seed: int = 0) -> list[Problem]:
        """n problems, sub-task by sub-task in a seeded order; a finite sub-task (GSM8K) that has fewer problems than
        its share gives all it has, so the mix may return fewer than n. n=None: every sub-task's whole split."""
        check_split(split)
        if n is None:
            return [self._tag(i, q) for i, t in enumerate(self.tasks) for q in t.problems(split, None, seed=seed)]
        if not isinstance(n, int) or n < 0:
            raise NanoseekError(f"task mix: n must be None or a non-negative int, got {n!r}")
        picks = rng_for("mix", split, seed).choices(range(len(self.tasks)), self.weights, k=n)
        drawn = {i: iter(self.tasks[i].problems(split, picks.count(i), seed=seed)) for i in set(picks)}
        out = []
        for i in picks:
            q = next(drawn[i], None)
            if q is not None:
                out.append(self._tag(i, q))
        return out

    def _tag(self, i: int, q: Problem) -> Problem:
        # a new Problem: a data set task may hand out its cached objects
        return Problem(q.prompt, q.answer, {**q.meta, "mix_task": i}, key=f"{self.labels[i]}|{q.identity}")

    def task_of(self, problem: Problem) -> tuple[str, Task]:
        i = problem.meta["mix_task"]
        return self.labels[i], self.tasks[i]

    def score(self, problem: Problem, completion: str) -> Reward:
        return self.task_of(problem)[1].score(problem, completion)

    def check(self, problem: Problem, answer: str) -> bool:
        return self.task_of(problem)[1].check(problem, answer)

    def solution_trace(self, problem: Problem) -> tuple[str, str]:
        return self.task_of(problem)[1].solution_trace(problem)

    def answer_key(self, problem: Problem, answer: str) -> tuple:
        return self.task_of(problem)[1].answer_key(problem, answer)


def split_mix(spec: str) -> list[tuple[float, str]]:
    """A mix spec -> [(weight, task spec)]. Items are separated by commas; an item of the form key=value continues the
    previous task's arguments, any other item starts a task, optionally weighted as "<weight>*<task spec>" (default
    1). So "arithmetic:min_digits=3,ops=+-" is one task and "3*arithmetic:min_digits=3,ops=+-,countdown" two."""
    out: list[tuple[float, str]] = []
    for item in spec.split(","):
        if out and re.match(r"\s*[A-Za-z_]\w*\s*=", item):
            out[-1] = (out[-1][0], f"{out[-1][1]},{item}")
            continue
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*\*\s*(.+)", item)
        weight, task_spec = (float(m.group(1)), m.group(2)) if m else (1.0, item.strip())
        if not task_spec:
            raise NanoseekError(f"task spec {spec!r}: an empty task in the mix")
        out.append((weight, task_spec))
    return out


def load_task(spec: str) -> Task:
    """Build a task from a spec string.

    Several tasks separated by commas (each optionally weighted, "3*arithmetic:max_digits=3,countdown") make a
    MixedTask (split_mix).

    Built-in: "arithmetic", "countdown", "gsm8k", optionally with constructor arguments, e.g.
    "arithmetic:min_digits=2,max_digits=4,ops=+-". Plugin: "path/to/file.py:MyTask" (optionally
    "path/to/file.py:MyTask:key=value,..."), where MyTask subclasses nanoseek.tasks.Task.
    """
    items = split_mix(spec)
    if len(items) > 1:
        if any(not w > 0 for w, _ in items):
            raise NanoseekError(f"task spec {spec!r}: mix weights must be positive")
        labels = [t.partition(":")[0].rsplit("/", 1)[-1] for _, t in items]
        labels = [f"{lab}{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
        return MixedTask([load_task(t) for _, t in items], [w for w, _ in items], labels)
    spec = items[0][1]
    if ".py:" in spec or spec.endswith(".py"):
        file_part, sep, rest = spec.partition(".py:")
        path = Path(file_part + ".py") if sep else Path(spec)
        class_name, _, kwargs_text = rest.partition(":")
        if not class_name:
            raise NanoseekError(f"task spec {spec!r}: name the class, e.g. {path}:MyTask")
        cls = _load_plugin_class(path, class_name)
        where = f"{path}:{class_name}"
        _check_task_class(cls, where)
    else:
        name, _, kwargs_text = spec.partition(":")
        if name not in BUILTIN_TASKS:
            raise NanoseekError(f"unknown task {name!r}: expected one of {sorted(BUILTIN_TASKS)} or file.py:Class")
        module_name, class_name = BUILTIN_TASKS[name].split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        where = name
    kwargs = _parse_kwargs(kwargs_text, spec)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise NanoseekError(f"task {where}: bad arguments {kwargs}: {e}") from None
    try:
        return cls(**kwargs)
    except NanoseekError:
        raise
    except Exception as e:
        raise NanoseekError(f"task {where}: construction failed: {type(e).__name__}: {e}") from None
