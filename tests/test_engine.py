"""The inference engine: token-identical to transformers, absorbed-MLA logits equal to full recompute, latent cache
size, continuous batching (join, leave, cancel), per-request seeded sampling, errors, and the `generate` CLI."""

import argparse
import copy
import threading

import pytest
import torch

from nanoseek import NanoseekError, Transformer, get_preset, load_model
from nanoseek.checkpoint import save_pretrained
from nanoseek.engine import Engine, SamplingParams

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# prompts of different lengths for the batch tests (token ids < the test vocab of 512)
PROMPTS = [[(17 * i + 5 * j) % 500 + 7 for j in range(n)] for i, n in enumerate([5, 12, 1, 30, 8, 19, 3, 25])]
N_NEW = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random test-preset checkpoint with perturbed norms and a non-zero routing bias (routing is non-trivial)."""
    torch.manual_seed(0)
    model = Transformer(get_preset("test", initializer_range=0.1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for gate in model.gates():
            gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.5)
    path = tmp_path_factory.mktemp("engine") / "model"
    save_pretrained(model, path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def hf_greedy(model_dir):
    """transformers' greedy continuation of each prompt, one prompt at a time."""
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # never stop early
    out = []
    for p in PROMPTS:
        ids = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=N_NEW, pad_token_id=0)
        assert ids.shape[1] == len(p) + N_NEW
        out.append(ids[0, len(p):].tolist())
    return out


def engine_for(model, **kw):
    return Engine(model, **{"max_batch_size": 8, "max_seq_len": 128, **kw})


def alone(model, prompt, **kw):
    return engine_for(model).generate([prompt], **{"max_new_tokens": 20, "stop_token_ids": [], **kw})[0]


# --- exactness --------------------------------------------------------------------------------------------------------
def test_greedy_matches_transformers_batch1(model, hf_greedy):
    assert engine_for(model).generate([PROMPTS[0]], N_NEW, stop_token_ids=[]) == [hf_greedy[0]]


# native=None: the default decode path (native kernels); False: the PyTorch decode, the reference, whose MoE paths
# (grouped or the per-expert loop that quantised weights take) only it runs
@pytest.mark.parametrize("prefill_mode, grouped, native", [("naive", True, None), ("naive", True, False),
                                                           ("absorbed", True, False), ("naive", False, False)])
def test_greedy_matches_transformers_batch8(model, hf_greedy, prefill_mode, grouped, native):
    engine = engine_for(model, prefill_mode=prefill_mode, native=native)
    moe_layers = [lw for lw in engine.layers if lw.moe]
    for lw in moe_layers:
        lw.grouped = lw.grouped and grouped  # False: the per-expert loop (the path quantised weights will take)
    assert not grouped or all(lw.grouped for lw in moe_layers)
    assert engine.generate(PROMPTS, N_NEW, stop_token_ids=[]) == hf_greedy
    stats = engine.stats()
    assert stats["requests"] == 8 and stats["generated_tokens"] == 8 * N_NEW and stats["active_slots"] == 0
    assert stats["prompt_tokens"] == sum(map(len, PROMPTS)) and stats["decode_steps"] == N_NEW - 1


@pytest.mark.parametrize("grouped", [True, False])
def test_decode_step_on_an_accelerator_reads_nothing_back_to_the_host(grouped):
    """On CUDA a decode step's layers queue their kernels without waiting for the GPU: no .tolist() / .item() per
    layer, the MoE through grouped_mm (bf16 on H100-class GPUs) or, without it, each pair's expert weights
    gathered. `meta` tensors stand in for the device (any read of a value to the host fails on them)."""
    from nanoseek.engine.forward import ModelRunner

    with torch.device("meta"):
        model = Transformer(get_preset("test")).to(torch.bfloat16)
    runner = ModelRunner(model, max_batch_size=4, max_seq_len=64)
    for lw in runner.layers:
        lw.grouped = lw.moe and grouped
    runner.set_lengths(0, [5, 9, 2])
    logits = runner.decode(torch.tensor([3, 4, 5], device="meta"))
    assert logits.shape == (3, 512) and logits.device.type == "meta" and runner.slot_lengths[:3] == [6, 10, 3]
    if grouped:  # a prefill too, through grouped_mm
        assert runner.prefill([[1, 2, 3], [4, 5]], start=1).shape == (2, 512)


