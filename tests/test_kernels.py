"""Native decode kernels (nanoseek/kernels): every instruction-set variant this CPU runs against the engine's PyTorch
path — logits within 1e-4 (fp32), greedy tokens identical over 40 steps with slots of different lengths, the
multi-token (MTP verify) step, projections exact against their dequantised int8/int4 weights — and the fallback."""

import pytest
import torch

from nanoseek import NanoseekError, Transformer, get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.kernels import NativeDecoder, _int4_codes, choose_isa, cpu_isas, library, native_decoder, status
from nanoseek.quant import Int4Weight, Int8Weight

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(library() is None, reason="the native library was not built")]

ISAS = cpu_isas()
PROMPTS = [[5, 6, 7, 8, 9], [1, 2, 3], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [3]]  # 4 slot lengths
FP32_TOL = 1e-4  # logits are O(1); the kernels only sum in another order


def random_model(**overrides) -> Transformer:
    """A test-preset model with perturbed norms and a routing bias, so routing and norms are non-trivial."""
    torch.manual_seed(0)
    model = Transformer(get_preset("test", initializer_range=0.1, **overrides)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for gate in model.gates():
            gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.5)
    return model


CONFIGS = {
    "test": {},
    # a plain q_proj, NeoX-style halves for RoPE, no shared experts, YaRN (its attention factor is in cos/sin)
    "variant": dict(q_lora_rank=None, rope_interleave=False, n_shared_experts=0,
                    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                  "mscale": 1.0, "mscale_all_dim": 0.8}),
    "dense": dict(first_k_dense_replace=2, num_nextn_predict_layers=0),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return random_model(**CONFIGS[request.param])


def engine_for(model, **kw):
    """An engine on the PyTorch path (the reference; the tests attach NativeDecoders themselves), unless kw says."""
    return Engine(model, **{"max_batch_size": 4, "max_seq_len": 96, "native": False, **kw})


def greedy(engine, decode, steps):
    """Prefill PROMPTS with the engine, then `steps` greedy decode steps through decode(tokens, lengths) (None:
    the engine's own decode) -> (tokens [steps, n], the last step's logits)."""
    tok = engine.prefill(PROMPTS).argmax(-1)
    out = [tok]
    for _ in range(steps):
        n = len(PROMPTS)
        if decode is None:
            logits = engine.decode(tok)  # advances the lengths itself
        else:
            logits = decode(tok, engine.slot_lengths[:n])
            engine.runner.set_lengths(0, [m + 1 for m in engine.slot_lengths[:n]])
        tok = logits.argmax(-1)
        out.append(tok)
    return torch.stack(out), logits


@pytest.mark.parametrize("isa", ISAS)
def test_fp32_greedy_and_logits_match_pytorch(model, isa):
    ref = engine_for(model)
    tokens_ref, logits_ref = greedy(ref, None, 40)
    eng = engine_for(model)
    native = NativeDecoder(eng, isa)
    tokens, logits = greedy(eng, native.decode, 40)
    assert torch.equal(tokens, tokens_ref)
    assert (logits - logits_ref).abs().max() < FP32_TOL
    for a, b in zip(eng.caches, ref.caches, strict=True):  # the latent rows it wrote in place
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("isa", ISAS)
def test_two_threads_equal_one(isa):
    model = random_model()
    logits = []
    for threads in (1, 2):
        eng = engine_for(model)
        logits.append(greedy(eng, NativeDecoder(eng, isa, threads=threads).decode, 8)[1])
    assert (logits[0] - logits[1]).abs().max() < 1e-5


def test_multi_token_step_matches_engine_forward(model):
    """S = 3 new tokens per slot (the speculative verify step): hidden states and logits as Engine.forward."""
    ref, eng = engine_for(model), engine_for(model)
    ref.prefill(PROMPTS)
    eng.prefill(PROMPTS)
    tokens = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42], [50, 51, 52]])
    lens = eng.slot_lengths[:4]
    hidden_ref = ref.forward(tokens, 0)
    hidden, logits = NativeDecoder(eng).forward(tokens, lens)
    assert (hidden - hidden_ref).abs().max() < FP32_TOL
    assert (logits - ref.logits(hidden_ref)).abs().max() < FP32_TOL


