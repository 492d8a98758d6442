"""benchmarks/bench_reasoning.py: the validation set that picks the cold start's step count, and the checkpoint
listing it picks from."""

import importlib.util
from pathlib import Path

import pytest

from nanoseek.errors import NanoseekError
from nanoseek.tasks import load_task

ROOT = Path(__file__).resolve().parent.parent
SPEC = "arithmetic:min_digits=2,max_digits=2,ops=+-"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_reasoning", ROOT / "benchmarks" / "bench_reasoning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validation_problems_are_train_split_and_disjoint_from_the_traces():
    bench, task = load_bench(), load_task(SPEC)
    traces = task.problems("train", 300, seed=0)
    val = bench.validation_problems(task, 200, 10_000, traces)
    assert len(val) == 200
    prompts = [q.prompt for q in val]
    assert len(set(prompts)) == 200  # no repeats
    assert not set(prompts) & {q.prompt for q in traces}  # none of the cold-start traces
    assert not set(prompts) & {q.prompt for q in task.problems("test", 2000, seed=0)}  # never the test split
    assert [q.prompt for q in bench.validation_problems(task, 200, 10_000, traces)] == prompts  # deterministic


def test_validation_problems_too_small_a_space_raises():
    bench, task = load_bench(), load_task("arithmetic:min_digits=1,max_digits=1,ops=+")
    with pytest.raises(NanoseekError, match="validation problems"):
        bench.validation_problems(task, 200, 0, task.problems("train", 100, seed=0))


def test_checkpoints_sorted_by_step(tmp_path):
    bench = load_bench()
    for step in (300, 100, 200):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_000300\n")
    assert [s for s, _ in bench.checkpoints(tmp_path)] == [100, 200, 300]


def test_validation_problems_exclude_reordered_trace_problems():
    # countdown problems with the same numbers in another order are the same problem (the same key)
    bench = load_bench()
    task = load_task(bench.TASKS["countdown"])
    traces = task.problems("train", 4000, seed=0)
    val = bench.validation_problems(task, 200, 10_000, traces)
    keys = [q.identity for q in val]
    assert len(set(keys)) == 200
    assert not set(keys) & {q.identity for q in traces}  # 104 of the 200 overlapped when compared by prompt