@pytest.mark.parametrize("prefill_mode, native", [("naive", None), ("naive", False), ("absorbed", False)])
def test_logits_equal_full_recompute(model, prefill_mode, native):
    """Absorbed decode over the latent cache (slots of different lengths) == model(ids) on the whole sequence, on
    the native and the PyTorch decode paths (fp32: within 1e-4, summation order)."""
    engine = engine_for(model, prefill_mode=prefill_mode, native=native)
    seqs = [list(p) for p in PROMPTS[:5]]
    logits = engine.prefill(seqs)
    for step in range(6):
        with torch.no_grad():
            ref = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
        assert (logits - ref).abs().max().item() < 1e-4, step
        tokens = torch.tensor([(7 * step + 3 * i) % 512 for i in range(len(seqs))])  # any tokens, not just argmax
        for s, t in zip(seqs, tokens.tolist(), strict=True):
            s.append(t)
        logits = engine.decode(tokens)
    assert engine.slot_lengths[:5] == [len(s) for s in seqs]
    # several tokens per slot at once (as speculative verification needs): causal within them, logits at each
    block = torch.tensor([[(11 * i + j) % 512 for j in range(3)] for i in range(len(seqs))])
    with torch.inference_mode():
        logits = engine.logits(engine.forward(block))  # [5, 3, V]
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = model(torch.tensor([s + block[i].tolist()]))[0, -3:]
        assert (logits[i] - ref).abs().max().item() < 1e-4


