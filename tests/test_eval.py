import json
import math

import pytest
import torch

from nanoseek.checkpoint import save_pretrained
from nanoseek.config import get_preset
from nanoseek.engine import Engine
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.tasks import Reward, distinct_problems, format_completion, load_task
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.evaluate import (
    EvalConfig,
    bootstrap_interval,
    compute_metrics,
    evaluate,
    evaluate_checkpoint,
    majority_vote,
    mcnemar_test,
    paired_bootstrap,
    paired_comparison,
    pass_at_k,
    vote_key,
    wilson_interval,
)
from nanoseek.train.rollout import sample_completions

TASK = "arithmetic:min_digits=1,max_digits=2,ops=+-"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer trained on task traces, and an untrained test-preset model saved with it."""
    task = load_task(TASK)
    texts = [p.prompt + "\n" + format_completion(*task.solution_trace(p)) for p in task.problems("train", 200)]
    out = tmp_path_factory.mktemp("eval_model")
    tok = train_tokenizer(texts, vocab_size=300, out_dir=out)
    torch.manual_seed(0)
    model = Transformer(get_preset("test", vocab_size=tok.vocab_size)).eval()
    save_pretrained(model, out, tokenizer_dir=out)
    return task, tok, model, out


@pytest.mark.parametrize("n, c, k, expected", [
    (10, 3, 1, 0.3),
    (10, 3, 10, 1.0),
    (10, 0, 5, 0.0),
    (10, 10, 1, 1.0),
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7
    (8, 1, 4, 0.5),
    (100, 7, 20, 1 - math.comb(93, 20) / math.comb(100, 20)),
])
def test_pass_at_k_exact(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


def test_majority_vote():
    # "12" twice (one with spaces) beats "13" once; correctness comes from the winning answer's samples
    assert majority_vote(["12", "13", " 1 2 ", None], [True, False, True, False]) is True
    assert majority_vote(["13", "12", "13", "12", "13"], [False, True, False, True, False]) is False
    assert majority_vote([None, None], [False, False]) is False  # nothing parsed: wrong
    assert majority_vote(["5", "7"], [False, True]) is False  # a tie goes to the answer seen first
    assert majority_vote(["7", "5"], [True, False]) is True
    assert majority_vote([None, "9", None], [False, True, False]) is True  # unparsed samples do not vote


def test_intervals_contain_estimate():
    for s, n in [(0, 50), (50, 50), (7, 20), (1, 1), (123, 500)]:
        lo, hi = wilson_interval(s, n)
        assert 0 <= lo <= s / n <= hi <= 1
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook value
    values = [0.0, 0.25, 1.0, 0.5, 0.75, 0.0, 1.0, 0.125] * 5
    lo, hi = bootstrap_interval(values)
    assert lo < sum(values) / len(values) < hi
    assert bootstrap_interval([0.5] * 10) == pytest.approx((0.5, 0.5))


def r(acc, parsed):
    return Reward(accuracy=float(acc), format=0.1, parsed=parsed)


def test_compute_metrics_by_hand():
    greedy = [r(1, "3"), r(0, "4"), r(0, None), r(1, "9")]
    sampled = [
        [r(1, "3"), r(0, "5"), r(1, "3"), r(0, "5")],  # 2/4; pass@4 = 1; majority: tie 3 vs 5 -> "3" first -> right
        [r(0, "1"), r(0, "1"), r(0, "2"), r(0, None)],  # 0/4; 0; wrong
        [r(0, "8"), r(0, "8"), r(1, "7"), r(0, None)],  # 1/4; 1; majority 8 -> wrong
        [r(1, "9"), r(1, "9"), r(1, "9"), r(1, "9")],  # 4/4; 1; right
    ]
    m = compute_metrics(greedy, sampled, k=4)
    assert m["pass@1_greedy"]["value"] == 0.5 and m["pass@1_greedy"]["ci_method"] == "wilson"
    assert m["pass@1_sampled_mean@4"]["value"] == pytest.approx((0.5 + 0 + 0.25 + 1) / 4)
    assert m["pass@1_sampled_mean@4"]["ci_method"] == "bootstrap"
    assert m["pass@4"]["value"] == pytest.approx(0.75)
    assert m["maj@4"]["value"] == pytest.approx(0.5)
    for key in ("pass@1_greedy", "pass@1_sampled_mean@4", "pass@4", "maj@4"):
        lo, hi = m[key]["ci95"]
        assert lo <= m[key]["value"] <= hi


def test_sample_completions_seeds_and_eos(tiny):
    task, tok, model, _ = tiny
    engine = Engine(model, max_batch_size=8, max_seq_len=128)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True)
    out = sample_completions(engine, tok, [prompt, prompt], n=3, max_new_tokens=12, temperature=1.0, seed=5)
    assert [len(cs) for cs in out] == [3, 3]
    texts = [c.text for cs in out for c in cs]
    assert len(set(texts[:3])) > 1  # samples of one prompt differ (each request has its own seed)
    again = sample_completions(engine, tok, [prompt], n=3, max_new_tokens=12, temperature=1.0, seed=5)
    assert [c.text for c in again[0]] == texts[:3]  # the same call reproduces
    for c in (c for cs in out for c in cs):
        assert c.truncated == (c.ids[-1:] != [tok.eos_id])
        assert len(c.ids) <= 12 + 1
        assert c.text == tok.decode(c.ids)


def test_evaluate_and_cli_json(tiny, tmp_path):
    task, tok, model, model_dir = tiny
    engine = Engine(model, max_batch_size=16, max_seq_len=128)
    problems = task.problems("test", 6)
    result = evaluate(engine, tok, task, problems, k=3, max_new_tokens=8)
    assert result["n"] == 6 and result["k"] == 3
    assert set(result["metrics"]) >= {"pass@1_greedy", "pass@1_sampled_mean@3", "pass@3", "maj@3"}
    assert result["greedy_truncated"] == 1.0  # an untrained model never stops within 8 tokens

    out = tmp_path / "eval.json"
    evaluate_checkpoint(EvalConfig(model=model_dir, task=TASK, n=5, k=2, max_new_tokens=8, temperature=0.6, top_p=0.95,
                                   batch_size=8, seed=0, threads=1, json=out))
    data = json.loads(out.read_text())
    assert data["split"] == "test" and data["n"] == 5 and data["task"] == TASK
    m = data["metrics"]["pass@1_greedy"]
    assert m["value"] == 0.0 and m["ci95"][0] == 0.0 and 0 < m["ci95"][1] < 0.6
    # the validation split, for choosing settings
    evaluate_checkpoint(EvalConfig(model=model_dir, task=TASK, n=5, k=0, max_new_tokens=4, batch_size=8, threads=1,
                                   split="val", json=out))
    assert json.loads(out.read_text())["split"] == "val"


def test_cli_evaluates_each_problem_once(tiny, tmp_path, capsys):
    _, _, _, model_dir = tiny

    # 1-digit additions: 55 problems up to order, about 1 in 10 of them in the test split
    spec = "arithmetic:min_digits=1,max_digits=1,ops=+"
    n_test = len(distinct_problems(load_task(spec), "test", 1000))
    assert 0 < n_test < 20
    out = tmp_path / "eval.json"
    evaluate_checkpoint(EvalConfig(model=model_dir, task=spec, n=50, k=0, max_new_tokens=4, temperature=0.6,
                                   top_p=0.95, batch_size=8, seed=0, threads=1, json=out))
    data = json.loads(out.read_text())
    assert data["n"] == n_test and data["n_requested"] == 50
    assert f"only {n_test} different problems" in capsys.readouterr().err


def test_mcnemar_and_paired_bootstrap_by_hand():
    a = [1.0] * 5 + [0.0] * 10 + [1.0, 0.0]  # 1 problem only a solves, 10 only b solves
    b = [1.0] * 5 + [1.0] * 10 + [0.0, 0.0]
    m = mcnemar_test(a, b)
    assert (m["b_only"], m["a_only"]) == (10, 1)
    assert m["p"] == pytest.approx(2 * (1 + 11) / 2**11)  # 2 P(Bin(11, 1/2) <= 1) = 0.01172
    assert mcnemar_test([1.0, 0.0], [1.0, 0.0])["p"] == 1.0  # no discordant pair: no evidence
    assert mcnemar_test([1.0, 0.0, 1.0], [0.0, 1.0, 1.0])["p"] == 1.0
    boot = paired_bootstrap(a, b)
    assert boot["delta"] == pytest.approx(9 / 17) and boot["ci95"][0] > 0 and boot["p"] < 0.01
    same = paired_bootstrap([0.5, 0.25, 1.0], [0.5, 0.25, 1.0])
    assert same["delta"] == 0.0 and same["p"] == 1.0


def test_eval_json_stores_outcomes_for_paired_comparisons(tiny, tmp_path):
    task, tok, model, model_dir = tiny
    engine = Engine(model, max_batch_size=16, max_seq_len=128)
    problems = task.problems("test", 6)
    result = evaluate(engine, tok, task, problems, k=3, max_new_tokens=8)
    o = result["outcomes"]
    assert o["problem"] == [p.identity for p in problems]
    assert len(o["greedy"]) == len(o["sampled"]) == len(o["maj"]) == 6
    assert sum(o["greedy"]) / 6 == result["metrics"]["pass@1_greedy"]["value"]
    assert sum(o["sampled"]) / 6 == pytest.approx(result["metrics"]["pass@1_sampled_mean@3"]["value"])
    assert sum(o["maj"]) / 6 == result["metrics"]["maj@3"]["value"]
    # a model against itself: no difference; outcomes edited to a clear gain: small p
    cmp = paired_comparison(result, result)
    assert cmp["n"] == 6 and cmp["greedy"]["p"] == 1.0 and cmp["greedy"]["delta"] == 0.0
    better = {**result, "outcomes": {**o, "problem": o["problem"][::-1], "greedy": [1.0] * 6}}
    cmp = paired_comparison(result, better)  # matched by problem, whatever the order
    assert cmp["greedy"]["b_only"] == 6 - sum(o["greedy"]) and cmp["greedy"]["b"] == 1.0
    with pytest.raises(NanoseekError, match="outcomes"):
        paired_comparison({"metrics": {}}, result)
    with pytest.raises(NanoseekError, match="share no problem"):
        paired_comparison(result, {**result, "outcomes": {**o, "problem": ["x"] * 6}})


def test_maj_votes_on_the_verified_value():
    from nanoseek.tasks import Problem

    countdown = load_task("countdown")
    p = Problem("", "3 * 4 + 5", {"numbers": [3, 4, 5, 9], "target": 17}, key="k")
    # two different strings for one right expression outvote a repeated wrong one (the string vote split them)
    texts = ["5 + 4 * 3", "3 * 9", "4 * 3 + 5 = 17", "3 * 9"]
    rs = [countdown.score(p, f"r\n</think>\n\n\\boxed{{{t}}}") for t in texts]
    assert [r.accuracy for r in rs] == [1.0, 0.0, 1.0, 0.0]
    assert rs[0].key == rs[2].key == ("value", "17") and rs[1].key == ("value", "27")
    assert majority_vote([vote_key(r) for r in rs], [r.accuracy > 0 for r in rs]) is True
    assert majority_vote([r.parsed for r in rs], [r.accuracy > 0 for r in rs]) is False  # the old string vote
    # an illegal expression (9 used twice) votes as its text, never with the legal value it computes
    assert countdown.score(p, "r\n</think>\n\n\\boxed{9 + 9 - 1}").key == ("text", "9+9-1")
    arith, gsm = load_task("arithmetic"), load_task("gsm8k")
    q = Problem("", "-1234", {})
    assert arith.answer_key(q, "-1,234") == arith.answer_key(q, "- 1234") == ("int", -1234)
    assert gsm.answer_key(q, "$18.00") == gsm.answer_key(q, "18") != gsm.answer_key(q, "18 dollars")
    m = compute_metrics(None, [rs], 4)
    assert m["maj@4"]["value"] == 1.0


def test_eval_compare_cli(tmp_path, capsys):
    from nanoseek.cli import main

    def result(greedy):
        return {"outcomes": {"problem": [f"q{i}" for i in range(12)], "greedy": greedy}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result([0.0] * 12)))
    b.write_text(json.dumps(result([1.0] * 10 + [0.0] * 2)))
    main(["eval", "--compare", str(a), str(b)])
    out = capsys.readouterr().out
    assert "paired on 12 problems" in out and "0.000 -> 0.833  +0.833  p = 0.00195 (McNemar exact; b only 10" in out
    (tmp_path / "old.json").write_text(json.dumps({"metrics": {}}))
    for argv, message in ((["eval", "--compare", str(a), str(tmp_path / "old.json")], "per-problem outcomes"),
                          (["eval", "--model", str(tmp_path)], "--model and --task")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_commands_decode_natively_by_default(tiny, tmp_path, monkeypatch, capsys):
    """generate, chat, serve, eval and sample build their engines with the default decode path (native=None: the
    native kernels wherever this CPU runs them, else PyTorch) and each names it; serve stops before listening."""
    import io
    import sys

    import uvicorn

    from nanoseek.cli import main
    from nanoseek.kernels import library

    _, _, model, model_dir = tiny
    expected = Engine(model).stats()["decode_path"]
    assert expected.startswith("native") == (library() is not None)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("1+2?\n"))
    m, few = ["--model", str(model_dir)], ["--max-new-tokens", "2", "--threads", "1"]
    for argv in (["generate", *m, "--prompt", "1+2", *few], ["chat", *m, "--max-tokens", "2"],
                 ["serve", *m, "--port", "0"], ["eval", *m, "--task", TASK, "-n", "1", "--k", "0", *few],
                 ["sample", *m, "--task", TASK, "-n", "1", "-k", "1", "--out", str(tmp_path / "s.jsonl"), *few]):
        main(argv)
        out, err = capsys.readouterr()
        assert expected in out + err, argv[0]
