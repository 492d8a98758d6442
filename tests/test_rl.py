import json
import math

import pytest
import torch

from nanoseek.checkpoint import save_pretrained
from nanoseek.config import get_preset
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.tasks import Problem, Reward, Task
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.grpo import (
    IGNORE,
    GRPOConfig,
    RLConfig,
    group_advantages,
    grpo_loss,
    grpo_step,
    k3_kl,
    loss_weights,
    rollout_tensors,
    token_logprobs,
)


class ParityTask(Task):
    """A task whose verifier we control: a completion is "correct" iff it has an even number of characters (before
    the end-of-sentence text), so an untrained model gets mixed rewards within a group."""

    name = "parity"

    def problems(self, split, n, seed=0):
        return [Problem(f"Say something {i}.", "", {}) for i in range(n)]

    def score(self, problem, completion):
        text = completion.split("<｜end▁of▁sentence｜>", 1)[0]
        return Reward(accuracy=float(len(text) % 2 == 0), format=0.0, parsed=text)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["Say something 12.\nHello there, say it again: 0123456789 </think> \\boxed{1}"] * 20
    return train_tokenizer(texts, vocab_size=300, out_dir=tmp_path_factory.mktemp("rl_tok"))


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return Transformer(get_preset("test", vocab_size=vocab_size)).eval()