def test_bfloat16_engine_tracks_fp32(model):
    """bf16 weights and cache (fp32 router and softmax): logits within bf16 rounding of the fp32 model."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for gate in bf16.gates():
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    engine = engine_for(bf16)
    assert engine.caches[0].dtype == torch.bfloat16
    seqs = [list(p) for p in PROMPTS[:4]]
    logits = engine.prefill(seqs)
    for _ in range(3):
        with torch.no_grad():
            ref = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
        assert logits.dtype == torch.float32 and (logits - ref).abs().max().item() < 0.1  # logits' std is ~0.8
        tokens = logits.argmax(-1)
        for s, t in zip(seqs, tokens.tolist(), strict=True):
            s.append(t)
        logits = engine.decode(tokens)


def test_latent_cache_holds_normalised_latent_and_roped_key(model):
    """kv_cache = kv_a_layernorm(c_kv) and pe_cache = RoPE(k_pe), as model.MLA computes them."""
    engine = engine_for(model)
    prompt = PROMPTS[3]
    engine.prefill([prompt])
    attn = model.layers[0].self_attn
    with torch.no_grad():
        x = model.layers[0].input_layernorm(model.embed_tokens(torch.tensor([prompt])))
        c_kv, k_pe = attn.project_kv_latent(x)
        cos, sin = model.rotary(torch.arange(len(prompt)))
        from nanoseek.model import apply_rope
        k_pe = apply_rope(k_pe, cos, sin, model.config.rope_interleave)
    torch.testing.assert_close(engine.kv_cache(0)[0, :len(prompt)], c_kv[0])
    torch.testing.assert_close(engine.pe_cache(0)[0, :len(prompt)], k_pe[0])


def test_kv_cache_bytes_per_token(model):
    cfg = model.config
    for m, nbytes in [(model, 4), (copy.deepcopy(model).to(torch.bfloat16), 2)]:
        engine = Engine(m, max_batch_size=3, max_seq_len=64)
        stats = engine.stats()
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        assert stats["kv_cache_bytes_per_token"] == latent * cfg.num_hidden_layers * nbytes
        assert stats["kv_cache_bytes_per_token"] == (16 + 8) * 2 * nbytes
        assert stats["mha_equivalent_bytes_per_token"] == 2 * (24 + 16) * 2 * nbytes  # H (qk + v) layers bytes
        assert stats["mtp_kv_cache_bytes_per_token"] == (16 + 8) * cfg.num_nextn_predict_layers * nbytes
        per_token = (stats["kv_cache_bytes_per_token"] + stats["mtp_kv_cache_bytes_per_token"])
        # the buffers really are that size: 3 slots of 64 positions, and the null block of 16
        assert stats["kv_cache_bytes_allocated"] == per_token * (3 * 64 + 16)


# --- sampling ---------------------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_in_any_batch(model):
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    a = alone(model, PROMPTS[1], **kw)
    assert a == alone(model, PROMPTS[1], **kw)
    batched = engine_for(model).generate([PROMPTS[0], PROMPTS[1], PROMPTS[4]], 20, stop_token_ids=[], **kw)
    assert batched[1] == a
    assert alone(model, PROMPTS[1], temperature=0.9, top_p=0.95, seed=99) != a
    # with other requests running alongside, at other temperatures and seeds
    engine = engine_for(model)
    others = [engine.submit(p, SamplingParams(20, 1.3, 1.0, 5, [], seed=i)) for i, p in enumerate(PROMPTS[2:6])]
    req = engine.submit(PROMPTS[1], SamplingParams(20, stop_token_ids=[], **kw))
    while not req.finished or not all(o.finished for o in others):
        engine.step()
    assert req.output_ids == a


def test_uncut_sampling_draws_from_the_softmax_without_sorting(model):
    """Rows without top-k / top-p (GRPO's rollouts) take the inverse CDF of the softmax in vocabulary order: the
    token is the first whose cumulative probability exceeds the request's uniform draw, and it is reproducible in
    any batch, next to rows that are cut (and sorted)."""
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([PROMPTS[3]]))[0, -1].float() / 1.3, -1)
    for seed in range(5):
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
        expected = int((probs.cumsum(0) <= u * probs.sum()).sum())
        engine = engine_for(model)
        cut = engine.submit(PROMPTS[0], SamplingParams(3, 0.9, 0.95, 0, [], seed=1))
        req = engine.submit(PROMPTS[3], SamplingParams(1, 1.3, 1.0, 0, [], seed=seed))
        while not (req.finished and cut.finished):
            engine.step()
        assert req.output_ids == [expected]
    kw = dict(temperature=1.0, seed=5)
    assert alone(model, PROMPTS[1], **kw) == engine_for(model).generate(
        [PROMPTS[0], PROMPTS[1]], 20, stop_token_ids=[], **kw)[1]


def test_top_k1_and_tiny_top_p_equal_greedy(model):
    greedy = alone(model, PROMPTS[3])
    assert alone(model, PROMPTS[3], temperature=1.5, top_k=1, seed=0) == greedy
    assert alone(model, PROMPTS[3], temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_top_k_and_top_p_restrict_the_choice(model):
    engine = engine_for(model)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([PROMPTS[3]]))[0, -1] / 2.0, -1)
    top3 = set(probs.topk(3).indices.tolist())
    ranked = probs.sort(descending=True)
    nucleus = set(ranked.indices[:int((ranked.values.cumsum(0) < 0.3).sum()) + 1].tolist())
    firsts_k = {engine.generate([PROMPTS[3]], 1, temperature=2.0, top_k=3, seed=s)[0][0] for s in range(60)}
    firsts_p = {engine.generate([PROMPTS[3]], 1, temperature=2.0, top_p=0.3, seed=s)[0][0] for s in range(60)}
    assert firsts_k == top3  # 60 draws at temperature 2 reach all three
    assert firsts_p <= nucleus and len(firsts_p) >= 1


def test_tiny_temperatures_are_greedy(model):
    greedy = alone(model, PROMPTS[3])
    for t in (1e-50, 1e-6):
        assert alone(model, PROMPTS[3], temperature=t, seed=0) == greedy
        assert engine_for(model).submit(PROMPTS[3], SamplingParams(temperature=t)).generator is None
    assert engine_for(model).submit(PROMPTS[3], SamplingParams(temperature=1e-5)).generator is not None


# --- penalties, logit_bias, logprobs ----------------------------------------------------------------------------------
def run_events(engine, prompt, params):
    """Step until the request ends; its token events (the ones that carry a token)."""
    events = []
    req = engine.submit(prompt, params, on_event=events.append)
    while not req.finished:
        engine.step()
    return req, [e for e in events if e.token_id is not None]


def reference(model, prompt, n, process=lambda logits, out: logits):
    """Greedy decoding by full recompute through the model, with `process(logits [V], output so far)` applied."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = process(model(torch.tensor([prompt + out]))[0, -1].float(), out)
            out.append(int(logits.argmax()))
    return out


def test_penalties_follow_openai_semantics(model):
    def penalised(logits, out, freq=1.5, pres=0.7):
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        return logits - freq * counts - pres * (counts > 0)

    plain = alone(model, PROMPTS[2], max_new_tokens=24)
    got = alone(model, PROMPTS[2], max_new_tokens=24)  # through generate(): no processors
    assert got == plain == reference(model, PROMPTS[2], 24)
    req, _ = run_events(engine_for(model), PROMPTS[2], SamplingParams(24, stop_token_ids=[], frequency_penalty=1.5,
                                                                      presence_penalty=0.7))
    assert req.output_ids == reference(model, PROMPTS[2], 24, penalised) != plain
    assert len(set(req.output_ids)) > len(set(plain))  # the penalties push towards unseen tokens
    # negative penalties reward repetition
    req, _ = run_events(engine_for(model), PROMPTS[2], SamplingParams(24, stop_token_ids=[], frequency_penalty=-2))
    assert req.output_ids == reference(model, PROMPTS[2], 24, lambda x, o: penalised(x, o, -2.0, 0.0))


def test_logit_bias(model):
    plain = alone(model, PROMPTS[4], max_new_tokens=8)
    req, _ = run_events(engine_for(model), PROMPTS[4], SamplingParams(8, stop_token_ids=[], logit_bias={42: 100}))
    assert req.output_ids == [42] * 8
    banned = {t: -100 for t in set(plain)}
    req, _ = run_events(engine_for(model), PROMPTS[4], SamplingParams(8, stop_token_ids=[], logit_bias=banned))
    assert not set(req.output_ids) & set(plain)
    bias = {plain[0]: -3.5, 7: 2.25}

    def biased(logits, out):
        return logits + torch.zeros_like(logits).index_put_((torch.tensor(list(bias)),), torch.tensor(
            list(bias.values())))

    req, _ = run_events(engine_for(model), PROMPTS[4], SamplingParams(8, stop_token_ids=[], logit_bias=bias))
    assert req.output_ids == reference(model, PROMPTS[4], 8, biased)


def test_logprobs_greedy_are_the_processed_softmax(model):
    bias = {11: 1.0}
    req, events = run_events(engine_for(model), PROMPTS[1], SamplingParams(6, stop_token_ids=[], logprobs=5,
                                                                           logit_bias=bias))
    out = req.output_ids
    with torch.no_grad():
        for j, ev in enumerate(events):
            logits = model(torch.tensor([PROMPTS[1] + out[:j]]))[0, -1].float()
            logits[11] += 1.0
            logp = torch.log_softmax(logits, -1)
            assert ev.token_id == out[j] == int(logp.argmax())
            assert ev.logprob == pytest.approx(logp[out[j]].item(), abs=1e-4)
            assert [t for t, _ in ev.top_logprobs] == logp.topk(5).indices.tolist()
            assert [v for _, v in ev.top_logprobs] == pytest.approx(logp.topk(5).values.tolist(), abs=1e-4)
    _, events = run_events(engine_for(model), PROMPTS[1], SamplingParams(3, stop_token_ids=[], logprobs=0))
    assert all(e.top_logprobs == [] and e.logprob <= 0 for e in events)
    _, events = run_events(engine_for(model), PROMPTS[1], SamplingParams(3, stop_token_ids=[]))
    assert all(e.logprob is None and e.top_logprobs is None for e in events)


def test_logprobs_sampled_are_the_filtered_distribution(model):
    """temperature 2 and top_k 3: the token's log-probability is under the renormalised top-3 softmax(logits / 2)."""
    req, events = run_events(engine_for(model), PROMPTS[3], SamplingParams(1, temperature=2.0, top_k=3, seed=5,
                                                                           logprobs=20))
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[3]]))[0, -1].float() / 2.0
    top3 = logits.topk(3)
    logp = torch.log_softmax(top3.values, -1)
    (ev,) = events
    assert [t for t, _ in ev.top_logprobs] == top3.indices.tolist()  # only the 3 tokens that could be drawn
    assert [v for _, v in ev.top_logprobs] == pytest.approx(logp.tolist(), abs=1e-4)
    assert ev.logprob == pytest.approx(dict(ev.top_logprobs)[ev.token_id], abs=1e-6)


