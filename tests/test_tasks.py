"""Verifiable tasks: exact rewards, including adversarial completions that must earn nothing."""

from pathlib import Path

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.tasks import (
    EOS_TEXT,
    FORMAT_WEIGHT,
    ArithmeticTask,
    CountdownTask,
    GSM8KTask,
    MixedTask,
    Problem,
    Task,
    distinct_problems,
    extract_boxed,
    format_completion,
    load_task,
    split_completion,
)
from nanoseek.tasks.arithmetic import parse_int
from nanoseek.tasks.countdown import check_expression

REPO_GSM8K = Path(__file__).resolve().parents[1] / "nanoseek" / "corpus" / "gsm8k"
SHARED_GSM8K = Path("/work/shared/data/gsm8k")


@pytest.fixture(scope="module")
def gsm8k() -> GSM8KTask:
    for d in (REPO_GSM8K, SHARED_GSM8K):
        if (d / "train.jsonl").is_file() and (d / "test.jsonl").is_file():
            return GSM8KTask(data_dir=str(d))
    pytest.skip("GSM8K files not found")


def reward(task: Task, problem: Problem, completion: str) -> tuple[float, float]:
    r = task.score(problem, completion)
    assert r.total == r.accuracy + r.format
    return r.accuracy, r.format


def traced(task: Task, problem: Problem) -> str:
    return format_completion(*task.solution_trace(problem))


# ---------------------------------------------------------------- completion parsing, shared by all tasks


def test_split_completion():
    assert split_completion("think\n</think>\n\n\\boxed{3}") == ("think", "\\boxed{3}")
    assert split_completion("a</think>b</think>c") == (None, None)
    assert split_completion("no closing tag \\boxed{3}") == (None, None)
    assert split_completion(f"r</think>\\boxed{{3}}{EOS_TEXT}") == ("r", "\\boxed{3}")
    # text after the end-of-sentence token is not part of the completion
    assert split_completion(f"r</think>\\boxed{{3}}{EOS_TEXT}</think>\\boxed{{4}}") == ("r", "\\boxed{3}")


def test_extract_boxed():
    assert extract_boxed("The answer is \\boxed{ 42 }.") == "42"
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} or \\boxed{2}") is None
    assert extract_boxed("\\boxed{12") is None
    assert extract_boxed("\\boxed 12") is None
    assert extract_boxed("12") is None


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_traces_score_full():
    task = ArithmeticTask(min_digits=1, max_digits=5)
    problems = task.problems("train", 300, seed=1)
    assert {p.meta["op"] for p in problems} == {"+", "-", "*"}
    assert any(int(p.answer) < 0 for p in problems)  # negative differences are covered
    for p in problems:
        assert reward(task, p, traced(task, p)) == (1.0, FORMAT_WEIGHT), p.prompt
        assert reward(task, p, traced(task, p) + EOS_TEXT) == (1.0, FORMAT_WEIGHT)


def test_arithmetic_trace_content():
    task = ArithmeticTask()
    p = Problem("", "425", {"a": 503, "b": 78, "op": "-"})
    reasoning, answer = task.solution_trace(p)
    assert "3 - 8 - borrow 0 = -5 is negative, so add 10: write 5, borrow 1" in reasoning
    assert answer == "\\boxed{425}"
    p = Problem("", "20126", {"a": 347, "b": 58, "op": "*"})
    reasoning, _ = task.solution_trace(p)
    assert "347 * 8 = 2776" in reasoning and "347 * 5 = 1735, shifted 1 place: 17350" in reasoning
    assert "2776 + 17350 = 20126" in reasoning