# ----- advantages ---------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    acc = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                        [0.0, 0.0, 0.0, 0.0],  # all wrong: no signal
                        [1.0, 1.0, 1.0, 1.0],  # all right: no signal
                        [1.0, 0.0, 0.0, 0.0]])
    fmt = torch.tensor([[0.0] * 4, [0.0] * 4, [0.1] * 4, [0.1, 0.1, 0.0, 0.1]])
    adv, keep = group_advantages(acc, fmt)
    assert keep.tolist() == [True, False, False, True]
    std0 = math.sqrt(4 * 0.25 / 3)  # unbiased sample std of [1, 0, 0, 1]
    a = 0.5 / (std0 + 1e-4)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a], abs=1e-6)
    assert adv[1].tolist() == [0.0] * 4 and adv[2].tolist() == [0.0] * 4  # exactly zero, not rounding noise
    std3 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # correctness only is scaled; format 0.1 is added as it is
    dev = [0.75 / (std3 + 1e-4), -0.25 / (std3 + 1e-4), -0.25 / (std3 + 1e-4), -0.25 / (std3 + 1e-4)]
    expected = [d + f - 0.075 for d, f in zip(dev, fmt[3].tolist(), strict=True)]
    assert adv[3].tolist() == pytest.approx(expected, abs=1e-6)
    # Dr. GRPO: no division by the std, r - mean(r) of the total reward
    adv_dr, keep_dr = group_advantages(acc, fmt, scale_std=False)
    assert keep_dr.tolist() == keep.tolist()
    assert adv_dr[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    total = (acc + fmt)[3].tolist()
    assert adv_dr[3].tolist() == pytest.approx([t - sum(total) / 4 for t in total], abs=1e-6)
    with pytest.raises(NanoseekError, match="group"):
        group_advantages(torch.ones(3, 1))


@pytest.mark.parametrize("g", [3, 8, 16, 64])
def test_format_reward_never_outweighs_correctness(g):
    """Issue 21's case: all wrong, one malformed. Summing and then scaling by the std gave it +0.35 / -2.47 at G = 8,
    the advantages of one right answer among wrong ones."""
    acc = torch.zeros(3, g)
    fmt = torch.full((3, g), 0.1)
    fmt[0, 0] = 0.0  # group 0: all wrong, one malformed
    acc[1, 0] = 1.0  # group 1: one right, the rest wrong (all well formed)
    acc[2, 1:] = 1.0  # group 2: one wrong, the rest right
    fmt[2, 1] = 0.0  # ... one right answer malformed
    adv, keep = group_advantages(acc, fmt)
    assert keep.all()
    format_only = adv[0].abs().max()
    assert format_only <= 0.1 + 1e-6
    assert format_only < adv[1].abs().min()  # both sides of right-vs-wrong, the majority's small share included
    assert format_only < adv[2, 2:].min() and format_only < -adv[2, 0]
    assert adv[2, 0] < 0 < adv[2, 1]  # a malformed right answer still beats a well-formed wrong one
    if g == 8:
        assert adv[0].tolist() == pytest.approx([-0.0875] + [0.0125] * 7, abs=1e-6)
        assert adv[1, 0] == pytest.approx(7 / 8 / math.sqrt(1 / 8) + 0.0, abs=1e-3)  # 2.47, unchanged


# ----- the clipped objective ----------------------------------------------------------------------------------------
def clip_case():
    ratio = torch.tensor([[1.5, 0.7, 1.0], [1.3, 0.5, 0.9]], dtype=torch.float64)
    old_logp = torch.log(torch.tensor([[0.2, 0.4, 0.3], [0.5, 0.6, 0.1]], dtype=torch.float64))
    logp = (old_logp + ratio.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    return logp, old_logp, adv, mask


def test_clipped_loss_by_hand():
    logp, old_logp, adv, mask = clip_case()
    w = loss_weights(mask, dr_grpo=False, max_len=3)
    loss, s = grpo_loss(logp, old_logp, adv, w, epsilon=0.2)
    # A=+1: 1.5 -> clipped to 1.2; 0.7 -> unclipped 0.7 (the min keeps the lower, unclipped value); 1.0
    # A=-2: 1.3 -> -2.6 unclipped; 0.5 -> clipped to 0.8 * -2 = -1.6; the masked token does not count
    assert loss.item() == pytest.approx(-(1.2 + 0.7 + 1.0 - 2.6 - 1.6) / 5)
    assert (s["tokens"], s["clip_high"], s["clip_low"]) == (5, 1, 1)
    loss.backward()
    # d loss / d logp = -w * A * ratio where unclipped, exactly 0 where the clip is active or the token is masked
    expected = torch.tensor([[0.0, -0.7, -1.0], [2.6, 0.0, 0.0]], dtype=torch.float64) / 5
    assert torch.allclose(logp.grad, expected)


def test_clip_higher():
    logp, old_logp, adv, mask = clip_case()
    w = loss_weights(mask, dr_grpo=False, max_len=3)
    loss, s = grpo_loss(logp, old_logp, adv, w, epsilon=0.2, epsilon_high=0.6)
    # the upper bound is now 1.6: 1.5 (A>0) is no longer clipped; the lower bound stays 0.8
    assert loss.item() == pytest.approx(-(1.5 + 0.7 + 1.0 - 2.6 - 1.6) / 5)
    assert (s["clip_high"], s["clip_low"]) == (0, 1)


def test_sequence_level_aggregation():
    """--loss-agg seq: the mean over each sequence's tokens, then over sequences (the original GRPO)."""
    logp, old_logp, adv, mask = clip_case()
    w = loss_weights(mask, dr_grpo=False, max_len=3, agg="seq")
    assert w.flatten().tolist() == pytest.approx([1 / 6] * 3 + [1 / 4, 1 / 4, 0.0])
    loss, _ = grpo_loss(logp, old_logp, adv, w, epsilon=0.2)
    assert loss.item() == pytest.approx(-((1.2 + 0.7 + 1.0) / 3 + (-2.6 - 1.6) / 2) / 2)
    # an empty row (a masked truncated completion) counts as no sequence at all
    w = loss_weights(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), dr_grpo=False, max_len=2, agg="seq")
    assert w.tolist() == [[0.5, 0.5], [0.0, 0.0]]
    # a rank's share of the rows with the whole batch's normaliser (total) weighs its tokens as the whole batch does
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    for agg, total in (("seq", 3.0), ("token", 6.0)):
        whole = loss_weights(mask, dr_grpo=False, max_len=3, agg=agg)
        parts = [loss_weights(mask[rows], dr_grpo=False, max_len=3, agg=agg, total=total) for rows in (slice(0, 1),
                                                                                                        slice(1, 4))]
        assert torch.cat(parts).flatten().tolist() == pytest.approx(whole.flatten().tolist())
    with pytest.raises(NanoseekError, match="loss-agg"):
        RLConfig(model=".", task="x", loss_agg="mean").check()
    with pytest.raises(NanoseekError, match="dr-grpo"):
        RLConfig(model=".", task="x", loss_agg="seq", dr_grpo=True).check()


def test_dr_grpo_normaliser():
    logp, old_logp, adv, mask = clip_case()
    w = loss_weights(mask, dr_grpo=True, max_len=10)
    loss, _ = grpo_loss(logp, old_logp, adv, w, epsilon=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.7 + 1.0 - 2.6 - 1.6) / (2 * 10))  # / (sequences * max_len)