def test_processors_are_reproducible_in_any_batch(model):
    """A seeded request with penalties, logit_bias and logprobs gives the same tokens and log-probabilities alone
    and beside other requests (with and without processors of their own)."""
    params = lambda: SamplingParams(16, temperature=0.9, top_p=0.95, stop_token_ids=[], seed=7, presence_penalty=0.5,
                                    frequency_penalty=0.3, logit_bias={9: 3.0, 10: -5.0}, logprobs=3)
    req, events = run_events(engine_for(model), PROMPTS[1], params())
    engine = engine_for(model)
    others = [engine.submit(PROMPTS[0], SamplingParams(20, 1.3, 1.0, 5, [], seed=1)),
              engine.submit(PROMPTS[2], SamplingParams(12, stop_token_ids=[], frequency_penalty=2.0, logprobs=2)),
              engine.submit(PROMPTS[4], SamplingParams(9, temperature=0.7, stop_token_ids=[], seed=3,
                                                       logit_bias={5: 50}))]
    engine.step()
    batched, events_b = run_events(engine, PROMPTS[1], params())
    assert batched.output_ids == req.output_ids
    assert [(e.token_id, e.top_logprobs and [t for t, _ in e.top_logprobs]) for e in events_b] == [
        (e.token_id, [t for t, _ in e.top_logprobs]) for e in events]
    assert [e.logprob for e in events_b] == pytest.approx([e.logprob for e in events], abs=1e-5)
    while not all(o.finished for o in others):
        engine.step()
    assert others[2].output_ids == [5] * 9


