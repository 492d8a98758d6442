"""Fast CPU inference: absorbed MLA over a latent KV cache, continuous batching, per-request sampling.

    from nanoseek.engine import Engine, SamplingParams
    engine = Engine.from_pretrained("runs/pretrain/final", max_batch_size=16)
    engine.generate([prompt_ids], max_new_tokens=64, temperature=0.7, seed=0)

The engine reads a `Transformer`'s weights (model.py) and runs its own serving forward pass (docs/engine.md):
- latent cache (V3 "absorb" mode), paged: per layer one buffer [num_blocks, 16, c + r] whose columns [:c] are
  `kv_cache` = kv_a_layernorm(c_kv) and [c:] are `pe_cache` = RoPE(k_pe), so q.k is one matmul; a block table per
  slot; prefix_cache=True shares the blocks of cached prompt prefixes (a radix tree, LRU, an on-disk tier);
- absorbed decode: q_lat = q_nope W_UK, scores = [q_lat ; q_pe] . [kv_cache ; pe_cache] * softmax_scale + mask
  (softmax in fp32), o = (p . kv_cache) W_UV^T -> o_proj: per-head keys and values are never expanded;
- prefill expands k/v from the fresh latent for fused causal SDPA (flash kernel, O(T) memory; measured faster);
- continuous batching: slots are block table rows, decoding requests always hold slots 0..n-1 (rows move up when
  one leaves), new requests are prefilled together (right-padded; prefill_chunk=N: N tokens a step) between decode
  steps;
- sampling per request with its own torch.Generator: reproducible whatever shares the batch;
- weight-only int8 / int4 (quant.py): every projection goes through `layers.linear`, which dispatches on the weight
  type;
- MTP speculative decoding (speculative=True): the MTP module drafts k tokens from the main model's last hidden
  state, the main model verifies [last token, drafts] in one forward, both caches roll back on rejection;
- compile=True: decode steps run as torch.compile'd graphs without data-dependent shapes (the MoE gathers the selected
  experts' weights per (token, expert) pair; batch-1 projections are multiply-and-sums that inductor fuses).
One thread owns the loop (`step`, or `start` / `run_forever`); `submit` and `Request.cancel` work from any thread.

Reading order, bottom up (each module imports only the ones above it):
  request.py      SamplingParams (validated), Request, Event
  sampling.py     logits processors, temperature / top-k / top-p, the per-request draw, log-probabilities
  weights.py      LayerWeights: one block's weights in the engine's fused / absorbed layout
  layers.py       one block's forward over its latent cache: absorbed MLA, the MoE, and the Batch they are fed
  prefix_cache.py the paged cache's block pool, the prefix tree (shared prefixes, LRU eviction), the disk tier
  forward.py      ModelRunner: weights, caches, prefill / decode / perplexity, the MTP module, compiled graphs
  speculative.py  MTP drafts and their verification (speculative sampling)
  scheduler.py    Engine: submit, step (continuous batching), generate / stream, the loop thread, stats

Shapes: B batch rows (slots), S new tokens per row, T attended cache length, D hidden, H heads, c kv_lora_rank,
r qk_rope_head_dim, V vocab, N = B*S tokens, E routed experts, K experts per token.
"""

from nanoseek.engine.request import GREEDY_TEMPERATURE, MAX_LOGPROBS, Event, Request, SamplingParams
from nanoseek.engine.scheduler import Engine

# torch.compile backend of compile=True, read when an Engine is built: inductor generates fused C++ for the CPU. Tests
# swap in "aot_eager" (the same graph capture, no code generation) to check the static-shape path in seconds instead
# of a minute a graph.
COMPILE_BACKEND = "inductor"

__all__ = ["COMPILE_BACKEND", "GREEDY_TEMPERATURE", "MAX_LOGPROBS", "Engine", "Event", "Request", "SamplingParams"]