def test_k3_kl():
    p, q = 0.2, 0.5
    kl = k3_kl(torch.tensor(math.log(p)), torch.tensor(math.log(q)))
    assert kl.item() == pytest.approx(q / p - math.log(q / p) - 1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (k3_kl(a, b) >= 0).all()
    assert k3_kl(a, a).abs().max().item() == 0.0
    # in the loss: beta * k3 per token, weighted like the policy term
    logp, old_logp, adv, mask = clip_case()
    ref = old_logp + 0.3
    w = loss_weights(mask, dr_grpo=False, max_len=3)
    loss0, _ = grpo_loss(logp, old_logp, adv, w, epsilon=0.2)
    loss1, s = grpo_loss(logp, old_logp, adv, w, epsilon=0.2, beta=0.1, ref_logp=ref)
    kl = k3_kl(logp.detach(), ref)
    assert (loss1 - loss0).item() == pytest.approx(0.1 * (kl * mask).sum().item() / 5)
    assert s["kl"] == pytest.approx((kl * mask).sum().item())


def test_mu1_gradient_is_reinforce():
    torch.manual_seed(0)
    model = tiny_model(64)
    input_ids = torch.randint(7, 64, (3, 10))
    targets = torch.randint(7, 64, (3, 10))
    targets[:, :4] = IGNORE  # prompt positions
    targets[1, 8:] = IGNORE  # padding
    mask = (targets != IGNORE).float()
    adv = torch.tensor([1.5, -0.5, 0.25])

    logp, _ = token_logprobs(model, input_ids, targets)
    loss, s = grpo_loss(logp, logp.detach(), adv, loss_weights(mask, False, 10), epsilon=0.2)
    assert s["clip_low"] == s["clip_high"] == 0 and s["ratio"] == s["tokens"]  # rho == 1 exactly
    loss.backward()
    params = [p for n, p in model.named_parameters() if not n.startswith("mtp.")]  # MTP is not in the forward
    g_grpo = [p.grad.clone() for p in params]
    model.zero_grad()
    logp, _ = token_logprobs(model, input_ids, targets)
    reinforce = -(mask * adv[:, None] * logp).sum() / mask.sum()
    reinforce.backward()
    for g, p in zip(g_grpo, params, strict=True):
        assert torch.allclose(g, p.grad, atol=1e-7, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in g_grpo)


def test_token_logprobs_and_entropy():
    model = tiny_model(64)
    x = torch.randint(0, 64, (2, 6))
    y = torch.randint(0, 64, (2, 6))
    y[0, :2] = IGNORE
    logp, ent = token_logprobs(model, x, y, temperature=0.7)
    ref = torch.log_softmax(model(x).float() / 0.7, -1)
    assert torch.allclose(logp[1], ref[1].gather(-1, y[1, :, None]).squeeze(-1), atol=1e-6)
    assert (logp[0, :2] == 0).all() and (ent[0, :2] == 0).all()  # no head at ignored positions
    assert torch.allclose(logp[0, 2:], ref[0, 2:].gather(-1, y[0, 2:, None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(ent[y != IGNORE], -(ref.exp() * ref).sum(-1)[y != IGNORE], atol=1e-5)
    logp.sum().backward()  # the gradient reaches the head and the blocks through the selected positions
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.embed_tokens.weight.grad.abs().sum() > 0
    assert ((ent >= 0) & (ent <= math.log(64) + 1e-5)).all()


def test_rollout_tensors():
    ids, targets, mask = rollout_tensors([[10, 11, 12], [20]], [[13, 14, 1], [21, 1]], pad_id=2)
    assert ids.tolist() == [[10, 11, 12, 13, 14], [20, 21, 2, 2, 2]]
    assert targets.tolist() == [[IGNORE, IGNORE, 13, 14, 1], [21, 1, IGNORE, IGNORE, IGNORE]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]


# ----- one real step ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu, beta, dr, agg", [(1, 0.0, False, "token"), (2, 0.05, True, "token"),
                                               (1, 0.0, False, "seq")])
def test_grpo_step_end_to_end(tok, mu, beta, dr, agg):
    torch.set_num_threads(1)
    model = tiny_model(tok.vocab_size, seed=1)
    ref = tiny_model(tok.vocab_size, seed=1) if beta else None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = ParityTask()
    cfg = GRPOConfig(group_size=4, prompts_per_step=3, max_new_tokens=6, mu=mu, beta=beta, dr_grpo=dr, micro_batch=5,
                     loss_agg=agg)
    stats = grpo_step(model, opt, tok, task, task.problems("train", 3), cfg, seed=0, ref_model=ref)
    assert stats["trained_seqs"] > 0 and stats["frac_zero_std"] < 1
    assert 0 <= stats["accuracy"] <= 1 and stats["response_len_max"] <= 7
    assert stats["entropy"] > 0 and stats["grad_norm"] > 0 and stats["kl"] >= 0
    assert stats["t_sample"] > 0 and stats["t_train"] > 0 and stats["t_generate"] > 0 and stats["t_engine"] > 0
    assert stats["t_sample"] >= stats["t_engine"] + stats["t_generate"] + stats["t_score"]
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any("layers.0.self_attn" in k for k in changed) and "lm_head.weight" in changed
    if mu == 1:
        assert stats["clip_frac"] == 0.0 and stats["ratio"] == pytest.approx(1.0)


class ConstantTask(ParityTask):
    def score(self, problem, completion):
        return Reward(accuracy=1.0, format=0.1, parsed="")


def test_grpo_step_skips_zero_variance_groups(tok):
    model = tiny_model(tok.vocab_size, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = ConstantTask()
    cfg = GRPOConfig(group_size=3, prompts_per_step=2, max_new_tokens=4)
    stats = grpo_step(model, opt, tok, task, task.problems("train", 2), cfg, seed=0)
    assert stats["frac_zero_std"] == 1.0 and stats["trained_seqs"] == 0 and stats["reward"] == pytest.approx(1.1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no update at all


def test_grpo_step_on_a_task_mix_logs_each_tasks_accuracy(tok):
    from nanoseek.tasks import MixedTask

    torch.set_num_threads(1)
    model = tiny_model(tok.vocab_size, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mix = MixedTask([ParityTask(), ConstantTask()], [1.0, 1.0], ["parity", "const"])
    problems = mix.problems("train", 4, seed=3)
    assert {p.meta["mix_task"] for p in problems} == {0, 1}
    cfg = GRPOConfig(group_size=3, prompts_per_step=4, max_new_tokens=5)
    stats = grpo_step(model, opt, tok, mix, problems, cfg, seed=0)
    assert stats["accuracy_const"] == 1.0 and 0 <= stats["accuracy_parity"] <= 1  # each task's own reward
    n_const = sum(p.meta["mix_task"] == 1 for p in problems)
    assert stats["accuracy"] == pytest.approx((n_const + stats["accuracy_parity"] * (4 - n_const)) / 4)


class HalfConstantTask(ParityTask):
    """Problems whose prompt says "same" always score 1.1 (zero-variance groups); the others score by parity."""

    def problems(self, split, n, seed=0):
        word = "same" if seed == 0 else "parity"
        return [Problem(f"Say something {word} {seed}-{i}.", "", {}) for i in range(n)]

    def score(self, problem, completion):
        if "same" in problem.prompt:
            return Reward(accuracy=1.0, format=0.1, parsed="")
        return super().score(problem, completion)


def test_dynamic_sampling_fills_the_batch_with_mixed_groups(tok):
    torch.set_num_threads(1)
    task = HalfConstantTask()
    calls = []

    def more(round_):
        calls.append(round_)
        return task.problems("train", 3, seed=round_)

    model = tiny_model(tok.vocab_size, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = GRPOConfig(group_size=4, prompts_per_step=3, max_new_tokens=6, dynamic_sampling=True, max_sampling_rounds=4)
    stats = grpo_step(model, opt, tok, task, task.problems("train", 3), cfg, seed=0, more_problems=more)
    # round 0: three all-equal groups; fresh parity problems follow until three mixed groups are found
    assert stats["sampling_rounds"] >= 2 and calls == list(range(1, stats["sampling_rounds"]))
    assert stats["rollouts"] == 4 * 3 * stats["sampling_rounds"]
    assert stats["trained_groups"] == 3 and stats["trained_seqs"] == 12  # exactly B groups, the surplus dropped
    assert stats["frac_zero_std"] >= 3 / (3 * stats["sampling_rounds"])  # over every group sampled
    # the cap: problems that never vary stop after max_sampling_rounds batches, with nothing to train on
    const = ConstantTask()
    stats = grpo_step(model, opt, tok, const, const.problems("train", 2), cfg, seed=0,
                      more_problems=lambda r: const.problems("train", 2, seed=r))
    assert stats["sampling_rounds"] == 4 and stats["rollouts"] == 4 * 2 * 4 and stats["trained_seqs"] == 0
    # off (the default): one batch, the zero-variance groups are only skipped
    cfg = GRPOConfig(group_size=4, prompts_per_step=3, max_new_tokens=6)
    stats = grpo_step(model, opt, tok, task, task.problems("train", 3), cfg, seed=0, more_problems=more)
    assert stats["sampling_rounds"] == 1 and stats["trained_seqs"] == 0 and stats["rollouts"] == 12


PARITY_PLUGIN = '''
from nanoseek.tasks import Problem, Reward, Task


class ParityTask(Task):
    name = "parity"

    def problems(self, split, n, seed=0):
        return [Problem(f"Say something {i}.", "", {}) for i in range(n)]

    def score(self, problem, completion):
        text = completion.split("<｜end▁of▁sentence｜>", 1)[0]
        return Reward(accuracy=float(len(text) % 2 == 0), format=0.0, parsed=text)
'''


def parity_rl_args(tok, tmp_path):
    """A tiny model with tok saved in tmp_path/init, and a function (out, *flags) -> the parsed `nanoseek rl` args of a
    run on the parity plug-in task."""
    import argparse

    from nanoseek.commands import rl

    plugin = tmp_path / "parity.py"
    plugin.write_text(PARITY_PLUGIN)
    tok_dir = tmp_path / "init"
    tok.save(tok_dir)
    save_pretrained(tiny_model(tok.vocab_size), tok_dir, tokenizer_dir=tok_dir)

    def args(out, *extra):
        p = argparse.ArgumentParser()
        rl.add_arguments(p)
        return p.parse_args(["--model", str(tok_dir), "--task", f"{plugin}:ParityTask", "--out", str(out), "-G", "4",
                             "-B", "2", "--max-new-tokens", "6", "--threads", "1", *extra])
    return args


def test_rl_cli_logs_checkpoints_and_resume(tok, tmp_path, capsys):
    import json

    from nanoseek.checkpoint import load_model
    from nanoseek.commands import rl

    rl_args = parity_rl_args(tok, tmp_path)
    tok_dir = tmp_path / "init"
    out = tmp_path / "rl"

    def args(*extra):
        return rl_args(out, "--eval-every", "2", "--eval-n", "3", "--save-every", "1", "--lr", "1e-3", *extra)

    rl.run(args("--steps", "2"))
    rows = [json.loads(line) for line in (out / "rl_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_accuracy", "reward_format", "accuracy", "response_len_mean", "response_len_max",
                "truncated_frac", "kl", "clip_frac", "entropy", "frac_zero_std", "t_sample", "t_train", "t_engine",
                "t_generate", "t_score"):
        assert key in rows[0], key
    assert (out / "rl_curves.png").stat().st_size > 1000 and (out / "run.json").is_file()
    state = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]["heldout"]] == [0, 2]
    assert load_model(out / "final").config == load_model(tok_dir).config
    with pytest.raises(NanoseekError, match="already holds a run"):
        rl.run(args("--steps", "3"))
    capsys.readouterr()
    rl.run(args("--steps", "3", "--resume"))  # a finished 2-step run, made longer
    assert "changed settings" not in capsys.readouterr().out  # constant lr: nothing the shared steps saw changed
    rows = [json.loads(line) for line in (out / "rl_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # ... and it is the 3-step run: the same weights as one run of 3 steps from the start
    longer = load_model(out / "final").state_dict()
    out = tmp_path / "rl_3"  # args() reads `out` when called
    rl.run(args("--steps", "3"))
    for name, value in load_model(out / "final").state_dict().items():
        torch.testing.assert_close(longer[name], value, rtol=0, atol=0, msg=name)
    with pytest.raises(NanoseekError, match="group-size"):
        rl.run(args("-G", "1"))
    out = tmp_path / "rl_dynamic"  # args() reads `out` when called
    rl.run(args("--steps", "1", "--dynamic-sampling", "--max-sampling-rounds", "2"))
    row = json.loads((out / "rl_log.jsonl").read_text().splitlines()[0])
    assert row["sampling_rounds"] in (1, 2) and row["rollouts"] == 8 * row["sampling_rounds"]
    with pytest.raises(NanoseekError, match="max-sampling-rounds"):
        rl.run(args("--max-sampling-rounds", "0"))


def test_rl_log_keeps_the_steps_of_a_killed_run(tok, tmp_path, monkeypatch):
    """With --save-every 0 nothing is checkpointed before the end, but the log has a line for every step done."""
    import json

    from nanoseek.commands import rl
    from nanoseek.train import grpo

    out = tmp_path / "rl"
    args = parity_rl_args(tok, tmp_path)(out, "--eval-every", "0", "--save-every", "0", "--steps", "5")
    real_step, calls = grpo.grpo_step, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's second Ctrl-C, or a killed job
        return real_step(*a, **k)

    monkeypatch.setattr(grpo, "grpo_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        rl.run(args)
    rows = [json.loads(line) for line in (out / "rl_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert not (out / "checkpoints" / "latest").exists()
    monkeypatch.setattr(grpo, "grpo_step", real_step)
    rl.run(args)  # a fresh run in the same directory (nothing to resume) starts a fresh log
    assert [json.loads(line)["step"] for line in (out / "rl_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


class Killed(BaseException):
    """Stands in for kill -9 (not an Exception, so nothing may catch and handle it)."""


def test_rl_killed_or_interrupted_then_resumed_equals_an_uninterrupted_run(tok, tmp_path, monkeypatch, capsys):
    """RL on the shared loop: a run killed between checkpoints, resumed, interrupted by Ctrl-C (which saves the step
    it finishes), resumed again, logs the same rewards and losses and ends with the same weights as one run."""
    import json
    import os
    import signal

    from nanoseek.checkpoint import load_model
    from nanoseek.commands import rl
    from nanoseek.train import grpo

    rl_args = parity_rl_args(tok, tmp_path)
    flags = ("--steps", "5", "--save-every", "2", "--eval-every", "2", "--eval-n", "3", "--lr", "1e-3")

    def rows(out):  # rl_log.jsonl without the step timings
        lines = (out / "rl_log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_")} for line in lines]

    reference = tmp_path / "reference"
    rl.run(rl_args(reference, *flags))

    out = tmp_path / "run"
    real_step, calls = grpo.grpo_step, []

    def killed_in_step_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise Killed
        return real_step(*a, **k)

    monkeypatch.setattr(grpo, "grpo_step", killed_in_step_4)
    with pytest.raises(Killed):
        rl.run(rl_args(out, *flags))
    assert [r["step"] for r in rows(out)] == [1, 2, 3]  # step 3 was logged, not checkpointed
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"

    def ctrl_c_in_step_4(*a, **k):  # the resumed run's second step is step 4
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)

    monkeypatch.setattr(grpo, "grpo_step", ctrl_c_in_step_4)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        rl.run(rl_args(out, *flags, "--resume"))
    assert f"interrupted: saved {out / 'checkpoints' / 'step_000004'}" in capsys.readouterr().out
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004" and not (out / "final").exists()
    assert (out / "rl_curves.png").is_file()

    monkeypatch.setattr(grpo, "grpo_step", real_step)
    rl.run(rl_args(out, *flags, "--resume"))
    assert rows(out) == rows(reference) and [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5]
    state, ref_state = (json.loads((d / "checkpoints" / "step_000005" / "trainer_state.json").read_text())
                        for d in (out, reference))
    assert state["history"]["heldout"] == ref_state["history"]["heldout"]
    assert [h["step"] for h in state["history"]["heldout"]] == [0, 2, 4, 5]
    reference_weights = load_model(reference / "final").state_dict()
    for name, value in load_model(out / "final").state_dict().items():
        torch.testing.assert_close(value, reference_weights[name], rtol=0, atol=0, msg=name)


# ----- the problems of each step -------------------------------------------------------------------------------------
def write_gsm8k(tmp_path, n):
    rows = [{"question": f"What is {i} plus one?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))


def test_gsm8k_problems_are_reshuffled_each_epoch_and_never_run_dry(tmp_path):
    from nanoseek.tasks import load_task
    from nanoseek.train.grpo import step_problems, train_pool

    write_gsm8k(tmp_path, 40)
    task = load_task(f"gsm8k:data_dir={tmp_path}")
    n_train = len(task.problems("train", None))
    pool = train_pool(task, steps=30, b=4, seed=0)  # 120 draws from a smaller split: the whole split, in epochs
    assert pool.finite and len(pool.problems) == n_train
    steps = [step_problems(pool, 4, s, seed=0) for s in range(30)]  # 3+ epochs, and nothing raises
    flat = [p.prompt for ps in steps for p in ps]
    file_order = [p.prompt for p in task.problems("train", None)]
    epochs = [flat[e * n_train:(e + 1) * n_train] for e in range(len(flat) // n_train)]
    assert all(sorted(e) == sorted(file_order) for e in epochs)  # every problem once per epoch
    assert all(e != file_order for e in epochs) and epochs[0] != epochs[1]  # shuffled, freshly each epoch
    other = [p.prompt for s in range(10) for p in step_problems(train_pool(task, 30, 4, seed=1), 4, s, seed=1)]
    assert other != flat[:40]  # the seed changes the order
    assert [p.prompt for p in step_problems(pool, 4, 7, seed=0)] == [p.prompt for p in steps[7]]  # pure
    # a synthetic task: steps x B fresh problems, and a longer run starts with the shorter run's problems
    arith = load_task("arithmetic")
    short, long = train_pool(arith, 3, 4, seed=0), train_pool(arith, 5, 4, seed=0)
    assert not short.finite and len(short.problems) == 12
    assert [step_problems(short, 4, s, 0) for s in range(3)] == [step_problems(long, 4, s, 0) for s in range(3)]
    # GRPO's prompts are not the cold start's: `sft --task T --n N` trains on task.problems("train", N, seed); the
    # pool shares with them only what two independent draws of the 3-digit problems share by chance
    wide = load_task("arithmetic:min_digits=3,max_digits=3")
    sft_keys = {p.prompt for p in wide.problems("train", 2000, seed=0)}
    rl_keys = [p.prompt for p in train_pool(wide, 60, 16, seed=0).problems]
    assert sum(k in sft_keys for k in rl_keys) <= 10  # (was 960: the pool began with the 2,000 SFT problems)


def test_rl_on_an_empty_train_split_is_one_clear_error(tmp_path):
    from nanoseek.tasks import load_task
    from nanoseek.train.grpo import train_pool

    write_gsm8k(tmp_path, 0)
    with pytest.raises(NanoseekError, match="no problems to train on"):
        train_pool(load_task(f"gsm8k:data_dir={tmp_path}"), steps=2, b=2, seed=0)


def test_rl_zero_runs_from_a_base_model_with_the_r1_zero_template(tok, tmp_path, capsys):
    from nanoseek.commands import rl
    from nanoseek.train.rollout import prompt_ids

    p = Problem("What is 2 + 3?\nPlease reason step by step, and put your final answer within \\boxed{}.", "5")
    zero = tok.decode(prompt_ids(tok, p, zero=True))
    assert zero.startswith(tok.decode([tok.bos_id]) + "A conversation between User and Assistant.")
    assert zero.endswith("User: " + p.prompt + "\nAssistant: <think>\n")  # the completion starts inside <think>
    assert "<｜User｜>" not in zero and tok.user_id not in prompt_ids(tok, p, zero=True)  # no chat tokens
    out = tmp_path / "zero"
    args = parity_rl_args(tok, tmp_path)
    torch.manual_seed(0)  # the template is ~320 tokens with this 300-token vocabulary: a longer context
    long = Transformer(get_preset("test", vocab_size=tok.vocab_size, max_position_embeddings=512)).eval()
    save_pretrained(long, tmp_path / "init", tokenizer_dir=tmp_path / "init")
    rl.run(args(out, "--zero", "--steps", "2", "--eval-every", "1", "--eval-n", "2"))
    assert "R1-Zero template" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "rl_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # reward and mean response length, step by step
    assert all(0 <= r["reward"] and r["response_len_mean"] > 0 for r in rows)
    assert json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())["args"]["zero"] is True
