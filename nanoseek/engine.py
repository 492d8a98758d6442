"""Fast CPU inference: absorbed MLA over a latent KV cache, continuous batching, per-request sampling.

The engine reads a `Transformer`'s weights (model.py) and runs its own serving forward pass (docs/engine.md):
- latent cache (V3 "absorb" mode): per layer one buffer [max_batch, max_seq, c + r] whose columns [:c] are
  `kv_cache` = kv_a_layernorm(c_kv) and [c:] are `pe_cache` = RoPE(k_pe), so q.k is one matmul;
- absorbed decode: q_lat = q_nope W_UK, scores = [q_lat ; q_pe] . [kv_cache ; pe_cache] * softmax_scale + mask
  (softmax in fp32), o = (p . kv_cache) W_UV^T -> o_proj: per-head keys and values are never expanded;
- prefill expands k/v from the fresh latent for fused causal SDPA (flash kernel, O(T) memory; measured faster);
- continuous batching: slots are cache rows, active requests always hold slots 0..n-1 (a finished request's slot is
  refilled from the last slot), new requests are prefilled together (right-padded) between decode steps;
- sampling per request with its own torch.Generator: reproducible whatever shares the batch;
- weight-only int8 / int4 (quant.py): every projection goes through `linear`, which dispatches on the weight type;
- MTP speculative decoding (speculative=True): the MTP module drafts one token from the main model's last hidden
  state, the main model verifies [last token, draft] in one 2-token forward, both caches roll back on rejection;
- compile=True: decode steps run as torch.compile'd graphs without data-dependent shapes (the MoE gathers the selected
  experts' weights per (token, expert) pair; batch-1 projections are multiply-and-sums that inductor fuses).
One thread owns the loop (`step`, or `start` / `run_forever`); `submit` and `Request.cancel` work from any thread.

Shapes: B batch rows (slots), S new tokens per row, T attended cache length, D hidden, H heads, c kv_lora_rank,
r qk_rope_head_dim, V vocab, N = B*S tokens, E routed experts, K experts per token.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek import moe
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model import MoE, Transformer, apply_rope
from nanoseek.quant import QuantizedWeight, check_mode, quantize, weight_bytes

if TYPE_CHECKING:
    from nanoseek.grammar import Constraint, GrammarState

# torch.compile backend of compile=True: inductor generates fused C++ for the CPU. Tests swap in "aot_eager" (the same
# graph capture, no code generation) to check the static-shape path in seconds instead of a minute a graph.
COMPILE_BACKEND = "inductor"


# True while Engine._run_graph traces or runs a batch-1 graph (dynamo guards on it, so the batch-1 and the
# batch >= 2 graphs are told apart); read by linear(). Two engines stepping in two threads at once could see each
# other's value: a graph then recompiles or traces the other form, slower but still correct.
_matvec = False


def _batch1_loops() -> bool:
    """Inside the trace of a compiled batch-1 graph: write small products as multiply-and-sums (inductor loops)."""
    return _matvec and torch.compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """Every projection goes through here: a plain tensor, or a weight-only quantised one (quant.py)."""
    if isinstance(weight, torch.Tensor):
        if _batch1_loops():
            # a compiled batch-1 graph (1 or 2 tokens): as a multiply-and-sum, inductor generates the matrix-vector
            # loop itself, fused with the norm or activation before it, instead of one MKL call per weight;
            # measured 2.4-2.6x eager decode against 1.5x with the MKL calls (docs/engine.md). For the 2-token
            # verify forward too: 2.2 ms against 3.3 ms with MKL (and 18 ms with the rows as the inner loop)
            return (x[..., None, :] * weight).sum(-1)
        return F.linear(x, weight)
    return weight.linear(x)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [G,M,K] @ b [G,K,N]. In a compiled batch-1 graph as a multiply-and-sum, so inductor writes the loop (fused
    with its neighbours) instead of calling the library: at batch 1 the attention's four bmm a layer are tiny, and
    as loops the decode step is 4.5% faster (median of 10 interleaved runs, docs/engine.md)."""
    if _batch1_loops():
        return (a[:, :, :, None] * b[:, None, :, :]).sum(-2)
    return torch.bmm(a, b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op; equal to the formula below up to rounding
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # as model.RMSNorm: normalise in fp32, cast back, then scale (the same rounding in bf16)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor | QuantizedWeight, down: torch.Tensor | QuantizedWeight
           ) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2I, D] weight."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


# --- weights, prepared once -----------------------------------------------------------------------------------------
class LayerWeights:
    """One block's weights in the layout the engine uses (fused where two matmuls read the same input)."""

    def __init__(self, block: torch.nn.Module, config: ModelConfig):
        attn, h = block.self_attn, config.num_attention_heads
        self.attn_norm = block.input_layernorm.weight
        # x -> [q_a (or q) ; c_kv ; k_pe] in one matmul: [q_lora_rank (or H*qk) + c + r, D]
        q_first = attn.q_proj.weight if config.q_lora_rank is None else attn.q_a_proj.weight
        self.wq_a_kv_a = torch.cat([q_first, attn.kv_a_proj_with_mqa.weight])
        self.q_norm = attn.q_a_layernorm.weight if config.q_lora_rank is not None else None
        self.wq_b = attn.q_b_proj.weight if config.q_lora_rank is not None else None
        self.kv_norm = attn.kv_a_layernorm.weight
        self.wkv_b = attn.kv_b_proj.weight  # [H*(nope+v), c], used expanded by the naive prefill
        wkv_b = self.wkv_b.view(h, config.qk_nope_head_dim + config.v_head_dim, config.kv_lora_rank)
        self.w_uk = wkv_b[:, :config.qk_nope_head_dim].contiguous()  # [H, nope, c]
        self.w_uv = wkv_b[:, -config.v_head_dim:].contiguous()  # [H, v, c]
        self.wo = attn.o_proj.weight
        self.ffn_norm = block.post_attention_layernorm.weight
        mlp = block.mlp
        self.moe = isinstance(mlp, MoE)
        if self.moe:
            self.gate_w = mlp.gate.weight.float()  # the router runs in fp32 (model.Gate)
            self.gate_bias = mlp.gate.e_score_correction_bias.float()
            self.experts_gate_up = list(mlp.gate_up_proj.unbind(0))  # E x [2I, D] (views, no copy)
            self.experts_down = list(mlp.down_proj.unbind(0))  # E x [D, I]
            # the 3-D expert tensors themselves, for the compiled decode step (which gathers the selected experts)
            self.experts_gate_up_3d, self.experts_down_3d = mlp.gate_up_proj, mlp.down_proj  # [E, 2I, D], [E, D, I]
            # one F.grouped_mm per projection where its kernel takes these stacks; a quantised mode sets `grouped`
            # False and swaps the per-expert lists above
            self.grouped = moe.grouped_mm_ok(mlp.gate_up_proj, mlp.down_proj)
            shared = mlp.shared_experts
        else:
            shared = mlp
        self.mlp_gate_up = None if shared is None else torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
        self.mlp_down = None if shared is None else shared.down_proj.weight
        if hasattr(block, "eh_proj"):  # MTP module extras
            self.enorm, self.hnorm = block.enorm.weight, block.hnorm.weight
            self.eh_proj, self.head_norm = block.eh_proj.weight, block.shared_head.norm.weight

    def quantize(self, q: Callable[[torch.Tensor], QuantizedWeight]) -> None:
        """Swap every projection for its quantised form, except kv_b_proj: W_UK / W_UV run in torch.bmm (and the
        naive prefill's wkv_b stays with them, so prefill and decode see the same keys and values)."""
        for name in ("wq_a_kv_a", "wq_b", "wo", "mlp_gate_up", "mlp_down", "eh_proj"):
            if getattr(self, name, None) is not None:
                setattr(self, name, q(getattr(self, name)))
        if self.moe:
            self.experts_gate_up = [q(w) for w in self.experts_gate_up]
            self.experts_down = [q(w) for w in self.experts_down]
            # F.grouped_mm reads full-precision 3-D weights: the quantised experts take the loop through linear()
            self.grouped = False
            self.experts_gate_up_3d = self.experts_down_3d = None