def test_speculative_engine_refuses_processors(model):
    engine = engine_for(model, speculative=True)
    for kw, name in [(dict(presence_penalty=0.5), "presence_penalty"), (dict(logit_bias={1: 1}), "logit_bias"),
                     (dict(logprobs=1), "logprobs"), (dict(frequency_penalty=-1), "frequency_penalty")]:
        with pytest.raises(NanoseekError, match=f"{name} is not supported with speculative decoding"):
            engine.submit(PROMPTS[0], SamplingParams(**kw))
    assert engine.generate([PROMPTS[0]], 5, stop_token_ids=[]) == [alone(model, PROMPTS[0], max_new_tokens=5)]


# --- continuous batching --------------------------------------------------------------------------------------------
def test_requests_joining_and_leaving_match_running_alone(model):
    engine = engine_for(model, max_batch_size=3)
    plan = {0: [(PROMPTS[0], 6)], 2: [(PROMPTS[3], 25), (PROMPTS[1], 9)], 5: [(PROMPTS[5], 15), (PROMPTS[2], 20)]}
    reqs = []
    for step in range(200):
        for prompt, n in plan.get(step, []):
            reqs.append(engine.submit(prompt, SamplingParams(n, stop_token_ids=[])))
        engine.step()
        assert engine.stats()["active_slots"] <= 3
        assert [r.slot for r in engine.active] == list(range(len(engine.active)))  # slots stay compact
        if len(reqs) == 5 and all(r.finished for r in reqs):
            break
    assert engine.stats()["active_slots"] == 0
    for (prompt, n), r in zip([x for s in sorted(plan) for x in plan[s]], reqs, strict=True):
        assert r.finish_reason == "length"
        assert r.output_ids == alone(model, prompt, max_new_tokens=n)


def test_cancel_frees_the_slot(model):
    engine = engine_for(model, max_batch_size=2)
    a = engine.submit(PROMPTS[0], SamplingParams(50, stop_token_ids=[]))
    b = engine.submit(PROMPTS[1], SamplingParams(30, stop_token_ids=[]))
    c = engine.submit(PROMPTS[2], SamplingParams(10, stop_token_ids=[]))
    engine.step()
    assert engine.stats()["active_slots"] == 2 and engine.stats()["waiting"] == 1 and c.slot is None
    a.cancel()
    engine.step()
    assert a.finish_reason == "cancelled" and a.slot is None and a.done.is_set()
    assert c.slot is not None  # admitted into the freed slot in the same step
    waiting = engine.submit(PROMPTS[4], SamplingParams(10))
    waiting.cancel()  # cancelled before it ever got a slot
    while engine.active or engine.stats()["waiting"]:
        engine.step()
    assert waiting.finish_reason == "cancelled" and waiting.output_ids == []
    assert b.output_ids == alone(model, PROMPTS[1], max_new_tokens=30)
    assert c.output_ids == alone(model, PROMPTS[2], max_new_tokens=10)