def test_mtp_module_matches_engine():
    """NativeDecoder.mtp = Engine._mtp + _mtp_logits (eh_proj front, the MTP block over its own cache, head norm,
    the shared lm_head), over 2 positions per slot with a picked one, on caches the speculative engine filled."""
    model = random_model()
    ref, eng = engine_for(model, speculative=True), engine_for(model, speculative=True)
    for e in (ref, eng):
        e.generate(PROMPTS, 3, stop_token_ids=[])  # fills the main and MTP caches, identically
    lens = [len(p) + 1 for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 2, model.config.hidden_size, generator=g)
    tokens = torch.randint(0, model.config.vocab_size, (4, 2), generator=g)
    pick = torch.tensor([0, 1, 1, 0])
    h_ref, logits_ref = ref.runner._static_mtp(hidden, tokens, pick, torch.tensor(lens), torch.arange(max(lens) + 2),
                                        static=False)
    h, logits = NativeDecoder(eng).mtp(hidden, tokens, lens, pick)
    assert (h[torch.arange(4), pick] - h_ref).abs().max() < FP32_TOL
    assert (logits - logits_ref).abs().max() < FP32_TOL
    assert (eng.mtp_caches[0] - ref.mtp_caches[0]).abs().max() < 1e-5


# --- the engine's default path (engine/native.py) ---------------------------------------------------------------------
def run_requests(engine, params: list) -> list:
    """Five requests with different prompts and lengths on a 3-slot engine: they join and leave at different steps
    (the slots are compacted) -> (tokens, logprobs) per request."""
    reqs = [engine.submit(p, SamplingParams(**kw)) for p, kw in zip([*PROMPTS, [7, 8]], params, strict=True)]
    events = []
    while not all(r.finished for r in reqs):
        events += engine.step()
    return [(r.output_ids, [(e.logprob, e.top_logprobs) for e in events if e.request is r and e.logprob is not None])
            for r in reqs]


def test_engine_generate_native_equals_pytorch(model):
    """Native is the default decode path; greedy tokens equal the PyTorch path's on every test config through
    Engine.generate, with requests joining and leaving; seeded sampling with penalties, logit_bias and logprobs gives
    the same tokens (logprobs within the fp32 tolerance)."""
    native, torch_path = Engine(model, max_batch_size=3, max_seq_len=96), engine_for(model, max_batch_size=3)
    assert native.stats()["native"] and native.stats()["decode_path"].startswith(f"native {ISAS[-1]} decode")
    assert not torch_path.stats()["native"] and torch_path.runner.native is None
    assert torch_path.stats()["decode_path"] == "PyTorch decode (native=False)"
    assert native.generate(PROMPTS, 24, stop_token_ids=[]) == torch_path.generate(PROMPTS, 24, stop_token_ids=[])
    params = [dict(max_new_tokens=n, stop_token_ids=[]) for n in (20, 6, 13, 3)] + [
        dict(max_new_tokens=15, temperature=0.8, seed=1, presence_penalty=0.5, frequency_penalty=0.3,
             logit_bias={5: 3.0}, logprobs=2, stop_token_ids=[])]
    a, b = run_requests(native, params), run_requests(torch_path, params)
    for (tokens_a, lp_a), (tokens_b, lp_b) in zip(a, b, strict=True):
        assert tokens_a == tokens_b
        for (x, top_x), (y, top_y) in zip(lp_a, lp_b, strict=True):
            assert abs(x - y) < 1e-4 and [t for t, _ in top_x] == [t for t, _ in top_y]
    assert native.stats()["decode_steps"] == torch_path.stats()["decode_steps"]


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_engine_decodes_natively(quant):
    """int8/int4 engines decode natively by default: their greedy tokens are those of the NativeDecoder stepped by
    hand (int8/int4 native and PyTorch differ by their activation rounding: q8 blocks against bf16)."""
    model = random_model()
    engine = engine_for(model, quant=quant, native=None)
    assert engine.stats()["native"]
    out = engine.generate(PROMPTS, 12, stop_token_ids=[])
    ref = engine_for(model, quant=quant)
    tokens, _ = greedy(ref, NativeDecoder(ref).decode, 11)
    assert out == tokens.T.tolist()


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_engine_verifies_and_drafts_natively(model, k):
    """speculative=True on the native path (verify = NativeDecoder.forward, drafts = NativeDecoder.mtp): greedy
    output identical to plain PyTorch decoding."""
    if not model.mtp:
        pytest.skip("no MTP module")
    spec = Engine(model, max_batch_size=4, max_seq_len=96, speculative=True, num_speculative_tokens=k)
    assert spec.runner.native is not None
    calls = {"forward": 0, "mtp": 0}
    for name in calls:
        real = getattr(spec.runner.native, name)

        def counted(*a, name=name, real=real, **kw):
            calls[name] += 1
            return real(*a, **kw)
        setattr(spec.runner.native, name, counted)
    assert spec.generate(PROMPTS, 20, stop_token_ids=[]) == engine_for(model).generate(PROMPTS, 20, stop_token_ids=[])
    assert calls["forward"] > 0 and calls["mtp"] >= calls["forward"]  # (k = 2: the chained draft too)


