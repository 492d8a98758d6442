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


def test_self_sft_budget_splits_grpo_flops_between_sampling_and_sft():
    bench = load_bench()
    # GRPO spent 1,000,000 token-equivalents; a problem's 4 samples cost 4 x (30 + 120) / 3 = 200
    plan = bench.self_sft_budget(1_000_000, 5000, 30, 120, 4, 0.5)
    assert plan == {"problems": 2500, "sampling_token_equivalents": 500_000, "sft_steps": 100}
    # the steps round up (the control is given at least GRPO's FLOPs), the problems down
    plan = bench.self_sft_budget(1_000_000, 3000, 30, 120, 4, 0.3)
    assert plan["problems"] == 1500 and plan["sampling_token_equivalents"] == 300_000
    assert plan["sft_steps"] == 234  # ceil(700,000 / 3000) = ceil(233.3)
    assert bench.self_sft_budget(100, 5000, 30, 120, 4, 0.5) == {"problems": 1, "sampling_token_equivalents": 200,
                                                                 "sft_steps": 1}


def test_keep_fresh_traces_drops_seen_problems(tmp_path):
    import json

    bench, task = load_bench(), load_task(SPEC)
    drawn = task.problems("train", 6, seed=7)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"messages": [], "problem": i, "sample": j}) + "\n"
                               for i in range(6) for j in range(2)))
    counts = bench.keep_fresh_traces(task, samples, tmp_path / "out.jsonl", 6, 7, [drawn[1], drawn[4]])
    kept = [json.loads(line)["problem"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    seen = {drawn[1].identity, drawn[4].identity}
    assert kept == [i for i in range(6) for _ in range(2) if drawn[i].identity not in seen]
    assert counts == {"problems": 6, "traces": len(kept), "problems_with_trace": len(set(kept)),
                      "dropped_seen": 12 - len(kept)}


def fake_pipeline(bench, monkeypatch, tmp_path, val_scores, calls):
    """Replace the CLI stages and the validation evaluation with fakes that write what the bench reads (run.json,
    rl_log.jsonl, checkpoints, eval JSON with per-problem outcomes, verified traces); record each argv after checking
    it against the real `nanoseek` parser."""
    import json
    import shutil

    from nanoseek.cli import build_parser

    task = load_task(SPEC)
    test_ids = [q.identity for q in task.problems("test", 10, seed=0)][:8]
    # test pass@1 per model directory name: every row different
    test_score = {"sft": 0.25, "rl": 0.5, "control": 0.375, "self_sft": 0.375, "stage3_sft": 0.5, "stage3_rl": 0.75,
                  "stage3_sft_cold": 0.5}

    def arg(argv, name):  # the last one, as argparse reads it
        return argv[len(argv) - argv[::-1].index(name)]

    def model_run(path):  # .../<run>/final or .../<run>/checkpoints/step_N -> <run>
        path = Path(path)
        return path.parent.name if path.name == "final" else path.parent.parent.name

    def fake(argv):
        build_parser(argv[0]).parse_args(argv)  # every flag is one the real command takes
        calls.append(argv)
        cmd = argv[0]
        if cmd in ("sft", "rl"):
            out, steps = Path(arg(argv, "--out")), int(arg(argv, "--steps"))
            tok = Path(arg(argv, "--tokenizer") if "--tokenizer" in argv else arg(argv, "--model"))
            every = int(arg(argv, "--save-every"))
            for step in [*range(every, steps + 1, every)] if every else []:
                shutil.copytree(tok, out / "checkpoints" / f"step_{step:06d}", dirs_exist_ok=True)
                (out / "checkpoints" / f"step_{step:06d}" / "model.safetensors").write_text("")
            shutil.copytree(tok, out / "final", dirs_exist_ok=True)
            (out / "final" / "model.safetensors").write_text("")
            tokens = (1000 if cmd == "sft" else 3000) * steps
            (out / "run.json").write_text(json.dumps({"tokens": tokens, "steps": steps, "train_seconds": steps,
                                                      "wall_seconds": 2 * steps}))
            if cmd == "rl":
                (out / "rl_log.jsonl").write_text("".join(json.dumps({"step": s, "response_len_mean": 120}) + "\n"
                                                          for s in range(1, steps + 1)))
        elif cmd == "eval":
            run = model_run(arg(argv, "--model"))
            right = round(test_score[run] * 8)
            outcomes = {"problem": test_ids, "greedy": [1.0] * right + [0.0] * (8 - right),
                        "sampled": [1.0] * right + [0.0] * (8 - right)}
            v = {"value": right / 8, "ci95": [0.0, 1.0]}
            Path(arg(argv, "--json")).write_text(json.dumps({
                "n": 8, "metrics": {"pass@1_sampled_mean@4": v, "pass@1_greedy": v}, "outcomes": outcomes,
                "sampled_mean_tokens": 120 if run == "sft" else 100}))
        elif cmd == "sample":  # every drawn problem's reference trace, as if verified
            drawn = task.problems("train", int(arg(argv, "-n")), seed=int(arg(argv, "--seed")))
            Path(arg(argv, "--out")).write_text("".join(json.dumps({
                "messages": [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": "x"}],
                "problem": i, "sample": 0}) + "\n" for i, q in enumerate(drawn)))

    def fake_eval(engine, tokenizer, task, problems, k, max_new_tokens, seed, greedy):
        run, step = model_run(engine), int(Path(engine).name.split("_")[1])
        return {"metrics": {"pass@1_sampled_mean@4": {"value": val_scores[run](step)}, "pass@4": {"value": 0.0}}}

    monkeypatch.setattr(bench, "nanoseek", fake)
    monkeypatch.setattr(bench, "load_engine", lambda ckpt, batch_size: ckpt)
    monkeypatch.setattr(bench, "evaluate_engine", fake_eval)
    return task


def run_stage3(bench, monkeypatch, tmp_path, *flags):
    import json

    result = tmp_path / "result.json"
    monkeypatch.setattr("sys.argv", ["bench_reasoning.py", "--stage3", "--task", SPEC, "--cold-start", "40",
                                     "--sft-steps", "4", "--select-every", "2", "--rl-steps", "3", "-n", "8",
                                     "--val-n", "5", "--stage3-problems", "30", "--workdir", str(tmp_path / "work"),
                                     "--result", str(result), *flags])
    bench.main()
    return json.loads(result.read_text())


def test_stage3_runs_the_self_sft_control_and_r1_stage3_in_order(tmp_path, monkeypatch, capsys):
    import json

    bench, calls = load_bench(), []
    val = {"sft": lambda s: 0.1 * s, "stage3_sft": lambda s: 0.5 if s == 2 else 0.4}
    task = fake_pipeline(bench, monkeypatch, tmp_path, val, calls)
    r = run_stage3(bench, monkeypatch, tmp_path)
    assert [(c[0], Path(c[c.index("--out") + 1] if "--out" in c else c[c.index("--json") + 1]).name)
            for c in calls] == [
        ("sft", "sft"), ("eval", "eval_sft.json"), ("rl", "rl"), ("eval", "eval_rl.json"),
        ("sft", "control"), ("eval", "eval_control.json"),
        ("sample", "self_samples.jsonl"), ("sft", "self_sft"), ("eval", "eval_self_sft.json"),
        ("sample", "stage3_samples.jsonl"), ("sft", "stage3_sft"), ("eval", "eval_stage3_sft.json"),
        ("rl", "stage3_rl"), ("eval", "eval_stage3_rl.json")]
    argv = {Path(c[c.index("--out") + 1]).name: c for c in calls if "--out" in c}

    def arg(name, flag):
        return argv[name][argv[name].index(flag) + 1]

    # the cold start (step 4 of 4 on validation: 0.4) is where the control, self-sampling and self-SFT start
    cold = str(tmp_path / "work" / "sft" / "checkpoints" / "step_000004")
    assert arg("self_samples.jsonl", "--model") == arg("self_sft", "--model") == cold
    assert arg("stage3_samples.jsonl", "--model") == str(tmp_path / "work" / "rl" / "final")
    # fresh draw seeds: not the cold start's (0), GRPO's (100), the validation's (10,000) or each other's
    assert (arg("sft", "--seed"), arg("rl", "--seed")) == ("0", "100")
    assert (arg("self_samples.jsonl", "--seed"), arg("stage3_samples.jsonl", "--seed"), arg("stage3_rl", "--seed")) \
        == ("300", "400", "500")
    # stage 3's SFT: a fresh init of the cold start's shape on the cold-start traces + the GRPO model's verified ones,
    # picked on validation (step 2: 0.5); at or above the cold start's 0.4, so no SFT from the cold start
    s3 = argv["stage3_sft"]
    assert "--preset" in s3 and s3[s3.index("--data") + 1] == str(tmp_path / "work" / "stage3_traces.jsonl")
    assert (arg("stage3_sft", "--task"), arg("stage3_sft", "--n"), arg("stage3_sft", "--seed")) == (SPEC, "40", "0")
    assert arg("stage3_rl", "--model") == str(tmp_path / "work" / "stage3_sft" / "checkpoints" / "step_000002")
    assert r["stage3"]["init"] == "scratch" and r["stage3"]["selected_step"] == 2

    # FLOP matching: GRPO = 3 steps x (3000 trainer tokens + 128 rollouts x (prompt + 120) / 3)
    prompt_len = (r["rl_token_equivalents"] - 9000) * 3 / (3 * 128) - 120
    tok = bench.Tokenizer.from_dir(tmp_path / "work" / "tokenizer")
    assert prompt_len == pytest.approx(sum(len(bench.prompt_ids(tok, q)) for q in task.problems("train", 200, 100))
                                       / 200)
    plan = r["self_sft_plan"]
    per_problem = 4 * (prompt_len + 120) / 3  # the cold start's eval: 120 tokens a sample
    assert plan["problems"] == int(0.5 * r["rl_token_equivalents"] // per_problem)
    assert plan["sft_steps"] == -(-(r["rl_token_equivalents"] - plan["problems"] * per_problem) // 1000)
    assert arg("self_samples.jsonl", "-n") == str(plan["problems"]) and arg("self_sft", "--steps") == str(
        plan["sft_steps"])
    assert r["rl_token_equivalents"] <= plan["token_equivalents"] < r["rl_token_equivalents"] + 1000

    # the traces trained on: no cold-start trace or validation problem
    cold_traces = task.problems("train", 40, seed=0)
    seen = {q.identity for q in cold_traces + bench.validation_problems(task, 5, 10_000, cold_traces)}
    for name, n, seed in (("self", plan["problems"], 300), ("stage3", 30, 400)):
        drawn = task.problems("train", n, seed=seed)
        kept = [json.loads(line)["problem"] for line in (tmp_path / "work" / f"{name}_traces.jsonl").open()]
        assert kept and not {drawn[i].identity for i in kept} & seen
        assert len(kept) + r["self_sft_plan" if name == "self" else "stage3"]["dropped_seen"] == n

    # the rows and their paired comparisons (8 test problems; fake pass@1 0.25 cold start, 0.5 GRPO, ...)
    assert (r["before"], r["after"], r["control"], r["self_sft"], r["stage3_sft"], r["stage3_rl"]) == (
        0.25, 0.5, 0.375, 0.375, 0.5, 0.75)
    assert r["paired"]["stage3_rl_vs_rl"]["sampled"]["delta"] == 0.25
    assert r["paired"]["self_sft_vs_sft"]["greedy"] == {"a": 0.25, "b": 0.375, "delta": 0.125, "b_only": 1,
                                                        "a_only": 0, "p": 1.0, "test": "McNemar exact"}
    assert set(r["p_values"]) == {"rl_vs_sft", "control_vs_sft", "control_vs_rl", "self_sft_vs_sft", "self_sft_vs_rl",
                                  "stage3_sft_vs_sft", "stage3_sft_vs_rl", "stage3_rl_vs_sft", "stage3_rl_vs_rl",
                                  "stage3_rl_vs_stage3_sft"}
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[-1])["stage3_rl"] == 0.75  # the last line is still the result
    assert any(line.startswith("SFT on own verified samples (FLOP-matched)") for line in out)

    # resumable: a second run skips every stage
    calls.clear()
    run_stage3(bench, monkeypatch, tmp_path)
    assert calls == []


def test_stage3_sft_also_from_the_cold_start_when_the_fresh_init_stays_below_it(tmp_path, monkeypatch):
    bench, calls = load_bench(), []
    # validation pass@1: cold start 0.4 (step 4); stage 3 from scratch at best 0.3, from the cold start 0.45
    val = {"sft": lambda s: 0.1 * s, "stage3_sft": lambda s: 0.3, "stage3_sft_cold": lambda s: 0.45 if s == 4 else 0}
    fake_pipeline(bench, monkeypatch, tmp_path, val, calls)
    r = run_stage3(bench, monkeypatch, tmp_path)
    runs = [Path(c[c.index("--out") + 1]).name for c in calls if c[0] == "sft"]
    assert runs == ["sft", "control", "self_sft", "stage3_sft", "stage3_sft_cold"]
    cold_run = next(c for c in calls if c[0] == "sft" and c[-1].endswith("stage3_sft_cold"))
    assert cold_run[cold_run.index("--model") + 1] == str(tmp_path / "work" / "sft" / "checkpoints" / "step_000004")
    rl = next(c for c in calls if c[0] == "rl" and c[-1].endswith("stage3_rl"))
    assert rl[rl.index("--model") + 1] == str(tmp_path / "work" / "stage3_sft_cold" / "checkpoints" / "step_000004")
    assert r["stage3"]["init"] == "cold-start" and set(r["stage3"]["val_curves"]) == {"scratch", "cold-start"}
    assert r["stage3"]["sft_token_equivalents"] == 2 * 4 * 1000  # both SFT runs are paid for


def test_stage3_flags(tmp_path, monkeypatch, capsys):
    bench, calls = load_bench(), []
    fake_pipeline(bench, monkeypatch, tmp_path, {"sft": lambda s: 0.1 * s, "stage3_sft_cold": lambda s: 0.2}, calls)
    r = run_stage3(bench, monkeypatch, tmp_path, "--stage3-init", "cold-start", "--stage3-rl-steps", "5",
                   "--self-sample-frac", "0.25")
    assert [Path(c[c.index("--out") + 1]).name for c in calls if c[0] == "sft"][-1] == "stage3_sft_cold"
    assert r["stage3"]["init"] == "cold-start" and r["stage3"]["rl_steps"] == 5
    assert r["self_sft_plan"]["sample_frac"] == 0.25
    monkeypatch.setattr("sys.argv", ["bench_reasoning.py", "--stage3", "--select-every", "0"])
    with pytest.raises(NanoseekError, match="--select-every"):
        bench.main()