def test_stop_tokens_and_length_limit(model):
    full = alone(model, PROMPTS[3], max_new_tokens=30)
    stop = full[10]
    engine = engine_for(model)
    req = engine.submit(PROMPTS[3], SamplingParams(30, stop_token_ids=[stop]))
    while not req.finished:
        engine.step()
    assert req.output_ids == full[:full.index(stop)] and req.finish_reason == "stop"  # the stop token is not emitted
    default = engine.submit(PROMPTS[3], SamplingParams(30))
    assert default.stop_ids == {model.config.eos_token_id}
    # prompt + output is clamped at max_seq_len
    engine = engine_for(model, max_seq_len=40)
    req = engine.submit(PROMPTS[3], SamplingParams(100, stop_token_ids=[]))
    while not req.finished:
        engine.step()
    assert len(req.output_ids) == 40 - len(PROMPTS[3]) and req.finish_reason == "length"
    assert req.output_ids == full[:10]


def test_stream_and_background_thread(model):
    expected = alone(model, PROMPTS[5])
    engine = engine_for(model)
    assert list(engine.stream(PROMPTS[5], SamplingParams(20, stop_token_ids=[]))) == expected
    gen = engine.stream(PROMPTS[5], SamplingParams(20, stop_token_ids=[]))
    assert [next(gen) for _ in range(3)] == expected[:3]
    gen.close()  # closing early cancels the request
    engine.step()
    assert engine.stats()["active_slots"] == 0

    assert not engine.running
    engine.start()
    try:
        assert engine.running
        seen, done = [], threading.Event()
        req = engine.submit(PROMPTS[5], SamplingParams(20, stop_token_ids=[]),
                            on_event=lambda ev: (seen.append(ev.token_id), ev.finish_reason and done.set()))
        assert req.wait(timeout=60) == expected and done.wait(timeout=60)
        assert [t for t in seen if t is not None] == expected
        assert engine.generate([PROMPTS[5], PROMPTS[0]], 20, stop_token_ids=[])[0] == expected
        assert list(engine.stream(PROMPTS[5], SamplingParams(20, stop_token_ids=[]))) == expected
    finally:
        engine.stop()
    assert not engine.running


# --- errors -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty"),
    (list(range(64)), SamplingParams(), "max_seq_len"),
    ([1, 512], SamplingParams(), "vocabulary"),
    ([-1], SamplingParams(), "vocabulary"),
    ([1, "a"], SamplingParams(), "vocabulary"),
    ([1], SamplingParams(temperature=-0.1), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_p=1.5), "top_p"),
    ([1], SamplingParams(top_k=-1), "top_k"),
    ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1], SamplingParams(presence_penalty=2.5), "presence_penalty"),
    ([1], SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
    ([1], SamplingParams(logit_bias={3: 101}), "logit_bias"),
    ([1], SamplingParams(logit_bias={"3": 1}), "logit_bias"),
    ([1], SamplingParams(logit_bias={512: 1}), "logit_bias token id 512 is not in the vocabulary"),
    ([1], SamplingParams(logit_bias=[(3, 1)]), "logit_bias"),
    ([1], SamplingParams(logprobs=21), "logprobs"),
    ([1], SamplingParams(logprobs=True), "logprobs"),
])
def test_bad_requests_raise_and_the_engine_keeps_serving(model, prompt, params, match):
    engine = engine_for(model, max_seq_len=64)
    ok = engine.submit(PROMPTS[0], SamplingParams(10, stop_token_ids=[]))
    engine.step()
    with pytest.raises(NanoseekError, match=match):
        engine.submit(prompt, params)
    with pytest.raises(NanoseekError, match=match):
        engine.generate([PROMPTS[1], prompt], **vars(params))
    assert engine.stats()["waiting"] == 0  # generate() queued nothing
    while not ok.finished:
        engine.step()
    assert ok.output_ids == alone(model, PROMPTS[0], max_new_tokens=10)
    assert engine.generate([PROMPTS[1]], 5, stop_token_ids=[]) == [alone(model, PROMPTS[1], max_new_tokens=5)]