def test_arithmetic_adversarial():
    task = ArithmeticTask()
    p = Problem("What is 1000 - 2234?", "-1234", {"a": 1000, "b": 2234, "op": "-"})
    assert reward(task, p, "r\n</think>\n\n\\boxed{-1,234}") == (1.0, FORMAT_WEIGHT)
    assert reward(task, p, "r\n</think>\n\nso \\boxed{ - 1234 }.") == (1.0, FORMAT_WEIGHT)
    assert reward(task, p, "r\n</think>\n\n\\boxed{-1235}") == (0.0, FORMAT_WEIGHT)  # wrong
    assert reward(task, p, "r\n</think>\n\n\\boxed{-1234.0}") == (0.0, FORMAT_WEIGHT)  # not an integer
    assert reward(task, p, "r\n</think>\n\n\\boxed{1000-2234}") == (0.0, FORMAT_WEIGHT)  # an expression
    assert reward(task, p, "\\boxed{-1234}\n</think>\n\nI am not sure.") == (0.0, FORMAT_WEIGHT)  # only in reasoning
    assert reward(task, p, "r\n</think>\n\n\\boxed{-1234} or \\boxed{-1235}") == (0.0, FORMAT_WEIGHT)  # hedging
    assert reward(task, p, "r\n</think>\n\n\\boxed{-1234}\n</think>\n\\boxed{-1234}") == (0.0, 0.0)  # two </think>
    assert reward(task, p, "r\n\n\\boxed{-1234}") == (0.0, 0.0)  # missing </think>
    assert reward(task, p, "</think>\n\n\\boxed{-1234}") == (1.0, 0.0)  # empty reasoning: correct but malformed
    assert reward(task, p, "<think>r</think>\n\n\\boxed{-1234}") == (1.0, 0.0)  # <think> reopened
    assert reward(task, p, "r\n</think>\n\n") == (0.0, 0.0)  # empty answer
    assert reward(task, p, "r\n</think>\n\n-1234") == (0.0, FORMAT_WEIGHT)  # not boxed
    assert parse_int("9" * 1000) is None  # huge strings are rejected before int()


def test_arithmetic_splits_disjoint_and_deterministic():
    task = ArithmeticTask(min_digits=1, max_digits=2, ops="+-")
    train, test = task.problems("train", 2000, seed=0), task.problems("test", 300, seed=0)
    assert {p.prompt for p in train}.isdisjoint(p.prompt for p in test)
    # the same sum with its operands swapped is the same problem, so it stays in one split
    sums = lambda ps: {tuple(sorted((p.meta["a"], p.meta["b"]))) for p in ps if p.meta["op"] == "+"}  # noqa: E731
    assert len(sums(test)) > 50 and sums(train).isdisjoint(sums(test))
    prompts = lambda seed: [p.prompt for p in task.problems("test", 20, seed=seed)]  # noqa: E731
    assert prompts(3) == prompts(3) and prompts(3) != prompts(4)
    with pytest.raises(NanoseekError, match="split"):
        task.problems("validation", 5, seed=0)
    # the validation split is held out of train, and never a test problem
    val = task.problems("val", 300, seed=0)
    assert len(sums(val)) > 20 and sums(val).isdisjoint(sums(train)) and sums(val).isdisjoint(sums(test))


def test_arithmetic_knobs():
    task = ArithmeticTask(min_digits=4, max_digits=4, ops="*")
    for p in task.problems("train", 50, seed=0):
        assert p.meta["op"] == "*" and 1000 <= p.meta["a"] <= 9999 and 1000 <= p.meta["b"] <= 9999
    with pytest.raises(NanoseekError, match="ops"):
        ArithmeticTask(ops="/")
    with pytest.raises(NanoseekError, match="min_digits"):
        ArithmeticTask(min_digits=3, max_digits=2)


# ---------------------------------------------------------------- countdown


def test_countdown_generated_problems_solvable_and_traces_score_full():
    task = CountdownTask()
    problems = task.problems("train", 250, seed=0) + task.problems("test", 50, seed=0)
    assert {len(p.meta["numbers"]) for p in problems} == {3, 4}
    for p in problems:
        target = p.meta["target"]
        assert 1 <= target <= 100 and target not in p.meta["numbers"]
        # the reference expression built with the problem is a correct answer
        assert reward(task, p, f"r\n</think>\n\n\\boxed{{{p.answer}}}") == (1.0, FORMAT_WEIGHT), p.answer
        assert reward(task, p, traced(task, p)) == (1.0, FORMAT_WEIGHT), traced(task, p)


def test_countdown_trace_content():
    task = CountdownTask()
    p = Problem("", "3 * 4 + 5", {"numbers": [3, 4, 5, 9], "target": 17})
    reasoning, answer = task.solution_trace(p)
    assert reasoning.startswith("Numbers 3, 4, 5, 9; target 17.")
    assert reasoning.endswith(" = 17.") and answer.startswith("\\boxed{")
    assert check_expression(answer[len("\\boxed{") : -1], [3, 4, 5, 9], 17)


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("3 * 4 + 5", True),
        ("(3*4)+5", True),
        ("3 \\times 4 + 5", True),
        ("3 × 4 + 5", True),
        ("5 + 4 * 3 = 17", True),  # optional "= target"
        ("3 * 4 + 5 = 18", False),  # wrong claimed value
        ("3 * 4 + 5 = 17 = 17", False),
        ("3 * 4 + 6", False),  # 6 is not given
        ("3 * 4 + 5 + 5 - 5", False),  # 5 used twice
        ("9 + 9 - 1", False),  # 9 used twice, 1 not given
        ("3 * 4 + 4", False),  # wrong value
        ("17", False),  # a number not given
        ("3 ** 2 + 9 - 5 + 4", False),  # no powers
        ("9 ** 9 ** 9", False),  # would hang a naive evaluator
        ("__import__('os').system('true')", False),
        ("abs(9) + 5 + 3", False),
        ("x + 5", False),
        ("-3 + 4 * 5", False),  # no unary minus
        ("3.5 * 4 + 3", False),  # decimal literal
        ("(9 - 5) and 17", False),
        ("4 / (3 - 3) + 5", False),  # division by zero
        ("(" * 120 + "9" + ")" * 120, False),  # too long
        ("9 + 5 + 3 " + "+ 0 " * 60, False),  # too long, and 0 is not given
        ("", False),
    ],
)
def test_countdown_check_expression(answer: str, ok: bool):
    assert check_expression(answer, [3, 4, 5, 9], 17) is ok