class Batch(NamedTuple):
    """What every layer needs to feed [B,S] tokens to a run of slots (computed once per forward)."""

    start: int  # the first slot; the slots are start..start+B-1
    write_index: torch.Tensor  # [B*S] rows of cache.view(-1, c+r) to write the new latents to
    cos: torch.Tensor  # [B,S,1,r/2] fp32
    sin: torch.Tensor
    mask: torch.Tensor | None  # additive [B, S*H, T]; None = fresh causal prefill; empty = nothing to hide
    t: int  # cached positions attended (T)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [m,V] (unnormalised, >= 0), u [m] uniform in [0,1) -> the first index whose CDF exceeds u * total."""
    cdf = probs.cumsum(-1)
    return (cdf <= u[:, None].to(cdf.device) * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)


# --- requests -------------------------------------------------------------------------------------------------------
# temperatures below this sample greedily: logits / 1e-50 overflow fp32 to inf, the softmax turns inf - inf into NaN,
# and the inverse CDF then picks one fixed token. 1e-5 keeps logits / T finite for any |logit| < 3e33.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 (or anything < GREEDY_TEMPERATURE) = greedy argmax
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability sums to >= top_p
    top_k: int = 0  # 0 = no top-k cut
    stop_token_ids: list[int] | None = None  # None = [config.eos_token_id]; [] = run to max_new_tokens
    seed: int | None = None  # None = a fresh random seed
    # OpenAI's penalties over this request's generated tokens so far (count_j = times token j was emitted):
    # logit_j -= frequency_penalty * count_j + presence_penalty * (count_j > 0)
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    logit_bias: dict[int, float] | None = None  # token id -> value in [-100, 100], added to that token's logit
    # None: no log-probabilities; k in 0..20: every emitted token's Event carries its log-probability and the k most
    # likely tokens of the distribution it was drawn from (docs/engine.md, "Sampling parameters")
    logprobs: int | None = None
    # constrained decoding (nanoseek.grammar): every token is drawn from the tokens the grammar allows (its
    # start_after token first, if it has one); a complete grammar ends the request with "stop"
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        checks = [("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
                  ("temperature", _is_num(self.temperature) and self.temperature >= 0, ">= 0"),
                  ("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0"),
                  ("seed", self.seed is None or _is_int(self.seed), "an integer or None"),
                  ("stop_token_ids", self.stop_token_ids is None or (isinstance(self.stop_token_ids, (list, tuple))
                                                                     and all(map(_is_int, self.stop_token_ids))),
                   "a list of integers or None"),
                  ("presence_penalty", _is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                   "a number in [-2, 2]"),
                  ("frequency_penalty", _is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                   "a number in [-2, 2]"),
                  ("logit_bias", self.logit_bias is None or (
                      isinstance(self.logit_bias, dict) and all(_is_int(k) and k >= 0 for k in self.logit_bias)
                      and all(_is_num(v) and -100 <= v <= 100 for v in self.logit_bias.values())),
                   "None or a dict of token id -> number in [-100, 100]"),
                  ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                   f"None or an integer in [0, {MAX_LOGPROBS}]")]
        if self.constraint is not None:
            from nanoseek.grammar import Constraint

            checks.append(("constraint", isinstance(self.constraint, Constraint), "None or a nanoseek.grammar "
                                                                                  "Constraint"))
        for name, ok, want in checks:
            if not ok:
                raise NanoseekError(f"sampling: {name} must be {want}, got {getattr(self, name)!r}")

    def features(self) -> list[str]:
        """The names of the set parameters that need a logits processor or log-probabilities (empty: plain sampling,
        which costs nothing extra in the decode step)."""
        return [name for name, on in (("presence_penalty", self.presence_penalty != 0),
                                      ("frequency_penalty", self.frequency_penalty != 0),
                                      ("logit_bias", bool(self.logit_bias)),
                                      ("logprobs", self.logprobs is not None),
                                      ("constraint", self.constraint is not None)) if on]


def _top(ids: torch.Tensor, logp: torch.Tensor) -> list[tuple[int, float]]:
    """(token id, log-probability) pairs, most likely first, without the impossible tokens (log-probability -inf)."""
    return [(t, v) for t, v in zip(ids.tolist(), logp.tolist(), strict=True) if v != float("-inf")]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v: not NaN