def test_native_choice_and_fallback_reasons(monkeypatch):
    """native=False keeps PyTorch; auto falls back with the reason in stats(); native=True refuses with it."""
    model = random_model()
    monkeypatch.setenv("NANOSEEK_KERNELS", "off")
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    assert engine.runner.native is None and engine.stats()["decode_path"] == "PyTorch decode (NANOSEEK_KERNELS=off)"
    with pytest.raises(NanoseekError, match="native=True.*NANOSEEK_KERNELS=off"):
        Engine(model, max_batch_size=2, max_seq_len=32, native=True)
    monkeypatch.setenv("NANOSEEK_KERNELS", ISAS[0])
    assert Engine(model, max_batch_size=2, max_seq_len=32, native=True).runner.native.isa == ISAS[0]
    monkeypatch.delenv("NANOSEEK_KERNELS")
    bf16 = Engine(random_model().to(torch.bfloat16), max_batch_size=2, max_seq_len=32)
    assert bf16.runner.native is None and "bfloat16" in bf16.stats()["decode_path"]
    with pytest.raises(NanoseekError, match="native=True.*bfloat16"):
        Engine(random_model().to(torch.bfloat16), max_batch_size=2, max_seq_len=32, native=True)
    compiled = Engine(model, max_batch_size=2, max_seq_len=32, compile=True)
    assert compiled.runner.native is None and "compile=True" in compiled.stats()["decode_path"]
    with pytest.raises(NanoseekError, match="compile=True"):
        Engine(model, max_batch_size=2, max_seq_len=32, compile=True, native=True)
    with pytest.raises(NanoseekError, match="native must be"):
        Engine(model, native="yes")


# --- int8 / int4 ------------------------------------------------------------------------------------------------------
def q8(x: torch.Tensor) -> torch.Tensor:
    """The activation rounding of the kernels: blocks of 32, d = max|x| / 127, q = round(x * (1 / d)), dequantised."""
    m, k = x.shape
    xp = torch.nn.functional.pad(x, (0, -k % 32)).view(m, -1, 32)
    d = xp.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return ((xp * inv).round() * d).view(m, -1)[:, :k]


def dequantize(w):
    """fp32 weights the kernels multiply by (Int4Weight.dequantize() rounds to bf16; this is exact)."""
    if isinstance(w, Int4Weight):
        sz = w.scales_zeros.float().transpose(0, 1).repeat_interleave(w.group_size, 1)  # [N, K, 2]
        return (_int4_codes(w).float() - 8) * sz[..., 0] + sz[..., 1]
    return w.dequantize() if isinstance(w, Int8Weight) else w


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k, n, m", [(64, 96, 1), (96, 48, 3), (40, 24, 2), (256, 64, 7), (224, 32, 5)])
def test_projections_exact_against_dequantised_weights(isa, k, n, m):
    native = NativeDecoder(engine_for(random_model()), isa)
    torch.manual_seed(k + n + m)
    w, x = torch.randn(n, k), torch.randn(m, k)
    assert (native.linear(w, x) - x @ w.T).abs().max() < 1e-4
    weights = [Int8Weight(w)] + [Int4Weight(w, g) for g in (32, 64, 128) if k % g == 0 and n % 16 == 0]
    for qw in weights:  # up to float rounding: the integer dot products are exact
        assert (native.linear(qw, x) - q8(x) @ dequantize(qw).T).abs().max() < 1e-4, type(qw).__name__