def test_countdown_adversarial_rewards():
    task = CountdownTask()
    p = Problem("", "8 / 3 * 3", {"numbers": [8, 3, 3], "target": 8})
    # fractional intermediate values are fine when the final value is exact
    assert reward(task, p, "r\n</think>\n\n\\boxed{(8 / 3) * 3}") == (1.0, FORMAT_WEIGHT)
    assert reward(task, p, "r\n</think>\n\n\\boxed{8 / (3 - 3)}") == (0.0, FORMAT_WEIGHT)
    assert reward(task, p, "r\n</think>\n\n\\boxed{__import__('os')}") == (0.0, FORMAT_WEIGHT)
    assert reward(task, p, "r\n</think>\n\n\\boxed{8 * 3 / 3 * 3 / 3}") == (0.0, FORMAT_WEIGHT)  # 3 used 4 times
    assert reward(task, p, "r\n</think>\n\n\\boxed{" + "8" * 5000 + "}") == (0.0, FORMAT_WEIGHT)
    assert reward(task, p, "\\boxed{(8 / 3) * 3}\n</think>\n\nDone.") == (0.0, FORMAT_WEIGHT)  # only in reasoning
    assert reward(task, p, "r\n</think>\n\n\\boxed{8 / 3 * 3} \\boxed{8 + 3 - 3}") == (0.0, FORMAT_WEIGHT)
    assert reward(task, p, "r\n</think>\n</think>\n\n\\boxed{8 / 3 * 3}") == (0.0, 0.0)
    assert reward(task, p, "r\n\n\\boxed{8 / 3 * 3}") == (0.0, 0.0)


def test_countdown_splits_disjoint():
    task = CountdownTask(min_numbers=3, max_numbers=3, max_number=9, max_target=30)
    key = lambda p: (tuple(sorted(p.meta["numbers"])), p.meta["target"])  # noqa: E731
    train = {key(p) for p in task.problems("train", 2000, seed=0)}
    test = {key(p) for p in task.problems("test", 300, seed=0)}
    assert len(test) > 50 and train.isdisjoint(test)


def test_distinct_problems_for_evaluation(gsm8k: GSM8KTask):
    # 3 one-digit numbers and targets up to 30: the whole test split is 148 problems, so 500 draws must repeat
    task = CountdownTask(min_numbers=3, max_numbers=3, max_number=9, max_target=30)
    drawn = task.problems("test", 500, seed=0)
    assert len({p.key for p in drawn}) < 150
    assert drawn[0].key == f"{sorted(drawn[0].meta['numbers'])}->{drawn[0].meta['target']}"
    everything = distinct_problems(task, "test", 500, seed=0)
    assert len(everything) == len({p.identity for p in everything}) == 148  # all of the split, each once
    first = distinct_problems(task, "test", 20, seed=0)
    assert [p.identity for p in first] == [p.identity for p in everything[:20]]  # draw order: a prefix of the above
    assert first[0].prompt == drawn[0].prompt
    # 2-digit arithmetic has ~1,600 test problems: 500 different ones, where plain draws repeat some
    arith = load_task("arithmetic:min_digits=2,max_digits=2,ops=+-")
    assert len({p.identity for p in arith.problems("test", 500, seed=0)}) < 500
    assert len({p.identity for p in distinct_problems(arith, "test", 500, seed=0)}) == 500
    # a dataset task's problems have no key: the prompt is their identity
    rows = distinct_problems(gsm8k, "test", 30, seed=3)
    assert len({p.prompt for p in rows}) == 30 and all(p.key == "" for p in rows)


# ---------------------------------------------------------------- gsm8k