@dataclass
class Event:
    """What one step produced for one request: a new token, and/or the end of the request."""

    request: Request
    token_id: int | None  # None for an end without a token (a stop token, which is not emitted; a cancel)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"; None while running
    # with SamplingParams.logprobs = k (and a token): the token's natural-log probability under the distribution it
    # was drawn from, and that distribution's k most likely (token id, log-probability), most likely first (fewer
    # than k when fewer tokens have a non-zero probability, e.g. after top-k / top-p)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_new_tokens clamped so that prompt + output <= max_seq_len
    stop_ids: frozenset[int]
    generator: torch.Generator | None  # None for greedy
    on_event: Callable[[Event], None] | None = None  # called from the engine-loop thread
    output_ids: list[int] = field(default_factory=list)
    # speculative decoding: the MTP module's guesses for the k tokens after output_ids[-1], and for a sampled
    # request the distributions q they were drawn from (k tensors [V])
    drafts: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor] = field(default_factory=list)
    # logits processors (None when unused): times each token was emitted [V] fp32 (penalties), logit_bias as
    # (token ids [b], values [b] fp32)
    counts: torch.Tensor | None = None
    bias: tuple[torch.Tensor, torch.Tensor] | None = None
    grammar: GrammarState | None = None  # params.constraint's state
    stop_array: np.ndarray | None = None  # stop_ids as an array (constrained requests)
    finish_reason: str | None = None
    error: str | None = None  # why a request ended with "error" for a reason of its own (its grammar's dead end)
    slot: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _cancel: bool = False
    _engine: Engine | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def processed(self) -> bool:
        """True when the logits need this request's processors before sampling."""
        return self.counts is not None or self.bias is not None or self.grammar is not None

    def cancel(self) -> None:
        """Thread-safe: the request ends with reason "cancelled" and frees its slot at the engine's next step."""
        self._cancel = True
        if self._engine is not None:
            self._engine._wake.set()

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until finished (when another thread runs the engine loop); returns the new tokens."""
        self.done.wait(timeout)
        return self.output_ids


# --- the engine -----------------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, model: Transformer, max_batch_size: int = 8, max_seq_len: int | None = None,
                 prefill_mode: str = "naive", quant: str | None = None, group_size: int = 32,
                 speculative: bool = False, num_speculative_tokens: int = 1, compile: bool = False):
        cfg = model.config
        if max_seq_len is None:
            max_seq_len = min(cfg.max_position_embeddings, 4096)
        if not _is_int(max_batch_size) or max_batch_size < 1:
            raise NanoseekError(f"engine: max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not _is_int(max_seq_len) or not 2 <= max_seq_len <= cfg.max_position_embeddings:
            raise NanoseekError(f"engine: max_seq_len must be an integer in [2, max_position_embeddings = "
                                f"{cfg.max_position_embeddings}], got {max_seq_len!r}")
        if prefill_mode not in ("naive", "absorbed"):
            raise NanoseekError(f"engine: prefill_mode must be 'naive' or 'absorbed', got {prefill_mode!r}")
        check_mode(quant, group_size)
        if quant is not None and model.embed_tokens.weight.device.type != "cpu":
            raise NanoseekError(f"engine: quant={quant!r} runs on the CPU only (the model is on "
                                f"{model.embed_tokens.weight.device})")
        if speculative and not model.mtp:
            raise NanoseekError("engine: speculative=True needs a checkpoint with an MTP module "
                                "(config num_nextn_predict_layers >= 1); this one has none")
        if not _is_int(num_speculative_tokens) or not 1 <= num_speculative_tokens <= 8:
            raise NanoseekError(f"engine: num_speculative_tokens must be an integer in [1, 8], got "
                                f"{num_speculative_tokens!r}")
        if compile and quant is not None:
            raise NanoseekError(f"engine: compile=True runs full-precision weights only, not quant={quant!r}")
        self.speculative = bool(speculative)
        self.num_speculative_tokens = num_speculative_tokens  # k drafts verified per step (speculative=True)
        self.model: Transformer | None = model  # None after from_pretrained(quant=...): only the engine needs it
        self.config = cfg
        self.quant, self.group_size = quant, group_size
        self.max_batch_size, self.max_seq_len, self.prefill_mode = max_batch_size, max_seq_len, prefill_mode
        # cache rows per slot: a verify step reads k drafts past the last token, so it may write up to k - 1 rows past
        # max_seq_len (their tokens are never emitted: the request's length limit ends it first)
        self._rows = max_seq_len + (num_speculative_tokens - 1 if speculative else 0)
        self.dtype, self.device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
        with torch.no_grad():
            self.layers = [LayerWeights(b, cfg) for b in model.layers]
            self.mtp_layers = [LayerWeights(m, cfg) for m in model.mtp]
            self.embed = model.embed_tokens.weight
            self.norm = model.norm.weight
            self.lm_head = model.lm_head.weight
            # RoPE tables for every cache position, fp32 as model.RotaryEmbedding makes them: [max_seq, r/2]
            self.cos, self.sin = model.rotary(torch.arange(self._rows, device=self.device))
            if quant is not None:  # the embedding is a row gather and stays as it is; the router stays fp32
                for lw in self.layers + self.mtp_layers:
                    lw.quantize(lambda w: quantize(w, quant, group_size))
                self.lm_head = quantize(self.lm_head, quant, group_size)
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.caches = [torch.zeros(max_batch_size, self._rows, width, dtype=self.dtype, device=self.device)
                       for _ in self.layers]
        # for speculative decoding with the MTP modules (not filled by this engine yet)
        self.mtp_caches = [torch.zeros_like(self.caches[0]) for _ in self.mtp_layers]
        # tokens cached per slot, as a tensor (for positions) and a list (for shapes, without syncs)
        self.lengths = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self.slot_lengths = [0] * max_batch_size
        # scheduler state: `active[i]` owns slot i; `_waiting` is fed by submit() from any thread
        self.active: list[Request] = []
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error: str | None = None  # the exception that failed the last requests ending with "error"
        self.counters = dict(requests=0, prompt_tokens=0, generated_tokens=0, decode_steps=0, prefill_seconds=0.0,
                             decode_seconds=0.0, draft_tokens=0, accepted_draft_tokens=0, compiled_graphs=0,
                             compile_seconds=0.0)
        # compile=True: decode steps (and speculative verification) run torch.compile'd graphs (docs/engine.md)
        self.compile = bool(compile)
        self._graph_keys: set[tuple[str, int, int]] = set()  # (graph, batch 1 or more, tokens per row) compiled
        if self.compile:
            # every Engine compiles its own graphs of the same code: more than dynamo's default limit of 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # inductor's C++ wrapper calls the kernels from C++ instead of Python (~10% at batch 1)
            kw = dict(options={"cpp_wrapper": True}) if COMPILE_BACKEND == "inductor" else {}
            self._decode_graph = torch.compile(self._static_decode, fullgraph=True, dynamic=False,
                                               backend=COMPILE_BACKEND, **kw)
            self._mtp_graph = torch.compile(self._static_mtp, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND,
                                            **kw)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, max_batch_size: int = 8,
                        max_seq_len: int | None = None, device: str = "cpu", quant: str | None = None,
                        **kwargs) -> Engine:
        from nanoseek.checkpoint import load_model

        check_mode(quant, kwargs.get("group_size", 32))
        engine = cls(load_model(path, dtype=dtype, device=device), max_batch_size, max_seq_len, quant=quant, **kwargs)
        if quant is not None:
            engine.model = None  # nobody else holds the loaded model: free its full-precision copy of the weights
        return engine

    # --- cache views ----------------------------------------------------------------------------------------------
    def kv_cache(self, layer: int) -> torch.Tensor:
        """[max_batch, max_seq, kv_lora_rank]: kv_a_layernorm(c_kv) per cached token."""
        return self.caches[layer][..., :self.config.kv_lora_rank]

    def pe_cache(self, layer: int) -> torch.Tensor:
        """[max_batch, max_seq, qk_rope_head_dim]: k_pe after RoPE per cached token."""
        return self.caches[layer][..., self.config.kv_lora_rank:]

    # --- forward --------------------------------------------------------------------------------------------------
    def _attention(self, x: torch.Tensor, lw: LayerWeights, cache: torch.Tensor, b: Batch) -> torch.Tensor:
        """x [B,S,D] (normed) for slots b.start.. of this layer's cache [max_batch, max_seq, c+r]."""
        cfg = self.config
        bsz, seqlen, _ = x.shape
        h, nope, r, c, v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                            cfg.v_head_dim)
        a = linear(x, lw.wq_a_kv_a)
        if lw.wq_b is None:
            q, kv, k_pe = a.split([h * cfg.qk_head_dim, c, r], dim=-1)
        else:
            q_a, kv, k_pe = a.split([cfg.q_lora_rank, c, r], dim=-1)
            q = linear(rms_norm(q_a, lw.q_norm, cfg.rms_norm_eps), lw.wq_b)
        q_nope, q_pe = q.view(bsz, seqlen, h, cfg.qk_head_dim).split([nope, r], dim=-1)
        # one RoPE call for the H query heads and the shared key head: [B,S,H+1,r]
        pe = apply_rope(torch.cat([q_pe, k_pe[:, :, None]], dim=2), b.cos, b.sin, cfg.rope_interleave)
        q_pe, k_pe = pe.split([h, 1], dim=2)
        latent = torch.cat([rms_norm(kv, lw.kv_norm, cfg.rms_norm_eps), k_pe.squeeze(2)], dim=-1)  # [B,S,c+r]
        cache.view(-1, c + r).index_copy_(0, b.write_index, latent.view(-1, c + r))
        if b.mask is None and self.prefill_mode == "naive":
            # expand keys/values from the latent and run fused causal attention (right padding never leaks back)
            k_nope, val = linear(latent[..., :c], lw.wkv_b).view(bsz, seqlen, h, nope + v).split([nope, v], dim=-1)
            qf = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B,H,S,qk]
            kf = torch.cat([k_nope, k_pe.expand(-1, -1, h, -1)], dim=-1).transpose(1, 2)
            # CPU flash attention needs one head dim for q, k and v: zero-pad v from v_head_dim to qk_head_dim
            # (5x faster than the math fallback at 1000 tokens), then drop the padded output columns
            vf = F.pad(val, (0, cfg.qk_head_dim - v)).transpose(1, 2) if v < cfg.qk_head_dim else val.transpose(1, 2)
            o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=cfg.softmax_scale)[..., :v]
            return linear(o.transpose(1, 2).reshape(bsz, seqlen, h * v), lw.wo)
        # absorb W_UK into the query: q_lat[h] = q_nope[h] W_UK[h]   [H, N, nope] @ [H, nope, c] -> [H, N, c]
        q_lat = bmm(q_nope.reshape(bsz * seqlen, h, nope).transpose(0, 1), lw.w_uk)
        q_full = torch.cat([q_lat.transpose(0, 1).view(bsz, seqlen, h, c), q_pe], dim=-1).view(bsz, seqlen * h, c + r)
        keys = cache.narrow(0, b.start, bsz)[:, :b.t]  # [B,T,c+r] = [kv_cache ; pe_cache]
        if b.mask.numel() == 0:  # nothing to hide
            scores = torch.bmm(q_full, keys.transpose(1, 2)).mul_(cfg.softmax_scale)
        elif _batch1_loops():  # inductor's loop, as in bmm()
            scores = bmm(q_full, keys.transpose(1, 2)) * cfg.softmax_scale + b.mask
        else:
            scores = torch.baddbmm(b.mask, q_full, keys.transpose(1, 2), alpha=cfg.softmax_scale)  # [B, S*H, T]
        p = F.softmax(scores, dim=-1, dtype=torch.float32)
        o_lat = bmm(p if p.dtype == x.dtype else p.to(x.dtype), keys[..., :c])  # [B, S*H, c]
        # W_UV after the weighted sum: [H, N, c] @ [H, c, v] -> [H, N, v]
        o = bmm(o_lat.view(bsz * seqlen, h, c).transpose(0, 1), lw.w_uv.transpose(1, 2))
        return linear(o.transpose(0, 1).reshape(bsz, seqlen, h * v), lw.wo)

    def _route(self, x: torch.Tensor, lw: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """model.Gate: x [N,D] -> weights [N,K] fp32, expert indices [N,K]."""
        scores = F.linear(x.float(), lw.gate_w).sigmoid()
        return moe.select_experts(scores, lw.gate_bias, self.config)

    def _moe(self, x: torch.Tensor, lw: LayerWeights, static: bool = False) -> torch.Tensor:
        """Shared experts + the routed experts the N tokens selected (one matmul pair per busy expert only)."""
        weights, indices = self._route(x, lw)
        y = torch.zeros_like(x) if lw.mlp_gate_up is None else swiglu(x, lw.mlp_gate_up, lw.mlp_down)
        n, k = indices.shape
        if static:
            # for torch.compile: no data-dependent shapes or host syncs. Each (token, expert) pair gathers its
            # expert's weights, [N*K, 2I, D] and [N*K, D, I]; inductor fuses the gather into the matrix-vector
            # loops, so the weights are read in place, not copied. Measured faster than a dense all-expert
            # formulation at batch 16 too (7 vs 13.5 ms a step): that multiplies by E instead of K.
            # The pairs are sorted by expert, so pairs that share an expert read its weights while they are in cache.
            flat = indices.flatten()
            order = flat.argsort(stable=True)
            token_of = order // k  # source token of each (token, expert) pair, grouped by expert
            experts = flat[order]
            gate, up = torch.bmm(lw.experts_gate_up_3d[experts], x[token_of, :, None]).squeeze(-1).chunk(2, dim=-1)
            outs = torch.bmm(lw.experts_down_3d[experts], (F.silu(gate) * up)[:, :, None]).squeeze(-1)  # [N*K, D]
            return y.index_add_(0, token_of, outs * weights.flatten()[order, None].to(x.dtype))
        if n * k <= 4:  # a token or two (batch-1 decode, speculative verification): run each pair, no sorting
            outs = torch.cat([swiglu(x[i:i + 1], lw.experts_gate_up[e], lw.experts_down[e])
                              for i, row in enumerate(indices.tolist()) for e in row])  # [N*K, D]
            return y + (weights.to(x.dtype).view(n, k, 1) * outs.view(n, k, -1)).sum(1)
        if lw.grouped:  # one grouped matmul per projection: ~1.5x faster than the loop from 4 tokens up
            def experts(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
                return moe.grouped_swiglu(xs, counts, lw.experts_gate_up_3d, lw.experts_down_3d)
        else:
            def experts(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
                return moe.looped_swiglu(xs, counts, lw.experts_gate_up, lw.experts_down, linear)
        return moe.dispatch(x, weights, indices, self.config.n_routed_experts, experts, out=y)

    def _block(self, x: torch.Tensor, lw: LayerWeights, cache: torch.Tensor, b: Batch,
               static: bool = False) -> torch.Tensor:
        x = x + self._attention(rms_norm(x, lw.attn_norm, self.config.rms_norm_eps), lw, cache, b)
        hn = rms_norm(x, lw.ffn_norm, self.config.rms_norm_eps)
        if lw.moe:
            return x + self._moe(hn.flatten(0, 1), lw, static).view_as(x)
        return x + swiglu(hn, lw.mlp_gate_up, lw.mlp_down)

    def _batch(self, start: int, bsz: int, seqlen: int, fresh: bool) -> Batch:
        """Positions, RoPE angles, cache write index and mask for feeding [B,S] tokens to slots start.."""
        rows = slice(start, start + bsz)
        offsets = torch.arange(seqlen, device=self.device)
        pos = offsets.expand(bsz, -1) if fresh else self.lengths[rows, None] + offsets  # [B,S]
        lens = [0] * bsz if fresh else self.slot_lengths[rows]
        slot_base = torch.arange(start, start + bsz, device=self.device)[:, None] * self._rows
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # [B,S,1,r/2] fp32 (broadcast over heads)
        if fresh:
            mask, t = None, seqlen  # causal over the new tokens
            if self.prefill_mode == "absorbed":
                mask = self._mask(pos, t)
        else:
            t = max(lens) + seqlen
            # one token per slot and every slot at the same length: everything is visible, skip the mask
            mask = self._mask(pos, t) if seqlen > 1 or min(lens) < max(lens) else pos.new_empty(0)
        return Batch(start, (slot_base + pos).flatten(), cos, sin, mask, t)

    def _mask(self, pos: torch.Tensor, t: int) -> torch.Tensor:
        """Additive mask [B, S*H, T]: the query at position pos[b,s] sees cached keys 0..pos[b,s]."""
        bsz, seqlen = pos.shape
        hidden = torch.arange(t, device=pos.device) > pos[..., None]  # [B,S,T]
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=pos.device).masked_fill_(hidden, float("-inf"))
        return mask[:, :, None].expand(-1, -1, self.config.num_attention_heads, -1).reshape(bsz, -1, t)

    def _forward(self, tokens: torch.Tensor, b: Batch) -> torch.Tensor:
        """tokens [B,S] through the main blocks -> hidden states [B,S,D] before the final norm (lengths untouched)."""
        x = F.embedding(tokens, self.embed)
        for lw, cache in zip(self.layers, self.caches, strict=True):
            x = self._block(x, lw, cache, b)
        return x

    # --- compiled decode (compile=True) ----------------------------------------------------------------------------
    def _static_batch(self, pos0: torch.Tensor, seqlen: int, t_index: torch.Tensor, start: int = 0) -> Batch:
        """Batch for S = seqlen new tokens per row at slots start..start+B-1 (compiled graphs: start 0), from the
        first positions pos0 [B]; t_index = arange(T), whose size carries the dynamic T under torch.compile. The mask
        is always built (no data-dependent branch)."""
        pos = pos0[:, None] + torch.arange(seqlen, device=self.device)  # [B,S]
        slot_base = (start + torch.arange(pos.shape[0], device=self.device))[:, None] * self._rows
        t = t_index.shape[0]
        return Batch(start, (slot_base + pos).flatten(), self.cos[pos][:, :, None],
                     self.sin[pos][:, :, None], self._mask(pos, t), t)

    def _static_decode(self, tokens: torch.Tensor, pos0: torch.Tensor, t_index: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled graph: tokens [B,S] at slots 0..B-1 -> (hidden [B,S,D] before the final norm, fp32 logits
        [B,S,V]); writes the cache, leaves the lengths alone."""
        b = self._static_batch(pos0, tokens.shape[1], t_index)
        x = F.embedding(tokens, self.embed)
        for lw, cache in zip(self.layers, self.caches, strict=True):
            x = self._block(x, lw, cache, b, static=True)
        return x, self.logits(x)

    def _static_mtp(self, hidden: torch.Tensor, next_tokens: torch.Tensor, pick: torch.Tensor, pos0: torch.Tensor,
                    t_index: torch.Tensor, start: int = 0, static: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`_mtp` over S positions per row from pos0 [B], then the output at position pick [B] of each row and its
        logits: (h' [B,D], fp32 logits [B,V]). Compiled as the MTP graph; called eagerly with static=False."""
        b = self._static_batch(pos0, next_tokens.shape[1], t_index, start)
        h = self._mtp(hidden, next_tokens, b, static=static)[torch.arange(pick.shape[0], device=self.device), pick]
        return h, self._mtp_logits(h)

    def _run_graph(self, name: str, *tensors: torch.Tensor, lens: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a compiled graph for slots 0..n-1 (tensors[0] [n, S, ...]) at positions lens[i] + 0..S-1 (default:
        the slots' lengths). The attended length T is a dynamic dimension, and so is the batch from 2 rows up (dynamo
        specialises sizes 0 and 1): two graphs per S cover every batch size and length (one for batch 1, one for the
        rest)."""
        n, seqlen = tensors[0].shape[:2]
        lens = self.slot_lengths[:n] if lens is None else lens
        pos0 = torch.tensor(lens, device=self.device)
        t_index = torch.arange(max(lens) + seqlen, device=self.device)  # >= 2
        torch._dynamo.mark_dynamic(t_index, 0)
        if n > 1:
            for t in (*tensors, pos0):
                torch._dynamo.mark_dynamic(t, 0)
        key = (name, min(n, 2), seqlen)
        t0 = time.perf_counter()
        global _matvec
        _matvec = n == 1
        try:
            out = (self._decode_graph if name == "decode" else self._mtp_graph)(*tensors, pos0, t_index)
        finally:
            _matvec = False
        if key not in self._graph_keys:  # the first call of a shape compiles it
            self._graph_keys.add(key)
            self.counters["compiled_graphs"] += 1
            self.counters["compile_seconds"] += time.perf_counter() - t0
        return out

    def _set_lengths(self, start: int, lens: list[int]) -> None:
        self.lengths[start:start + len(lens)] = torch.tensor(lens, device=self.device)
        self.slot_lengths[start:start + len(lens)] = lens

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0, fresh: bool = False) -> torch.Tensor:
        """Feed tokens [B,S] to slots start..start+B-1 at positions lengths[slot] + 0..S-1 (0.. if fresh: the slots
        are emptied first, as for a prefill); returns hidden states [B,S,D] before the final norm, and advances
        `lengths` by S."""
        bsz, seqlen = tokens.shape
        lens = [0] * bsz if fresh else self.slot_lengths[start:start + bsz]
        x = self._forward(tokens, self._batch(start, bsz, seqlen, fresh))
        self._set_lengths(start, [n + seqlen for n in lens])
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> fp32 logits [..., V]."""
        return linear(rms_norm(hidden, self.norm, self.config.rms_norm_eps), self.lm_head).float()

    def _prefill(self, prompts: list[list[int]], start: int) -> tuple[torch.Tensor, torch.Tensor, Batch, torch.Tensor]:
        """Right-padded batched prefill into slots start..: (hidden [n,S,D], tokens [n,S], its Batch, lengths [n])."""
        lens = [len(p) for p in prompts]
        tokens = torch.zeros(len(prompts), max(lens), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        b = self._batch(start, len(prompts), tokens.shape[1], fresh=True)
        hidden = self._forward(tokens, b)
        self._set_lengths(start, lens)
        return hidden, tokens, b, torch.tensor(lens, device=self.device)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], start: int = 0) -> torch.Tensor:
        """Prefill prompts into slots start.. (right-padded, one batched pass); returns last-position logits [n,V]
        and sets each slot's length to its prompt length."""
        hidden, _, _, lens = self._prefill(prompts, start)
        return self.logits(hidden[torch.arange(len(prompts), device=self.device), lens - 1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per slot for slots 0..n-1 (tokens [n]); returns logits [n,V]."""
        if self.compile:
            _, logits = self._run_graph("decode", tokens[:, None])
            self._set_lengths(0, [m + 1 for m in self.slot_lengths[:len(tokens)]])
            return logits[:, -1]
        return self.logits(self.forward(tokens[:, None], 0)[:, -1])

    @torch.inference_mode()
    def perplexity(self, token_ids: list[int] | torch.Tensor, seq_len: int = 256) -> float:
        """exp(mean next-token NLL) over token_ids, in non-overlapping windows of seq_len inputs (each window read
        from an empty cache, like a prompt) through this engine's own forward: its dtype and quantised weights.
        Uses cache slots 0.., so not while requests are running."""
        if self.active:
            raise NanoseekError("engine: perplexity() needs an idle engine (requests are running)")
        if not _is_int(seq_len) or not 1 <= seq_len <= self.max_seq_len:
            raise NanoseekError(f"engine: perplexity seq_len must be in [1, max_seq_len = {self.max_seq_len}], "
                                f"got {seq_len!r}")
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        windows = (len(ids) - 1) // seq_len
        if windows < 1:
            raise NanoseekError(f"engine: perplexity needs at least seq_len + 1 = {seq_len + 1} tokens, got {len(ids)}")
        nll = 0.0
        for w in range(0, windows, self.max_batch_size):
            x = torch.stack([ids[i * seq_len:(i + 1) * seq_len + 1]
                             for i in range(w, min(w + self.max_batch_size, windows))])  # [B, seq_len + 1]
            logits = self.logits(self.forward(x[:, :-1], 0, fresh=True))
            nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        return math.exp(nll / (windows * seq_len))

    # --- MTP speculative decoding ---------------------------------------------------------------------------------
    def _mtp(self, hidden: torch.Tensor, next_tokens: torch.Tensor, b: Batch, static: bool = False) -> torch.Tensor:
        """MTP depth 1 at the positions b feeds: position i pairs the main model's h_i [B,S,D] (before the final
        norm) with the embedding of t_{i+1} (next_tokens [B,S]), h'_i = eh_proj([enorm(emb) ; hnorm(h)]), then its
        block over its own latent cache. Returns the block output [B,S,D] (shared_head.norm comes in _mtp_logits)."""
        lw, eps = self.mtp_layers[0], self.config.rms_norm_eps
        x = torch.cat([rms_norm(F.embedding(next_tokens, self.embed), lw.enorm, eps), rms_norm(hidden, lw.hnorm, eps)],
                      dim=-1)
        return self._block(linear(x, lw.eh_proj), lw, self.mtp_caches[0], b, static)

    def _mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        return linear(rms_norm(h, self.mtp_layers[0].head_norm, self.config.rms_norm_eps), self.lm_head).float()

    def _mtp_step(self, hidden: torch.Tensor, next_tokens: torch.Tensor, pick: torch.Tensor, lens: list[int],
                  start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The MTP module over hidden [n,S,D] and next_tokens [n,S] at positions lens[i] + 0..S-1 of slots
        start..start+n-1 -> (h' [n,D], logits [n,V]) at position pick[i] of each row (the compiled graph for
        slots 0..)."""
        if self.compile and start == 0:
            return self._run_graph("mtp", hidden, next_tokens, pick, lens=lens)
        t_index = torch.arange(max(lens) + hidden.shape[1], device=self.device)
        return self._static_mtp(hidden, next_tokens, pick, torch.tensor(lens, device=self.device), t_index, start,
                                static=False)

    def _draft_one(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """MTP logits [n,V] -> one draft per request [n]: the argmax, or for a sampled request a draw from its
        filtered MTP distribution q (appended to request.draft_probs for the acceptance test)."""
        drafts = logits.argmax(-1)
        rows = [i for i, r in enumerate(reqs) if r.generator is not None]
        if rows:
            q = self._probs(logits[rows], [reqs[i].params for i in rows])
            drafts[rows] = _inverse_cdf(q, torch.cat([torch.rand(1, generator=reqs[i].generator) for i in rows]))
            for j, i in enumerate(rows):
                reqs[i].draft_probs.append(q[j])
        return drafts

    def _draft(self, h: torch.Tensor, logits: torch.Tensor, lens: list[int], reqs: list[Request],
               start: int = 0) -> None:
        """k drafts per request. h [n,D] and logits [n,V] are the MTP module's output at each slot's last read
        position lens[i] - 1, which predicts the token after the one just sampled: draft 1. Drafts 2..k chain the
        module on its own output, as V3's sequential MTP feeds depth j the output of depth j - 1 (module 1 stands
        in for the deeper ones): position lens[i] + j - 2 pairs the previous h' with draft j - 1. Those MTP cache
        rows hold guesses; the next verify step overwrites them with the main model's own states."""
        for r in reqs:
            r.draft_probs = []
        cols = [self._draft_one(logits, reqs)]
        for j in range(1, self.num_speculative_tokens):
            # a request that has just finished may sit past its limit: clamp its (discarded) position into the cache
            pos = [min(m + j - 1, self._rows - 1) for m in lens]
            pick = torch.zeros(len(reqs), dtype=torch.long, device=self.device)  # one position per row
            h, logits = self._mtp_step(h[:, None], cols[-1][:, None], pick, pos, start)
            cols.append(self._draft_one(logits, reqs))
        for r, ds in zip(reqs, torch.stack(cols, dim=1).tolist(), strict=True):
            r.drafts = ds

    def _prefill_mtp(self, hidden: torch.Tensor, tokens: torch.Tensor, b: Batch, lens: torch.Tensor,
                     first: list[int], reqs: list[Request]) -> None:
        """Fill the MTP cache over the prompt positions (same slots and positions as the main prefill: position i
        pairs h_i with the next prompt token, the last with the token just sampled) and draft the next k tokens."""
        rows = torch.arange(len(reqs), device=self.device)
        next_tokens = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # the column past each prompt is padding
        next_tokens[rows, lens - 1] = torch.tensor(first, device=self.device)
        h = self._mtp(hidden, next_tokens, b)[rows, lens - 1]
        self._draft(h, self._mtp_logits(h), lens.tolist(), reqs, b.start)

    def _verify(self, logits: torch.Tensor, drafts: torch.Tensor, reqs: list[Request]) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """logits [n,k+1,V] of the main model at [last token, d_1..d_k], drafts [n,k] -> (tokens [n,k+1],
        accepted [n]): row i emits tokens[i, :accepted[i] + 1], its accepted drafts and then one token of the main
        model's (at the first rejected position, or the bonus token after k accepted drafts).

        Greedy: d_j is accepted while it equals the argmax, so the output is plain greedy decoding. Sampled
        (speculative sampling, Leviathan et al. 2023, position by position): d_j is accepted with probability
        min(1, p_j(d_j) / q_j(d_j)); the first rejection draws from normalise(max(p_j - q_j, 0)) instead. p and q
        are the main and MTP distributions after temperature / top-k / top-p, so every emitted token is
        distributed exactly as plain sampling from p. k + 1 uniform draws per request and step."""
        k = drafts.shape[1]
        out = logits.argmax(-1)
        accepted = (out[:, :k] == drafts).long().cumprod(1).sum(1)
        rows = [i for i, r in enumerate(reqs) if r.generator is not None]
        if rows:
            m = len(rows)
            ps = [reqs[i].params for i in rows]
            p = self._probs(logits[rows].flatten(0, 1), [x for x in ps for _ in range(k + 1)]).view(m, k + 1, -1)
            q = torch.stack([torch.stack(reqs[i].draft_probs) for i in rows])  # [m,k,V]
            d = drafts[rows]  # [m,k]
            u = torch.stack([torch.rand(k + 1, generator=reqs[i].generator) for i in rows])  # [m,k+1]
            ok = u[:, :k] * q.gather(2, d[..., None])[..., 0] < p[:, :k].gather(2, d[..., None])[..., 0]
            acc = ok.long().cumprod(1).sum(1)  # [m] drafts accepted before the first rejection
            # where to draw the last token from: the residual at a rejection, p itself after all k (the bonus)
            residual = torch.cat([(p[:, :k] - q).clamp(min=0), p[:, k:]], dim=1)  # [m,k+1,V]
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: never rejected
            ar = torch.arange(m, device=logits.device)
            tokens = torch.cat([d, d[:, :1]], dim=1)
            tokens[ar, acc] = _inverse_cdf(residual[ar, acc], u[:, k])
            out[rows] = tokens
            accepted[rows] = acc
        return out, accepted

    def _speculative_decode(self, events: list[Event]) -> None:
        """One verify step for slots 0..n-1: the main model reads [last token, d_1..d_k] per slot in one forward;
        the MTP module reads the same positions, pairing h_{L+j} with the verified t_{L+j+1}, and drafts again from
        the last accepted position. Rejected drafts' cache rows (main and MTP) lie past the slot's new length: hidden
        by the mask and overwritten by the next step."""
        reqs = self.active
        n, k = len(reqs), self.num_speculative_tokens
        tokens = torch.tensor([[r.output_ids[-1], *r.drafts] for r in reqs], device=self.device)  # [n,k+1]
        lens = self.slot_lengths[:n]
        if self.compile:
            hidden, logits = self._run_graph("decode", tokens)
        else:
            hidden = self._forward(tokens, self._batch(0, n, k + 1, fresh=False))
            logits = self.logits(hidden)
        out, accepted = self._verify(logits, tokens[:, 1:], reqs)
        h, mtp_logits = self._mtp_step(hidden, out, accepted, lens)
        acc = accepted.tolist()
        new_lens = [m + 1 + a for m, a in zip(lens, acc, strict=True)]
        self._set_lengths(0, new_lens)
        self._draft(h, mtp_logits, new_lens, reqs)
        self.counters["draft_tokens"] += n * k
        self.counters["accepted_draft_tokens"] += sum(acc)
        for r, row, a in zip(reqs, out.tolist(), acc, strict=True):
            for t in row[:a + 1]:
                self._accept(events, r, t)
                if r.finished:
                    break

    # --- requests -------------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Validate and queue a request (thread-safe). Raises NanoseekError for a bad prompt or parameters.
        `on_event(Event)` is called from the engine-loop thread for every new token and at the end."""
        return self._enqueue([self._request(prompt_ids, params or SamplingParams(), on_event)])[0]

    def _enqueue(self, reqs: list[Request]) -> list[Request]:
        with self._lock:
            self._waiting.extend(reqs)
        self._wake.set()
        return reqs

    def _request(self, prompt_ids: list[int], params: SamplingParams,
                 on_event: Callable[[Event], None] | None) -> Request:
        params.validate()
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise NanoseekError("request: the prompt is empty (it must be a non-empty list of token ids)")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt_ids if not _is_int(t) or not 0 <= t < vocab), None)
        if bad is not None:
            raise NanoseekError(f"request: token id {bad!r} is not in the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_seq_len:
            raise NanoseekError(f"request: the prompt has {len(prompt_ids)} tokens; max_seq_len is "
                                f"{self.max_seq_len} (room for at least one new token is needed)")
        features = params.features()
        if self.speculative and features:
            raise NanoseekError(f"request: {features[0]} is not supported with speculative decoding (an engine "
                                f"with speculative=True)")
        bad = next((t for t in params.logit_bias or {} if t >= vocab), None)
        if bad is not None:
            raise NanoseekError(f"sampling: logit_bias token id {bad} is not in the vocabulary [0, {vocab})")
        stop = [self.config.eos_token_id] if params.stop_token_ids is None else params.stop_token_ids
        if params.constraint is not None:
            if params.constraint.vocab_size > vocab:
                raise NanoseekError(f"request: the constraint was built for a tokenizer of "
                                    f"{params.constraint.vocab_size} tokens; the model has {vocab}")
            stop = [*stop, self.config.eos_token_id]  # where the grammar is complete, EOS ends a constrained request
        gen = None
        if not params.greedy:
            gen = torch.Generator()
            gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
        req = Request(next(self._ids), list(prompt_ids), params,
                      min(params.max_new_tokens, self.max_seq_len - len(prompt_ids)), frozenset(stop), gen,
                      on_event, _engine=self)
        if params.presence_penalty or params.frequency_penalty:
            req.counts = torch.zeros(vocab, device=self.device)
        if params.logit_bias:
            req.bias = (torch.tensor(list(params.logit_bias), dtype=torch.long, device=self.device),
                        torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=self.device))
        if params.constraint is not None:
            req.grammar = params.constraint.new_state()
            req.stop_array = np.array(sorted(req.stop_ids), dtype=np.int64)
        return req

    def _emit(self, events: list[Event], req: Request, token: int | None, reason: str | None,
              logprob: tuple[float, list[tuple[int, float]]] | None = None) -> None:
        if token is not None:
            req.output_ids.append(token)
            self.counters["generated_tokens"] += 1
            if req.counts is not None:
                req.counts[token] += 1
        if reason is not None:
            req.finish_reason = reason
        ev = Event(req, token, reason) if logprob is None or token is None else Event(req, token, reason, *logprob)
        events.append(ev)
        if req.on_event is not None:
            req.on_event(ev)
        if reason is not None:
            req.done.set()

    def _accept(self, events: list[Event], req: Request, token: int,
                logprob: tuple[float, list[tuple[int, float]]] | None = None) -> None:
        """Record a sampled token: a stop token ends the request (and is not emitted), so does the length limit, and
        so does a complete grammar (after its last token)."""
        g = req.grammar
        if g is not None and g.dead is not None:  # no token was allowed (_grammar_mask)
            req.error = f"grammar: {g.dead}"
            self._emit(events, req, None, "error")
        elif token in req.stop_ids:
            self._emit(events, req, None, "stop")
        else:
            reason = "length" if len(req.output_ids) + 1 >= req.max_new_tokens else None
            if g is not None:
                g.advance(token)
                if reason is None and g.done:
                    reason = "stop"
            self._emit(events, req, token, reason, logprob)

    def _release(self, finished: list[Request]) -> None:
        """Free the slots of finished requests, moving the last active slot into each hole (slots stay 0..n-1)."""
        for req in sorted(finished, key=lambda r: r.slot, reverse=True):
            i, j = req.slot, len(self.active) - 1
            if i != j:
                moved = self.active[j]
                n = self.slot_lengths[j]
                for cache in self.caches + self.mtp_caches:
                    cache[i, :n] = cache[j, :n]
                self.lengths[i] = n
                self.slot_lengths[i] = n
                moved.slot, self.active[i] = i, moved
            self.active.pop()
            req.slot = None

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One scheduler iteration: drop cancelled requests, prefill waiting ones into free slots (batched), then
        one decode step for every active slot. Call from one thread only. Should the model itself fail, the requests
        in flight end with reason "error", the slots are reset and the exception propagates."""
        try:
            return self._step()
        except Exception as e:
            for r in self.active:
                if not r.finished:
                    self._emit([], r, None, "error")
                r.slot = None
            self.active.clear()
            self.last_error = f"{type(e).__name__}: {e}"
            raise

    def _step(self) -> list[Event]:
        events: list[Event] = []
        cancelled = [r for r in self.active if r._cancel]
        for r in cancelled:
            self._emit(events, r, None, "cancelled")
        self._release(cancelled)
        new: list[Request] = []
        with self._lock:
            while self._waiting and len(self.active) + len(new) < self.max_batch_size:
                r = self._waiting.popleft()
                if r._cancel:
                    self._emit(events, r, None, "cancelled")
                else:
                    new.append(r)
        if new:
            t0 = time.perf_counter()
            start = len(self.active)
            for i, r in enumerate(new):
                r.slot = start + i
            self.active.extend(new)
            hidden, tokens, b, lens = self._prefill([r.prompt_ids for r in new], start)
            first, logprobs = self._sample(self.logits(hidden[torch.arange(len(new), device=self.device), lens - 1]),
                                           new)
            if self.speculative:
                self._prefill_mtp(hidden, tokens, b, lens, first, new)
            for r, tok, lp in zip(new, first, logprobs, strict=True):
                self._accept(events, r, tok, lp)
            self.counters["requests"] += len(new)
            self.counters["prompt_tokens"] += sum(len(r.prompt_ids) for r in new)
            self.counters["prefill_seconds"] += time.perf_counter() - t0
            self._release([r for r in new if r.finished])
        if self.active:
            t0 = time.perf_counter()
            if self.speculative:
                self._speculative_decode(events)
            else:
                tokens = torch.tensor([r.output_ids[-1] for r in self.active], device=self.device)
                logits = self.decode(tokens)
                for r, tok, lp in zip(self.active, *self._sample(logits, self.active), strict=True):
                    self._accept(events, r, tok, lp)
            self.counters["decode_steps"] += 1
            self.counters["decode_seconds"] += time.perf_counter() - t0
            self._release([r for r in self.active if r.finished])
        return events

    def _filter(self, logits: torch.Tensor, ps: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [m,V] -> temperature, then top-k and top-p: (probabilities sorted descending with the dropped ones
        zeroed, unnormalised [m,V]; their token ids [m,V])."""
        vocab = logits.shape[-1]
        temp = torch.tensor([p.temperature for p in ps], device=logits.device)[:, None]
        probs, order = F.softmax(logits / temp, dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # probability mass ranked above each token
        top_p = torch.tensor([p.top_p for p in ps], device=logits.device)[:, None]
        top_k = torch.tensor([p.top_k or vocab for p in ps], device=logits.device)[:, None]
        drop = (before >= top_p) | (torch.arange(vocab, device=logits.device) >= top_k)
        drop[:, 0] = False  # always keep the most likely token
        return probs.masked_fill(drop, 0.0), order

    def _probs(self, logits: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
        """The distribution sampling draws from, normalised, in vocabulary order [m,V]."""
        kept, order = self._filter(logits, ps)
        return torch.zeros_like(kept).scatter_(1, order, kept / kept.sum(-1, keepdim=True))

    def _process(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        """Apply each request's logits processors to its row of logits [n,V], in place: penalties, then logit_bias.
        Only the rows that have processors are touched."""
        for i, r in enumerate(reqs):
            if not r.processed:
                continue
            row, p = logits[i], r.params
            if r.counts is not None:
                row.sub_(r.counts * p.frequency_penalty + (r.counts > 0) * p.presence_penalty)
            if r.bias is not None:
                row.index_add_(0, *r.bias)
            if r.grammar is not None:
                self._grammar_mask(row, r)

    def _forbidden(self, r: Request, size: int) -> torch.Tensor | None:
        """[size] bool, True where the request's active grammar forbids the token. Stop tokens are allowed only
        where the grammar is complete. None (and the grammar marked dead) when nothing at all is allowed."""
        g = r.grammar
        allow = g.allowed(size).numpy()  # numpy: a few us for what takes tens in small torch ops
        allow[r.stop_array] = g.accepting
        if not allow.any():  # a dead end (the grammar's own error, e.g. a parser limit): _accept ends the request
            g.dead = g.error or "no token is allowed"
            return None
        return torch.from_numpy(~allow)

    def _grammar_mask(self, row: torch.Tensor, r: Request) -> None:
        """-inf on every token the request's grammar forbids (before its start_after token: on its stop tokens, so
        the free part cannot end the request)."""
        g = r.grammar
        if not g.active:
            row[torch.from_numpy(r.stop_array).to(row.device)] = float("-inf")
            return
        forbid = self._forbidden(r, row.shape[0])
        if forbid is not None:
            row.masked_fill_(forbid.to(row.device), float("-inf"))

    def _sample(self, logits: torch.Tensor, reqs: list[Request]
                ) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]] | None]]:
        """logits [n,V] fp32 -> one token per request: argmax, or temperature / top-k / top-p sampling with the
        request's own generator (one uniform draw per token: reproducible whatever else is in the batch), after the
        request's logits processors. Also (log-probability, top alternatives) per request that asked for them,
        else None: from the distribution the token was drawn from (sampled), or the softmax of the processed logits
        at temperature 1 (greedy)."""
        if any(r.processed for r in reqs):
            self._process(logits, reqs)
        tokens = logits.argmax(-1)
        rows = [i for i, r in enumerate(reqs) if r.generator is not None]
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(reqs)
        if rows:
            kept, order = self._filter(logits[rows], [reqs[i].params for i in rows])
            u = torch.cat([torch.rand(1, generator=reqs[i].generator) for i in rows]).to(logits.device)
            rank = _inverse_cdf(kept, u)  # [m] position of each drawn token in its row's sorted order
            tokens[rows] = order.gather(1, rank[:, None]).squeeze(1)
            for j, i in enumerate(rows):
                k = reqs[i].params.logprobs
                if k is not None:  # kept is sorted descending: the top k are its first k non-zero entries
                    logp = (kept[j] / kept[j].sum()).log()
                    logprobs[i] = (logp[rank[j]].item(), _top(order[j, :k], logp[:k]))
        for i, r in enumerate(reqs):
            if r.generator is None and r.params.logprobs is not None:
                logp = F.log_softmax(logits[i], dim=-1)
                best = logp.topk(r.params.logprobs)
                logprobs[i] = (logp[tokens[i]].item(), _top(best.indices, best.values))
        return tokens.tolist(), logprobs

    # --- convenience front ends -----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop_token_ids: list[int] | None = None, seed: int | None = None,
                 **sampling: object) -> list[list[int]]:
        """New tokens for each prompt (a stop token ends a sequence and is not included). Every request gets the
        same `seed`, so a prompt gives the same tokens here as alone. `sampling`: further SamplingParams fields
        (presence_penalty=..., logit_bias=...)."""
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, stop_token_ids, seed, **sampling)
        reqs = self._enqueue([self._request(p, params, None) for p in prompts])  # all valid, or none queued
        while not all(r.finished for r in reqs):
            if self._thread is not None:
                for r in reqs:
                    r.wait()
            else:
                self.step()
        return [r.output_ids for r in reqs]

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Yield new tokens as they are generated (stepping the engine itself unless a loop thread runs it).
        Closing the generator early cancels the request."""
        import queue

        q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        req = self.submit(prompt_ids, params, on_event=q.put)
        try:
            while True:
                if self._thread is None and q.empty():
                    self.step()
                    continue
                ev = q.get()
                if ev.token_id is not None:
                    yield ev.token_id
                if ev.finish_reason == "error":
                    raise NanoseekError(f"engine: generation failed ({self.last_error})")
                if ev.finish_reason is not None:
                    return
        finally:
            if not req.finished:
                req.cancel()

    # --- background loop ------------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Step while there is work; sleep on the wake-up event otherwise. Returns after stop()."""
        while not self._stop.is_set():
            with self._lock:
                idle = not self._waiting and not self.active
                if idle:
                    self._wake.clear()
            if idle:
                self._wake.wait()
                continue
            try:
                self.step()
            except Exception:  # step() ended the requests in flight with "error"; keep serving the others
                print(f"nanoseek engine: a step failed: {self.last_error}", file=sys.stderr)

    def start(self) -> Engine:
        """Run the engine loop in a daemon thread; submit() / cancel() / Request.wait() from any thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.run_forever, name="nanoseek-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True while the loop thread started by start() is alive (what a health check asks)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None

    # --- statistics -----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float | int]:
        cfg = self.config
        nbytes = self.caches[0].element_size()
        with self._lock:
            waiting = len(self._waiting)
        c = self.counters
        return {
            "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(nbytes),
            "mha_equivalent_bytes_per_token": cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
            * cfg.num_hidden_layers * nbytes,
            "mtp_kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(nbytes, layers=len(self.mtp_layers)),
            "kv_cache_bytes_allocated": sum(t.numel() * t.element_size() for t in self.caches + self.mtp_caches),
            "max_batch_size": self.max_batch_size,
            "max_seq_len": self.max_seq_len,
            **c,
            "active_slots": len(self.active),
            "waiting": waiting,
            "tokens_per_second": c["generated_tokens"] / max(c["decode_seconds"] + c["prefill_seconds"], 1e-9),
            "quant": self.quant or str(self.dtype).removeprefix("torch."),
            "weight_bytes": weight_bytes([vars(lw) for lw in self.layers + self.mtp_layers]
                                         + [self.embed, self.norm, self.lm_head]),
            "speculative": self.speculative,
            "num_speculative_tokens": self.num_speculative_tokens if self.speculative else 0,
            "acceptance_rate": c["accepted_draft_tokens"] / max(c["draft_tokens"], 1),
            # tokens each verify step emits on average: 1 + accepted drafts (V3: ~1.85 with one MTP draft)
            "tokens_per_verify_step": 1 + c["accepted_draft_tokens"] * self.num_speculative_tokens
            / max(c["draft_tokens"], 1) if self.speculative else 1.0,
        }