def test_int4_codes_read_back_from_torchs_packing():
    w = Int4Weight(torch.randn(48, 128), 64)
    assert (dequantize(w) - w.dequantize()).abs().max() <= 2 ** -7 * w.dequantize().abs().max()  # bf16 rounding


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_decode_against_dequantised_reference(quant):
    """The whole step with quantised weights against the PyTorch engine running the dequantised weights in fp32:
    what differs is the rounding of the activations to 8 bits in blocks of 32 (llama.cpp's q8_0), ~2% of the
    largest logit on this model with large weights (the engine's own int8 path, bf16 activations: ~1%)."""
    model = random_model()
    quantised = engine_for(model, quant=quant)
    ref = engine_for(model)
    for lr, lq in zip(ref.layers, quantised.layers, strict=True):
        for name in ("wq_a_kv_a", "wq_b", "wo", "mlp_gate_up", "mlp_down"):
            if getattr(lq, name) is not None:
                setattr(lr, name, dequantize(getattr(lq, name)))
        if lr.moe:
            lr.experts_gate_up = [dequantize(w) for w in lq.experts_gate_up]
            lr.experts_down = [dequantize(w) for w in lq.experts_down]
            lr.grouped = False
    ref.runner.lm_head = dequantize(quantised.lm_head)
    native = NativeDecoder(quantised)  # W_UK / W_UV quantised too, per head (quantize_kv_b)
    for lr, lq in zip(ref.layers, quantised.layers, strict=True):
        w_uk, w_uv = native.kv_b_heads(lq)
        lr.w_uk = torch.stack([dequantize(w).T for w in w_uk])  # [H, nope, c]
        lr.w_uv = torch.stack([dequantize(w) for w in w_uv])  # [H, v, c]
    _, logits_ref = greedy(ref, None, 1)
    for isa in ISAS:  # (the variants can differ as much: a float rounding may move an activation across a q8 step)
        eng = engine_for(model, quant=quant)
        _, logits = greedy(eng, NativeDecoder(eng, isa).decode, 1)
        assert (logits - logits_ref).abs().max() < 0.04 * logits_ref.abs().max()


# --- dispatch and fallback --------------------------------------------------------------------------------------------
def test_dispatch_env(monkeypatch):
    engine = engine_for(random_model())
    monkeypatch.setenv("NANOSEEK_KERNELS", "off")
    assert choose_isa()[0] is None and status().startswith("PyTorch")
    decoder, why = native_decoder(engine)
    assert decoder is None and "NANOSEEK_KERNELS=off" in why
    for isa in ISAS:
        monkeypatch.setenv("NANOSEEK_KERNELS", isa)
        decoder, why = native_decoder(engine)
        assert decoder.isa == isa and why.startswith(f"native {isa}")
    monkeypatch.setenv("NANOSEEK_KERNELS", "sse9")
    with pytest.raises(NanoseekError, match="NANOSEEK_KERNELS"):
        choose_isa()
    monkeypatch.setenv("NANOSEEK_KERNELS", "auto")
    assert choose_isa()[0] == ISAS[-1]


def test_unsupported_engine_falls_back():
    engine = Engine(random_model().to(torch.bfloat16), max_batch_size=2, max_seq_len=32)
    decoder, why = native_decoder(engine)
    assert decoder is None and "bfloat16" in why
    with pytest.raises(NanoseekError, match="bfloat16"):
        NativeDecoder(engine)


def test_bad_steps_raise():
    engine = engine_for(random_model())
    native = NativeDecoder(engine)
    with pytest.raises(NanoseekError, match="past the cache"):
        native.decode(torch.tensor([1]), [engine.runner.rows])
    with pytest.raises(NanoseekError, match="vocabulary"):
        native.decode(torch.tensor([10**6]), [0])
    engine.block_table[0, 0] = engine.runner.num_blocks  # a corrupt block table is refused, not followed
    with pytest.raises(NanoseekError, match="block table"):
        native.decode(torch.tensor([1]), [0])