def test_gsm8k_traces_score_full(gsm8k: GSM8KTask):
    problems = gsm8k.problems("train", None)
    val = gsm8k.problems("val", None)
    assert len(problems) + len(val) == 7473 and len(gsm8k.problems("test", None)) == 1319
    assert 300 < len(val) < 450 and not {p.prompt for p in val} & {p.prompt for p in problems}  # ~5%, held out
    for p in problems[:50]:
        reasoning, answer = gsm8k.solution_trace(p)
        assert "<<" not in reasoning and "####" not in reasoning
        assert reward(gsm8k, p, format_completion(reasoning, answer)) == (1.0, FORMAT_WEIGHT)
    p = problems[0]
    assert p.answer == "72" and p.prompt.startswith("Natalia sold clips")
    assert gsm8k.solution_trace(p)[0].startswith("Natalia sold 48/2 = 24 clips in May.")


def test_gsm8k_answer_matching(gsm8k: GSM8KTask):
    p18, p1234 = Problem("", "18", {}), Problem("", "1234", {})
    good = ["18", "18.00", "18.", "$18", "\\$18", " 18 "]
    for text in good:
        assert reward(gsm8k, p18, f"r\n</think>\n\n\\boxed{{{text}}}") == (1.0, FORMAT_WEIGHT), text
    for text in ["1,234", "1234", "1{,}234", "$1,234.0"]:
        assert reward(gsm8k, p1234, f"r\n</think>\n\n\\boxed{{{text}}}") == (1.0, FORMAT_WEIGHT), text
    for text in ["18 dollars", "17", "18/1", "x=18", "18%", "", "1" * 100]:
        assert reward(gsm8k, p18, f"r\n</think>\n\n\\boxed{{{text}}}") == (0.0, FORMAT_WEIGHT), text
    assert reward(gsm8k, p18, "So it is \\boxed{18}.\n</think>\n\nThe answer is 18.") == (0.0, FORMAT_WEIGHT)
    assert reward(gsm8k, p18, "r\n</think>\n\n\\boxed{18} or \\boxed{17}") == (0.0, FORMAT_WEIGHT)
    assert reward(gsm8k, p18, "r\n</think>\n\\boxed{18}</think>\\boxed{18}") == (0.0, 0.0)
    assert reward(gsm8k, p18, "r\n\\boxed{18}") == (0.0, 0.0)


def test_gsm8k_sampling(gsm8k: GSM8KTask):
    a, b = gsm8k.problems("test", 20, seed=1), gsm8k.problems("test", 20, seed=1)
    assert [p.prompt for p in a] == [p.prompt for p in b] and len({p.prompt for p in a}) == 20
    assert [p.prompt for p in gsm8k.problems("test", 20, seed=2)] != [p.prompt for p in a]
    test_lines = {p.meta["line"] for p in gsm8k.problems("test", None)}
    assert max(test_lines) == 1319
    assert len(gsm8k.problems("train", 10**6)) + len(gsm8k.problems("val", 10**6)) == 7473


def test_gsm8k_bad_files(tmp_path: Path):
    good = '{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\\n#### 2"}\n'
    for bad, message in [
        ("{not json\n", "invalid JSON"),
        ('{"question": "q"}\n', "'answer'"),
        ('{"question": "q", "answer": "no hashes"}\n', "####"),
        ('{"question": "q", "answer": "#### two"}\n', "####"),
    ]:
        (tmp_path / "train.jsonl").write_text(good + bad)
        with pytest.raises(NanoseekError, match=rf"train\.jsonl:2: .*{message}"):
            GSM8KTask(data_dir=str(tmp_path)).problems("train", None)
    with pytest.raises(NanoseekError, match=r"test\.jsonl: GSM8K file not found"):
        GSM8KTask(data_dir=str(tmp_path)).problems("test", None)


# ---------------------------------------------------------------- load_task and plugins


def test_load_builtin_tasks():
    task = load_task("arithmetic:min_digits=3,max_digits=3,ops=+-")
    assert isinstance(task, ArithmeticTask) and (task.min_digits, task.max_digits, task.ops) == (3, 3, "+-")
    assert isinstance(load_task("countdown:max_target=50"), CountdownTask)
    assert isinstance(load_task("gsm8k"), GSM8KTask)
    with pytest.raises(NanoseekError, match="unknown task 'sudoku'"):
        load_task("sudoku")
    with pytest.raises(NanoseekError, match="bad arguments"):
        load_task("arithmetic:digits=3")
    with pytest.raises(NanoseekError, match="key=value"):
        load_task("arithmetic:3")


