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


def test_zero_compares_r1_zero_with_sft_then_rl_on_the_validation_split(tmp_path, monkeypatch):
    # the whole --zero pipeline on a tiny model: pre-train a base, 2 GRPO steps from it with the R1-Zero template,
    # and SFT then 2 GRPO steps; both arms' curves and validation evals land in the result
    import json

    from nanoseek.config import get_preset

    bench = load_bench()
    cfg = get_preset("test")
    cfg.max_position_embeddings = 512  # the ~200-token template + the problem + 160 new tokens
    cfg.save(tmp_path / "config.json")
    result = tmp_path / "result.json"
    monkeypatch.setattr("sys.argv", [
        "bench_reasoning.py", "--zero", "--model-config", str(tmp_path / "config.json"), "--pretrain-steps", "2",
        "--pretrain-traces", "200", "--cold-start", "40", "--sft-steps", "2", "--rl-steps", "2", "-B", "2", "-G", "2",
        "--eval-every", "1", "--val-n", "4", "-n", "4", "--workdir", str(tmp_path / "work"), "--result",
        str(result)])
    bench.main()
    r = json.loads(result.read_text())
    assert r["split"] == "val" and r["n"] == 4 and r["rl_steps"] == 2
    assert set(r["pass@1"]) == {"base", "zero_rl", "sft", "sft_rl"}
    assert json.loads((tmp_path / "work" / "eval_zero_rl.json").read_text())["zero"] is True
    assert json.loads((tmp_path / "work" / "eval_sft_rl.json").read_text())["zero"] is False
    for curve in r["curves"].values():
        assert curve["step"] == [1, 2] and len(curve["response_len_mean"]) == 2
        assert curve["val_step"] == [0, 1, 2]  # before the first step, then every step
    c = r["compute"]
    assert c["zero_rl_token_equivalents"] > 0 and c["sft_rl_token_equivalents"] > 0 and c["sft_token_equivalents"] > 0
    assert r["zero_rl_vs_sft_rl"]["n"] == 4
    assert set(r["wall_seconds"]) == {"zero_rl", "sft", "sft_rl", "eval_base", "eval_zero_rl", "eval_sft",
                                      "eval_sft_rl"}
    assert (tmp_path / "work" / "zero_curves.png").exists()