def test_a_failing_step_ends_its_requests_and_the_engine_keeps_serving(model, monkeypatch):
    engine = engine_for(model)
    real, fail = engine.runner.decode, {"at": 3, "calls": 0}  # the decode step, native or PyTorch

    def flaky(*args, **kwargs):
        fail["calls"] += 1
        if fail["calls"] == fail["at"]:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "decode", flaky)
    expected = alone(model, PROMPTS[0], max_new_tokens=5)
    # stepping by hand: the exception propagates, the requests in flight end with "error"
    reqs = [engine.submit(p, SamplingParams(20, stop_token_ids=[])) for p in PROMPTS[:2]]
    with pytest.raises(RuntimeError, match="boom"):
        while True:
            engine.step()
    assert [r.finish_reason for r in reqs] == ["error", "error"] and all(r.done.is_set() for r in reqs)
    assert engine.stats()["active_slots"] == 0 and "boom" in engine.last_error
    assert engine.generate([PROMPTS[0]], 5, stop_token_ids=[]) == [expected]
    # the background loop survives; a stream caught by the failure raises NanoseekError
    fail["at"] = fail["calls"] + 2
    engine.start()
    try:
        with pytest.raises(NanoseekError, match="boom"):
            list(engine.stream(PROMPTS[1], SamplingParams(20, stop_token_ids=[])))
        assert engine.generate([PROMPTS[0]], 5, stop_token_ids=[]) == [expected]
    finally:
        engine.stop()


def test_bad_engine_arguments(model, model_dir):
    with pytest.raises(NanoseekError, match="quant"):
        Engine.from_pretrained(model_dir, quant="int3")
    with pytest.raises(NanoseekError, match="max_seq_len"):
        Engine(model, max_seq_len=10_000)
    with pytest.raises(NanoseekError, match="max_batch_size"):
        Engine(model, max_batch_size=0)
    with pytest.raises(NanoseekError, match="compile"):
        Engine(model, quant="int8", compile=True)
    engine = Engine.from_pretrained(model_dir, max_batch_size=2)
    assert engine.max_seq_len == min(model.config.max_position_embeddings, 4096)
    assert engine.generate([PROMPTS[0]], 8, stop_token_ids=[]) == [alone(model, PROMPTS[0], max_new_tokens=8)]


# --- compile=True: the static-shape decode graph --------------------------------------------------------------------
@pytest.fixture
def aot_eager(monkeypatch):
    """The compiled path's graph capture without inductor's C++ code generation (seconds instead of a minute a
    graph); test_compiled_decode_inductor runs the real backend once."""
    import nanoseek.engine

    monkeypatch.setattr(nanoseek.engine, "COMPILE_BACKEND", "aot_eager")


def test_compiled_decode_matches_transformers(model, hf_greedy, aot_eager):
    engine = engine_for(model, compile=True)
    assert engine.generate([PROMPTS[0]], N_NEW, stop_token_ids=[]) == [hf_greedy[0]]
    assert engine.generate(PROMPTS, N_NEW, stop_token_ids=[]) == hf_greedy
    assert engine.stats()["compiled_graphs"] == 2  # batch 1, and batch >= 2 (dynamic)
    # requests leaving: 3 slots, then 2, then 1, each row at its own length: no new graph
    reqs = [engine.submit(PROMPTS[i], SamplingParams(n, stop_token_ids=[])) for i, n in [(3, 10), (1, 30), (5, 20)]]
    while not all(r.finished for r in reqs):
        engine.step()
    assert [r.output_ids for r in reqs] == [hf_greedy[3][:10], hf_greedy[1][:30], hf_greedy[5][:20]]
    assert engine.stats()["compiled_graphs"] == 2


def test_compiled_batch_graph_first_traced_with_every_slot_busy(model, hf_greedy, aot_eager):
    """max_batch_size=2 and the batch >= 2 graph first traced at batch 2: the dynamic batch must not be pinned to
    the slot table's size (it was, by slicing the table: a dynamo error at the first two-request step)."""
    engine = engine_for(model, compile=True, max_batch_size=2)
    assert engine.generate(PROMPTS[:2], 12, stop_token_ids=[]) == [g[:12] for g in hf_greedy[:2]]
    assert engine.generate([PROMPTS[2]], 12, stop_token_ids=[]) == [hf_greedy[2][:12]]


def test_compiled_seeded_sampling_matches_eager(model, aot_eager):
    kw = dict(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=3, stop_token_ids=[])
    assert engine_for(model, compile=True).generate(PROMPTS[:2], **kw) == engine_for(model).generate(PROMPTS[:2], **kw)