PLUGIN = """
from nanoseek.tasks import Problem, Task


class EchoTask(Task):
    name = "echo"

    def __init__(self, word: str = "cat"):
        self.word = word

    def problems(self, split, n, seed=0):
        return [Problem(f"Say {self.word}.", self.word, {}) for _ in range(n)]

    def check(self, problem, answer):
        return answer == problem.answer

    def solution_trace(self, problem):
        return "Repeat the word.", "\\\\boxed{" + problem.answer + "}"
"""


def test_plugin_loading(tmp_path: Path):
    path = tmp_path / "echo.py"
    path.write_text(PLUGIN)
    task = load_task(f"{path}:EchoTask")
    (p,) = task.problems("train", 1, 0)
    assert reward(task, p, traced(task, p)) == (1.0, FORMAT_WEIGHT)
    assert reward(task, p, "r</think>\\boxed{dog}") == (0.0, FORMAT_WEIGHT)
    assert load_task(f"{path}:EchoTask:word=dog").problems("train", 1, 0)[0].answer == "dog"


@pytest.mark.parametrize(
    "source, cls, message",
    [
        (None, "EchoTask", r"file not found"),
        ("class EchoTask(:\n    pass\n", "EchoTask", r"plugin\.py:1: syntax error"),
        ("x = 1\nraise RuntimeError('boom')\n", "EchoTask", r"plugin\.py:2: import failed: RuntimeError: boom"),
        (PLUGIN, "CatTask", r"plugin\.py: no class 'CatTask' \(Task subclasses found: \['EchoTask'\]\)"),
        ("class EchoTask:\n    pass\n", "EchoTask", r"plugin\.py:EchoTask: not a subclass"),
        ("from nanoseek.tasks import Task\nclass EchoTask(Task):\n    pass\n", "EchoTask", r"problems"),
        (PLUGIN.replace("def check", "def _check"), "EchoTask", r"neither check"),
    ],
)
def test_broken_plugins(tmp_path: Path, source: str | None, cls: str, message: str):
    path = tmp_path / "plugin.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(NanoseekError, match=message) as e:
        load_task(f"{path}:{cls}")
    assert str(path) in str(e.value)


# ---------------------------------------------------------------- mixes


def test_task_mix_spec_problems_and_rewards(tmp_path: Path):
    from nanoseek.tasks.base import split_mix

    assert split_mix("arithmetic:min_digits=3,ops=+-") == [(1.0, "arithmetic:min_digits=3,ops=+-")]
    assert split_mix("3*arithmetic:min_digits=3,ops=+-*, 0.5*countdown:max_numbers=3,gsm8k") == [
        (3.0, "arithmetic:min_digits=3,ops=+-*"), (0.5, "countdown:max_numbers=3"), (1.0, "gsm8k")]
    assert isinstance(load_task("arithmetic:min_digits=3,ops=+-"), ArithmeticTask)  # one task is not a mix
    mix = load_task("3*arithmetic:min_digits=2,max_digits=2,countdown:max_numbers=3")
    assert isinstance(mix, MixedTask) and mix.labels == ["arithmetic", "countdown"] and mix.weights == [3.0, 1.0]
    problems = mix.problems("train", 400, seed=0)
    share = sum(p.meta["mix_task"] == 0 for p in problems) / 400
    assert 0.68 < share < 0.82  # 3 : 1
    assert [p.prompt for p in mix.problems("train", 40, seed=0)] == [p.prompt for p in problems[:40]]  # a prefix
    for p in problems[:60]:  # each problem keeps its own task's traces, rewards and answer keys
        reasoning, answer = mix.solution_trace(p)
        assert reward(mix, p, format_completion(reasoning, answer)) == (1.0, FORMAT_WEIGHT)
    arith = next(p for p in problems if p.meta["mix_task"] == 0)
    count = next(p for p in problems if p.meta["mix_task"] == 1)
    assert mix.answer_key(arith, "1,0") == ("int", 10) and mix.answer_key(count, "3")[0] in ("value", "text")
    test_ids = {p.identity for p in mix.problems("test", 200, seed=0)}
    assert not test_ids & {p.identity for p in problems}  # each task's splits stay disjoint
    # a finite task gives what it has: the mix then returns fewer problems (GRPO draws those in epochs)
    (tmp_path / "train.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    small = load_task(f"arithmetic,gsm8k:data_dir={tmp_path}")
    assert len(small.problems("train", 50, seed=0)) < 50
    for bad in ("arithmetic,0*countdown", "arithmetic,,countdown", "arithmetic,nope"):
        with pytest.raises(NanoseekError):
            load_task(bad)
