"""MTP speculative decoding, with one draft per step and with k chained drafts: greedy output identical to plain
decoding (batch 1, batch 4, requests joining and leaving), the MTP latent cache equal to a full recompute,
acceptance statistics, speculative sampling's distribution, stop and length limits, errors."""

import pytest
import torch

from nanoseek import NanoseekError, Transformer, get_preset
from nanoseek.checkpoint import save_pretrained
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.speculative import verify
from nanoseek.model import apply_rope

PERIOD = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pattern_batch(pattern: torch.Tensor, n: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    """[n, seq_len + 1] windows of a repeating 24-token pattern in which every 4th token is one of three random
    ones: the rest is predictable, so the MTP head's drafts are right often but not always."""
    off = torch.randint(0, PERIOD, (n,), generator=g)
    x = torch.stack([pattern.repeat(seq_len // PERIOD + 3)[o:o + seq_len + 1] for o in off])
    noise = torch.randint(0, 3, x.shape, generator=g) * 100 + 1 + x % 50
    return torch.where(torch.arange(seq_len + 1) % 4 == 3, noise, x)


@pytest.fixture(scope="module")
def trained():
    """The test preset trained for 60 steps (~3 s) on pattern_batch with L_main + L_MTP: drafts accepted ~80%."""
    torch.manual_seed(0)
    model = Transformer(get_preset("test"))
    g = torch.Generator().manual_seed(1)
    pattern = torch.randperm(500, generator=g)[:PERIOD] + 7
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        x = pattern_batch(pattern, 8, 40, g)
        loss, _ = model.compute_loss(x[:, :-1], x[:, 1:], mtp_lambda=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = pattern_batch(pattern, 6, 30, g)
    prompts = [x[0, :5].tolist(), x[1, :12].tolist(), [3, 9, 100], x[3, :1].tolist(), x[4, :20].tolist(),
               x[5, :7].tolist()]
    return model.eval(), prompts


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return Transformer(get_preset("test", initializer_range=0.1)).eval()


def engine_for(model, **kw):
    return Engine(model, **{"max_batch_size": 4, "max_seq_len": 128, **kw})


def plain(model, prompts, n, **kw):
    return engine_for(model).generate(prompts, n, stop_token_ids=[], **kw)


# --- greedy: identical to plain decoding ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identical_batch1_and_batch4(trained, k):
    model, prompts = trained
    for batch in ([prompts[2]], prompts[:4]):  # prompts[2] is off the pattern: drafts are often wrong
        expected = plain(model, batch, 40)
        engine = engine_for(model, speculative=True, num_speculative_tokens=k)
        assert engine.generate(batch, 40, stop_token_ids=[]) == expected
        s = engine.stats()
        assert s["speculative"] and s["generated_tokens"] == 40 * len(batch)
        assert s["num_speculative_tokens"] == k
        assert 0.4 < s["acceptance_rate"] < 1.0  # both the accept and the reject paths ran
        assert s["accepted_draft_tokens"] == round(s["acceptance_rate"] * s["draft_tokens"])
        if len(batch) == 1:
            assert s["draft_tokens"] == k * s["decode_steps"]  # k drafts verified per step
        assert s["tokens_per_verify_step"] == pytest.approx(1 + k * s["acceptance_rate"])
        assert s["decode_steps"] < (30 if k == 1 else 22)  # vs 39 without speculation


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identical_with_requests_joining_and_leaving(trained, k):
    model, prompts = trained
    engine = engine_for(model, max_batch_size=3, speculative=True, num_speculative_tokens=k)
    plan = {0: [(prompts[0], 6)], 2: [(prompts[3], 25), (prompts[1], 9)], 5: [(prompts[5], 15), (prompts[2], 20)],
            6: [(prompts[4], 31)]}
    reqs = []
    for step in range(200):
        for prompt, n in plan.get(step, []):
            reqs.append(engine.submit(prompt, SamplingParams(n, stop_token_ids=[])))
        engine.step()
        assert [r.slot for r in engine.active] == list(range(len(engine.active)))
        if len(reqs) == 6 and all(r.finished for r in reqs):
            break
    for (prompt, n), r in zip([x for s in sorted(plan) for x in plan[s]], reqs, strict=True):
        assert r.finish_reason == "length"
        assert r.output_ids == plain(model, [prompt], n)[0]
    assert engine.stats()["accepted_draft_tokens"] > 0


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_identical_on_an_untrained_model_and_with_wrong_drafts(random_model, trained, monkeypatch, k):
    prompts = [[(17 * i + 5 * j) % 500 + 7 for j in range(n)] for i, n in enumerate([5, 12, 1, 30])]
    engine = engine_for(random_model, speculative=True, num_speculative_tokens=k)
    assert engine.generate(prompts, 30, stop_token_ids=[]) == plain(random_model, prompts, 30)
    # every draft wrong: each step still emits the main model's token, and rolls the caches back
    model, prompts = trained
    engine = engine_for(model, speculative=True, num_speculative_tokens=k)
    real = engine.speculator.draft

    def wrong(h, logits, lens, reqs, start=0):
        real(h, logits, lens, reqs, start)
        for r in reqs:
            r.drafts = [(d + 1) % model.config.vocab_size for d in r.drafts]

    monkeypatch.setattr(engine.speculator, "draft", wrong)
    assert engine.generate(prompts[:4], 30, stop_token_ids=[]) == plain(model, prompts[:4], 30)
    assert engine.stats()["accepted_draft_tokens"] == 0


def test_compiled_speculative_greedy_identical(trained, monkeypatch):
    """compile=True: the verify forward and the MTP module run as compiled graphs (captured with aot_eager here, no
    C++ code generation; test_engine.py runs inductor itself)."""
    import nanoseek.engine

    monkeypatch.setattr(nanoseek.engine, "COMPILE_BACKEND", "aot_eager")
    model, prompts = trained
    engine = engine_for(model, speculative=True, compile=True)
    assert engine.generate([prompts[2]], 40, stop_token_ids=[]) == plain(model, [prompts[2]], 40)  # off the pattern
    s = engine.stats()
    assert 0.5 < s["acceptance_rate"] < 1.0 and s["compiled_graphs"] == 2  # the verify forward and the MTP module
    eager = engine_for(model, speculative=True)
    eager.generate([prompts[2]], 40, stop_token_ids=[])
    assert eager.stats()["accepted_draft_tokens"] == s["accepted_draft_tokens"]
    # k = 3 chained drafts at batch 1 and 4: one more graph per batch class (the MTP module on one position)
    engine = engine_for(model, speculative=True, num_speculative_tokens=3, compile=True)
    for batch in ([prompts[2]], prompts[:4]):
        assert engine.generate(batch, 30, stop_token_ids=[]) == plain(model, batch, 30)
    assert engine.stats()["compiled_graphs"] == 6


def check_mtp_cache(engine, model, reqs):
    """The MTP module's latent cache of each request holds, at every position i the main model has read, the latent
    of eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]), recomputed here from the whole sequence."""
    cfg, mtp = model.config, model.mtp[0]
    cache = engine.runner.slot_view(engine.mtp_caches[0])  # [slots, rows, c+r] through the block tables
    for r in reqs:
        seq = r.prompt_ids + r.output_ids  # the last output is not read by the main model yet
        n = len(seq) - 1
        assert engine.slot_lengths[r.slot] == n
        with torch.no_grad():
            ids = torch.tensor([seq])
            h = model.hidden_states(ids[:, :-1])
            x = mtp.eh_proj(torch.cat([mtp.enorm(model.embed_tokens(ids[:, 1:])), mtp.hnorm(h)], dim=-1))
            c_kv, k_pe = mtp.self_attn.project_kv_latent(mtp.input_layernorm(x))
            cos, sin = model.rotary(torch.arange(n))
            k_pe = apply_rope(k_pe, cos, sin, cfg.rope_interleave)
        torch.testing.assert_close(cache[r.slot, :n, :cfg.kv_lora_rank], c_kv[0], atol=2e-5, rtol=0)
        torch.testing.assert_close(cache[r.slot, :n, cfg.kv_lora_rank:], k_pe[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_cache_equals_full_recompute(trained, k):
    """After speculative steps (accepted and rejected drafts), the MTP cache equals a full recompute at every
    position the main model has read: the rows the chained drafts wrote with guesses are overwritten once the main
    model has read those positions."""
    model, prompts = trained
    engine = engine_for(model, speculative=True, num_speculative_tokens=k)
    reqs = [engine.submit(p, SamplingParams(30, stop_token_ids=[])) for p in prompts[:3]]
    for _ in range(6):
        engine.step()
    assert engine.stats()["accepted_draft_tokens"] < engine.stats()["draft_tokens"]
    check_mtp_cache(engine, model, reqs)


@pytest.mark.parametrize("k", [1, 3])
def test_prefix_cache_with_speculation(trained, k):
    """Speculation over cached prefixes (a chat whose turns re-send the history): the MTP cache at a cached prefix's
    last position pairs it with the request's own next token, so that position is recomputed into a copy of its
    block. Output, drafts and acceptance equal an engine without the cache; the MTP cache equals a recompute."""
    model, prompts = trained
    engines = [engine_for(model, speculative=True, num_speculative_tokens=k, prefix_cache=c) for c in (False, True)]
    history = prompts[4]
    for _ in range(3):
        outs = [e.generate([history], 16, stop_token_ids=[])[0] for e in engines]
        assert outs[0] == outs[1] == plain(model, [history], 16)[0]
        history = history + outs[0]
    stats = [e.stats() for e in engines]
    # turns of 36 and 52 tokens read 2 and 3 whole blocks, less the last position, recomputed
    assert [s["cached_prompt_tokens"] for s in stats] == [0, 31 + 47]
    assert stats[0]["draft_tokens"] == stats[1]["draft_tokens"] > 0
    assert stats[0]["accepted_draft_tokens"] == stats[1]["accepted_draft_tokens"] > 0
    # the history again, and a prompt that leaves it right after its second block (another token follows there),
    # prefilled in chunks of 5 while another request decodes (each chunk fills the MTP cache too)
    engine = engines[1]
    engine.prefill_chunk = 5
    busy = engine.submit(prompts[0], SamplingParams(40, stop_token_ids=[]))
    engine.step()
    new = [history, history[:32] + [5, 6], prompts[1] + prompts[5]]  # the last one is not cached: 4 chunks
    reqs = [engine.submit(p, SamplingParams(30, stop_token_ids=[])) for p in new]
    steps = engine.stats()["prefill_steps"]
    while not all(r.output_ids for r in reqs):
        engine.step()
    engine.step()
    assert [r.cached_tokens for r in reqs] == [63, 31, 0] and engine.stats()["prefill_steps"] - steps == 6
    check_mtp_cache(engine, model, reqs + [busy])
    while not all(r.finished for r in reqs):
        engine.step()
    assert [r.output_ids for r in reqs] == plain(model, new, 30)


@pytest.mark.parametrize("k", [1, 3])
def test_stop_tokens_and_length_limits(trained, k):
    model, prompts = trained
    full = plain(model, [prompts[1]], 30)[0]
    for i in (9, 10, 11, 12):  # a stop token at any place of an accepted run of drafts
        stop = full[i]
        engine = engine_for(model, speculative=True, num_speculative_tokens=k)
        req = engine.submit(prompts[1], SamplingParams(30, stop_token_ids=[stop]))
        while not req.finished:
            engine.step()
        assert req.output_ids == full[:full.index(stop)] and req.finish_reason == "stop"
    for n in (1, 2, 3, 7):  # max_new_tokens reached in the middle of an accepted run, or right after the prefill
        engine = engine_for(model, speculative=True, num_speculative_tokens=k)
        assert engine.generate([prompts[1]], n, stop_token_ids=[])[0] == full[:n]
    # prompt + output clamped at max_seq_len: the drafts past it go to k - 1 spare cache rows, never beyond
    for extra in (9, 10, 11):
        engine = engine_for(model, max_seq_len=len(prompts[1]) + extra, speculative=True, num_speculative_tokens=k)
        assert engine.generate([prompts[1]], 100, stop_token_ids=[])[0] == full[:extra]
        assert engine.runner.rows == len(prompts[1]) + extra + k - 1


# --- sampling -------------------------------------------------------------------------------------------------------
def test_verify_keeps_the_target_distribution(random_model):
    """The acceptance rule alone: drafts drawn from q, verified against p, give tokens distributed as p, and are
    accepted with probability sum_v min(p_v, q_v)."""
    engine = engine_for(random_model)
    n, vocab = 20000, 6
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15, 0.0])
    q = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.2, 0.2])
    reqs = [engine._request([1], SamplingParams(temperature=1.0, seed=i), None) for i in range(n)]
    drafts = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(0))
    for r in reqs:
        r.draft_probs = [q]
    logits = p.clamp(min=1e-30).log().expand(n, 2, vocab)
    out, accepted = verify(logits, drafts[:, None], reqs)
    accepted = accepted.bool()
    freq = torch.bincount(out[:, 0], minlength=vocab) / n
    assert (freq - p).abs().max() < 0.015 and freq[5] == 0
    assert abs(accepted.float().mean() - torch.minimum(p, q).sum()) < 0.015
    assert (out[accepted, 0] == drafts[accepted]).all()


def test_verify_with_two_chained_drafts(random_model):
    """Two drafts (from q1, q2) against p1, p2: the first emitted token is distributed as p1; given that d1 was
    accepted, the second as p2; d2 is only tested after d1 is accepted, and each test passes with probability
    sum_v min(p_v, q_v)."""
    engine = engine_for(random_model)
    n, vocab = 20000, 6
    p1, q1 = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15, 0.0]), torch.tensor([0.3, 0.1, 0.1, 0.1, 0.2, 0.2])
    p2, q2 = torch.tensor([0.5, 0.0, 0.2, 0.1, 0.1, 0.1]), torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1])
    p3 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5])  # the bonus position
    reqs = [engine._request([1], SamplingParams(temperature=1.0, seed=i), None) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    drafts = torch.stack([torch.multinomial(q, n, replacement=True, generator=g) for q in (q1, q2)], dim=1)
    for r in reqs:
        r.draft_probs = [q1, q2]
    logits = torch.stack([p1, p2, p3]).clamp(min=1e-30).log().expand(n, 3, vocab)
    out, accepted = verify(logits, drafts, reqs)
    assert (torch.bincount(out[:, 0], minlength=vocab) / n - p1).abs().max() < 0.015
    first = accepted >= 1
    assert abs(first.float().mean() - torch.minimum(p1, q1).sum()) < 0.015
    assert (out[first, 0] == drafts[first, 0]).all()
    second = torch.bincount(out[first, 1], minlength=vocab) / first.sum()
    assert (second - p2).abs().max() < 0.03 and second[1] == 0
    assert abs((accepted == 2).sum() / first.sum() - torch.minimum(p2, q2).sum()) < 0.03
    both = accepted == 2
    assert (out[both, :2] == drafts[both]).all() and set(out[both, 2].tolist()) <= {4, 5}  # the bonus draws from p3


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling(trained, k):
    model, prompts = trained
    kw = dict(temperature=0.8, top_p=0.95, seed=7)
    engine = engine_for(model, speculative=True, num_speculative_tokens=k)
    alone = engine.generate([prompts[1]], 30, stop_token_ids=[], **kw)[0]
    assert engine.stats()["acceptance_rate"] > 0.3
    assert engine.generate([prompts[1]], 30, stop_token_ids=[], **kw)[0] == alone  # reproducible
    spec = dict(speculative=True, num_speculative_tokens=k)
    batched = engine_for(model, **spec).generate(prompts[:4], 30, stop_token_ids=[], **kw)
    assert batched[1] == engine_for(model, **spec).generate([prompts[1]], 30, stop_token_ids=[], **kw)[0] == alone
    # top_k=1 makes p and q one-hot: exactly greedy
    assert engine.generate([prompts[1]], 30, stop_token_ids=[], temperature=1.0, top_k=1, seed=0)[0] == \
        plain(model, [prompts[1]], 30)[0]
    # mixed batch: the greedy requests are still exact
    engine = engine_for(model, speculative=True, num_speculative_tokens=k)
    greedy = engine.submit(prompts[0], SamplingParams(25, stop_token_ids=[]))
    sampled = engine.submit(prompts[2], SamplingParams(25, stop_token_ids=[], **kw))
    while not (greedy.finished and sampled.finished):
        engine.step()
    assert greedy.output_ids == plain(model, [prompts[0]], 25)[0] and len(sampled.output_ids) == 25


@pytest.mark.parametrize("k", [0, 9, 1.5, None])
def test_bad_num_speculative_tokens(trained, k):
    with pytest.raises(NanoseekError, match="num_speculative_tokens"):
        engine_for(trained[0], speculative=True, num_speculative_tokens=k)


def test_speculation_needs_an_mtp_module(tmp_path):
    model = Transformer(get_preset("test", num_nextn_predict_layers=0))
    with pytest.raises(NanoseekError, match="MTP"):
        Engine(model, speculative=True)
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(NanoseekError, match="MTP"):
        Engine.from_pretrained(tmp_path / "m", speculative=True)


# --- draft_quant: the MTP module in int8 / int4 -----------------------------------------------------------------------
@pytest.mark.parametrize("native", [None, False])  # the default (native kernels on this CPU) and the PyTorch path
@pytest.mark.parametrize("draft_quant", ["int8", "int4"])
def test_draft_quant_greedy_identical(trained, draft_quant, native):
    """A quantised draft changes which drafts are proposed, never the output: greedy tokens equal plain decoding at
    batch 1 and 4, with k = 1 and 3, and the drafts are still mostly accepted (the module is the same, rounded)."""
    model, prompts = trained
    for k in (1, 3):
        engine = engine_for(model, speculative=True, num_speculative_tokens=k, draft_quant=draft_quant,
                            native=native)
        assert engine.runner.draft_quant == draft_quant and engine.stats()["draft_quant"] == draft_quant
        for batch in ([prompts[2]], prompts[:4]):
            assert engine.generate(batch, 30, stop_token_ids=[]) == plain(model, batch, 30)
        assert 0.4 < engine.stats()["acceptance_rate"] < 1.0


def test_draft_quant_refused_without_speculation_or_with_compile(trained):
    model = trained[0]
    with pytest.raises(NanoseekError, match="draft_quant .*does not speculate"):
        engine_for(model, draft_quant="int8")
    with pytest.raises(NanoseekError, match="compile=True .*draft_quant='int4'"):
        engine_for(model, speculative=True, compile=True, draft_quant="int4")
    with pytest.raises(NanoseekError, match="int3"):
        engine_for(model, speculative=True, draft_quant="int3")