def test_compiled_processors_match_eager(model, aot_eager):
    """Penalties and logit_bias modify the compiled graph's logits in place: the same tokens as eager."""
    kw = dict(max_new_tokens=20, temperature=0.9, seed=3, stop_token_ids=[], frequency_penalty=1.0,
              presence_penalty=0.5, logit_bias={5: 3.0}, logprobs=2)
    assert engine_for(model, compile=True).generate(PROMPTS[:2], **kw) == engine_for(model).generate(PROMPTS[:2], **kw)


def test_compiled_batch1_graph_writes_loops(model, monkeypatch):
    """The batch-1 mode travels with the traced shapes (layers.Batch.matvec), not with module state: the batch-1
    decode graph writes every projection as a multiply-and-sum (only the fp32 routers stay F.linear calls), the
    batch >= 2 graph calls F.linear, and batches of 1, 3 and 1 rows reuse the two graphs without recompiling."""
    import nanoseek.engine

    graphs = []

    def backend(gm, example_inputs):  # count each captured graph's F.linear calls; run the graph as captured
        graphs.append(sum(n.op == "call_function" and n.target is torch.nn.functional.linear
                           for n in gm.graph.nodes))
        return gm.forward

    monkeypatch.setattr(nanoseek.engine, "COMPILE_BACKEND", backend)
    engine = engine_for(model, compile=True)
    for batch in ([PROMPTS[0]], PROMPTS[:3], [PROMPTS[1]]):
        engine.generate(batch, 4, stop_token_ids=[])
    routers = sum(lw.moe for lw in engine.layers)
    ffns = sum(lw.mlp_gate_up is not None for lw in engine.layers)  # dense MLPs and shared experts: 2 linear each
    assert graphs == [routers, 3 * len(engine.layers) + 2 * ffns + routers + 1]  # + q_a/kv_a, q_b, o; + lm_head


def test_compiled_decode_inductor(model, hf_greedy):
    """The real backend (inductor's generated C++): one graph, batch 1."""
    engine = engine_for(model, compile=True)
    assert engine.generate([PROMPTS[1]], 16, stop_token_ids=[]) == [hf_greedy[1][:16]]
    s = engine.stats()
    assert s["compiled_graphs"] == 1 and s["compile_seconds"] > 0


# --- the CLI ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nanoseek.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("cli")
    text = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42. Ünïcödé ✓ 你好.\n" * 60
    tok = train_tokenizer([text], vocab_size=300, out_dir=root / "tok")
    torch.manual_seed(0)
    model = Transformer(get_preset("test", vocab_size=tok.vocab_size))
    return save_pretrained(model, root / "model", tokenizer_dir=root / "tok"), tok


def run_cli(argv):
    from nanoseek.commands import generate

    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    generate.run(parser.parse_args(argv))


@pytest.mark.parametrize("chat", [False, True])
def test_cli_generate(tiny_dir, capsys, chat):
    path, tok = tiny_dir
    argv = ["--model", str(path), "--prompt", "The quick", "--max-new-tokens", "12", "--temperature", "0"]
    run_cli(argv + (["--chat"] if chat else []))
    out, err = capsys.readouterr()
    model = load_model(path)
    ids = (tok.apply_chat_template([{"role": "user", "content": "The quick"}], add_generation_prompt=True) if chat
           else tok.encode("The quick"))
    engine = Engine(model, max_batch_size=1)
    expected = engine.generate([ids], 12, stop_token_ids=[tok.eos_id])[0]
    assert out == tok.decode(expected) + "\n"
    assert f"{len(ids)} prompt tokens, {len(expected)} new tokens" in err and "tok/s" in err
    assert f"; {engine.stats()['decode_path']}]" in err  # which decode path ran, and why


def test_cli_generate_errors(tiny_dir, tmp_path):
    path, _ = tiny_dir
    with pytest.raises(NanoseekError, match="not found"):
        run_cli(["--model", str(tmp_path / "nope"), "--prompt", "x"])
    with pytest.raises(NanoseekError, match="tokenizer"):
        run_cli(["--model", str(tmp_path), "--prompt", "x"])
    with pytest.raises(NanoseekError, match="top_p"):
        run_cli(["--model", str(path), "--prompt", "x", "--top-p", "2"])
    with pytest.raises(NanoseekError, match="empty"):
        run_cli(["--model", str(path), "--prompt", ""])
    from nanoseek.cli import COMMANDS

    assert COMMANDS["generate"][0] == "nanoseek.commands.generate"
