"""The Engine: requests in, tokens out. Continuous batching over the runner's cache slots, and the loop thread.

- `submit` validates a request and queues it (thread-safe); `step` runs one scheduler iteration: cancelled requests
  leave, waiting ones get free slots (reusing the blocks of their longest cached prefix, prefix_cache=True), prompts
  are prefilled together (right-padded; prefill_chunk=N: at most N prompt tokens a step while others decode, so a
  long prompt does not stall them), then every decoding slot decodes one token (or, speculative=True, verifies its
  drafts: speculative.py); sampling.py turns logits into tokens.
- slots are block table rows: decoding requests hold slots 0..d-1 (a decode step reads rows 0..d-1), requests still
  prefilling the next ones, first come first served; when requests leave, the rows move up (a row is a list of block
  ids, so nothing is copied).
- prefix caching (prefix_cache.py): a request's full blocks join the prefix tree when its prompt is prefilled and
  when it finishes; a prompt that would share more whole blocks with a prompt being prefilled than the tree holds
  waits for that prefill, then reuses its blocks.
- one thread owns the loop (`step`, or `start` / `run_forever`); `submit` and `Request.cancel` work from any thread.
- `generate` and `stream` are blocking front ends over the same queue; `stats` reports counters and memory.

The model side (weights, caches, forward, compiled graphs) is forward.ModelRunner; the Engine exposes its state as
its own (`caches`, `layers`, `forward`, `prefill`, `decode`, ...).
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from nanoseek.engine import native as native_path
from nanoseek.engine.forward import ModelRunner
from nanoseek.engine.prefix_cache import BLOCK_SIZE, DiskTier, PrefixTree, model_identity, shared_blocks
from nanoseek.engine.request import Event, Request, SamplingParams, is_int
from nanoseek.engine.sampling import Logprobs, sample
from nanoseek.engine.speculative import Speculator
from nanoseek.engine.weights import LayerWeights
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.quant import QuantizedWeight, check_mode


class Engine:
    """Continuous-batching inference over a Transformer's weights: up to max_batch_size requests of prompt + output
    <= max_seq_len tokens. prefill_mode "naive" (expanded k/v, fused SDPA) or "absorbed" (the decode attention);
    quant "int8" / "int4" weight-only (quant.py); speculative=True drafts num_speculative_tokens with the MTP module
    (draft_quant: that module in int8 / int4 whatever the main model's precision);
    compile=True runs decode steps as compiled graphs; native=None (auto) runs them through the native CPU kernels
    where they can run, True insists, False keeps the PyTorch path (docs/engine.md).

    prefix_cache=True shares the latent blocks of cached prompt prefixes across requests (prefix_cache.py), in
    cache_budget_bytes of blocks beyond the slots' own (default: as much again as the slots'), with their files in
    cache_dir (kept under cache_disk_bytes) when given. prefill_chunk=N prefills at most N prompt tokens a step
    while requests are decoding."""

    def __init__(self, model: Transformer, max_batch_size: int = 8, max_seq_len: int | None = None,
                 prefill_mode: str = "naive", quant: str | None = None, group_size: int = 32,
                 speculative: bool = False, num_speculative_tokens: int = 1, compile: bool = False,
                 native: bool | None = None, draft_quant: str | None = None,
                 prefix_cache: bool = False, cache_budget_bytes: int | None = None, cache_dir: str | Path | None = None,
                 cache_disk_bytes: int | None = None, prefill_chunk: int | None = None):
        cfg = model.config
        if max_seq_len is None:
            max_seq_len = min(cfg.max_position_embeddings, 4096)
        if not is_int(max_batch_size) or max_batch_size < 1:
            raise NanoseekError(f"engine: max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not is_int(max_seq_len) or not 2 <= max_seq_len <= cfg.max_position_embeddings:
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
        if not is_int(num_speculative_tokens) or not 1 <= num_speculative_tokens <= 8:
            raise NanoseekError(f"engine: num_speculative_tokens must be an integer in [1, 8], got "
                                f"{num_speculative_tokens!r}")
        if draft_quant is not None:
            check_mode(draft_quant, group_size)
            if not speculative:
                raise NanoseekError("engine: draft_quant quantises the MTP module that drafts for speculative=True; "
                                    "this engine does not speculate")
            if compile:
                raise NanoseekError(f"engine: compile=True runs full-precision weights only, not "
                                    f"draft_quant={draft_quant!r}")
        if compile and quant is not None:
            raise NanoseekError(f"engine: compile=True runs full-precision weights only, not quant={quant!r}")
        if cache_budget_bytes is not None and (not is_int(cache_budget_bytes) or cache_budget_bytes < 0):
            raise NanoseekError(f"engine: cache_budget_bytes must be an integer >= 0, got {cache_budget_bytes!r}")
        if cache_disk_bytes is not None and (not is_int(cache_disk_bytes) or cache_disk_bytes < 1):
            raise NanoseekError(f"engine: cache_disk_bytes must be an integer >= 1, got {cache_disk_bytes!r}")
        if cache_dir is not None and not prefix_cache:
            raise NanoseekError("engine: cache_dir needs prefix_cache=True")
        if prefill_chunk is not None and (not is_int(prefill_chunk) or prefill_chunk < 1):
            raise NanoseekError(f"engine: prefill_chunk must be an integer >= 1 or None, got {prefill_chunk!r}")
        self.speculative = bool(speculative)
        self.num_speculative_tokens = num_speculative_tokens  # k drafts verified per step (speculative=True)
        self.model: Transformer | None = model  # None after from_pretrained(quant=...): only the engine needs it
        self.config = cfg
        self.quant, self.group_size = quant, group_size
        self.max_batch_size, self.max_seq_len, self.prefill_mode = max_batch_size, max_seq_len, prefill_mode
        # compile=True: decode steps (and speculative verification) run torch.compile'd graphs (docs/engine.md)
        self.compile = bool(compile)
        backend = None
        if self.compile:
            import nanoseek.engine  # the package's COMPILE_BACKEND, read here so that a test can swap it

            backend = nanoseek.engine.COMPILE_BACKEND
        # a verify step reads k drafts past the last token, so it may write up to k - 1 cache rows past max_seq_len
        # (their tokens are never emitted: the request's length limit ends it first)
        spare = num_speculative_tokens - 1 if speculative else 0
        # bytes of one block of the caches: every layer's latents, and the MTP module's (same block ids)
        self.block_bytes = (BLOCK_SIZE * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                            * (len(model.layers) + len(model.mtp)) * model.embed_tokens.weight.element_size())
        cache_blocks = 0
        if prefix_cache:  # the default budget: as many blocks again as the slots' own rows
            slots = max_batch_size * -(-(max_seq_len + spare) // BLOCK_SIZE)
            cache_blocks = slots if cache_budget_bytes is None else cache_budget_bytes // self.block_bytes
        self.runner = ModelRunner(model, max_batch_size, max_seq_len, spare, prefill_mode, quant, group_size,
                                  backend, draft_quant=draft_quant, cache_blocks=cache_blocks)
        # decode steps (and speculative verify / MTP drafts) through the native kernels where they can run: native
        # None = auto, True = refuse where they cannot, False = the PyTorch path (engine/native.py)
        self.runner.native, self.runner.decode_path = native_path.choose(self.runner, native, self.compile)
        self.prefix_cache = bool(prefix_cache)
        self.prefill_chunk = prefill_chunk
        self.tree: PrefixTree | None = None
        if self.prefix_cache:
            disk = None
            if cache_dir is not None:
                mtp = 1 if speculative else 0  # the MTP module's latents are cached (and stored) when they are used
                identity = model_identity(cfg.to_hf_dict(), model.state_dict(), dtype=self.runner.dtype, quant=quant,
                                          group_size=group_size if quant == "int4" else None, block_size=BLOCK_SIZE,
                                          mtp_layers=mtp, prefill_mode=prefill_mode)
                disk = DiskTier(cache_dir, identity, BLOCK_SIZE, len(self.runner.layers) + mtp,
                                cfg.kv_lora_rank + cfg.qk_rope_head_dim, self.runner.dtype, cache_disk_bytes)
            self.tree = PrefixTree(self.runner.pool, BLOCK_SIZE, disk)
        self.speculator = Speculator(self.runner, num_speculative_tokens) if self.speculative else None
        self.dtype, self.device = self.runner.dtype, self.runner.device
        # scheduler state: `active[i]` (decoding) owns slot i, `prefilling[j]` slot len(active) + j; `_waiting` is fed
        # by submit() from any thread
        self.active: list[Request] = []
        self.prefilling: list[Request] = []
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error: str | None = None  # the exception that failed the last requests ending with "error"
        # prompt_tokens: of the prefilled prompts; cached_prompt_tokens: of those, read from the prefix cache;
        # prefill_tokens: computed by prefill (prompt_tokens - cached_prompt_tokens, + any recomputed block end)
        self.counters = dict(requests=0, prompt_tokens=0, cached_prompt_tokens=0, prefill_tokens=0, prefill_steps=0,
                             generated_tokens=0, decode_steps=0, prefill_seconds=0.0, decode_seconds=0.0,
                             draft_tokens=0, accepted_draft_tokens=0)

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

    # --- the runner's state and forward, as the engine's ----------------------------------------------------------
    @property
    def layers(self) -> list[LayerWeights]:
        """LayerWeights of the main blocks."""
        return self.runner.layers

    @property
    def mtp_layers(self) -> list[LayerWeights]:
        """LayerWeights of the MTP module(s)."""
        return self.runner.mtp_layers

    @property
    def embed(self) -> torch.Tensor:
        """The token embedding [V, D]."""
        return self.runner.embed

    @property
    def norm(self) -> torch.Tensor:
        """The final norm's weight [D]."""
        return self.runner.norm

    @property
    def lm_head(self) -> torch.Tensor | QuantizedWeight:
        """The output projection [V, D] (quantised with quant=...)."""
        return self.runner.lm_head

    @property
    def caches(self) -> list[torch.Tensor]:
        """The paged latent cache of each layer [num_blocks, block_size, c + r] (a slot's positions: through
        `block_table`; `kv_cache` / `pe_cache` gather them per slot)."""
        return self.runner.caches

    @property
    def mtp_caches(self) -> list[torch.Tensor]:
        """The MTP module's latent cache(s), same shape and block tables."""
        return self.runner.mtp_caches

    @property
    def block_table(self) -> torch.Tensor:
        """[max_batch, blocks per slot] int32: the blocks holding each slot's positions 0, bs, 2 bs, ..."""
        return self.runner.block_table

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens cached per slot [max_batch]."""
        return self.runner.lengths

    @property
    def slot_lengths(self) -> list[int]:
        """Tokens cached per slot, as a list."""
        return self.runner.slot_lengths

    def kv_cache(self, layer: int) -> torch.Tensor:
        """[max_batch, rows, kv_lora_rank]: kv_a_layernorm(c_kv) per cached token."""
        return self.runner.kv_cache(layer)

    def pe_cache(self, layer: int) -> torch.Tensor:
        """[max_batch, rows, qk_rope_head_dim]: k_pe after RoPE per cached token."""
        return self.runner.pe_cache(layer)

    def forward(self, tokens: torch.Tensor, start: int = 0, fresh: bool = False) -> torch.Tensor:
        """ModelRunner.forward: tokens [B,S] into slots start.. -> hidden states [B,S,D]; advances the lengths."""
        return self.runner.forward(tokens, start, fresh)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> fp32 logits [..., V]."""
        return self.runner.logits(hidden)

    def prefill(self, prompts: list[list[int]], start: int = 0) -> torch.Tensor:
        """ModelRunner.prefill: prompts into slots start.. -> last-position logits [n,V]."""
        return self.runner.prefill(prompts, start)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """ModelRunner.decode: one token per slot for slots 0..n-1 (tokens [n]) -> logits [n,V]."""
        return self.runner.decode(tokens)

    def perplexity(self, token_ids: list[int] | torch.Tensor, seq_len: int = 256) -> float:
        """exp(mean next-token NLL) over token_ids in windows of seq_len (ModelRunner.perplexity): through this
        engine's own forward, its dtype and quantised weights. Uses cache slots 0.., so not while requests run."""
        if self.active or self.prefilling:
            raise NanoseekError("engine: perplexity() needs an idle engine (requests are running)")
        try:
            return self.runner.perplexity(token_ids, seq_len)
        finally:
            self.runner.permute_slots([])  # give the rows it used back

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
        bad = next((t for t in prompt_ids if not is_int(t) or not 0 <= t < vocab), None)
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
              logprob: Logprobs | None = None) -> None:
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

    def _accept(self, events: list[Event], req: Request, token: int, logprob: Logprobs | None = None) -> None:
        """Record a sampled token: a stop token ends the request (and is not emitted), so does the length limit, and
        so does a complete grammar (after its last token)."""
        g = req.grammar
        if g is not None and g.dead is not None:  # no token was allowed (sampling.forbidden)
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
        """Free the slots of finished (or cancelled) requests: their full blocks join the prefix tree, and the other
        slots move up (decoding requests in slots 0..d-1, then the ones prefilling)."""
        if not finished:
            return
        if self.tree is not None:
            for r in finished:
                if r.finish_reason != "error":  # the cache holds the tokens fed so far: the prompt, then the output
                    seq = r.prompt_ids + r.output_ids
                    self.tree.insert(seq[:self.runner.slot_lengths[r.slot]], self.runner.slot_blocks[r.slot],
                                     self._save_block)
        self.active = [r for r in self.active if r not in finished]
        self.prefilling = [r for r in self.prefilling if r not in finished]
        self._relayout()
        for r in finished:
            r.slot = None

    def _relayout(self) -> None:
        """Slots 0.. for self.active, then self.prefilling, in order (moving block table rows, not latents)."""
        order = self.active + self.prefilling
        self.runner.permute_slots([r.slot for r in order])
        for i, r in enumerate(order):
            r.slot = i

    # --- the prefix cache -----------------------------------------------------------------------------------------
    def _save_block(self, block: int) -> torch.Tensor:
        return self.runner.block_data(block, mtp=self.speculative)

    def _place(self, req: Request) -> bool:
        """Give a waiting request the next slot: the blocks of its longest cached prefix, fresh blocks for the rest
        of its prompt and output; its prefill starts after the prefix. False (nothing held) when it should wait:
        a prompt being prefilled shares more whole blocks with it than the tree holds (its blocks are in the tree
        once that prefill ends)."""
        runner, bs = self.runner, self.runner.block_size
        n = len(req.prompt_ids)
        matched: list[int] = []
        if self.tree is not None:
            most = (n - 1) // bs  # whole blocks, and at least one prompt token left to prefill (for its logits)
            matched = self.tree.match(req.prompt_ids, most, runner.set_block_data)
            for other in self.prefilling:
                if shared_blocks(other.prompt_ids, req.prompt_ids, bs, most) > len(matched):
                    runner.pool.drop(matched)
                    return False
        start = len(matched) * bs
        row = list(matched)
        if matched and self.speculative:
            # the MTP cache at the prefix's last position pairs it with the next token, which is this request's own:
            # recompute that position (main and MTP) into a private copy of the last block (copy on write)
            (cow,) = runner.pool.allocate(1)
            runner.copy_block(matched[-1], cow)
            row[-1] = cow
            start -= 1
        # every position the request may write: prompt, output, and a verify step's drafts past the last token
        need = min(runner.blocks_per_slot, -(-(n + req.max_new_tokens + runner.rows - self.max_seq_len) // bs))
        row += runner.pool.allocate(need - len(row))
        req.slot = len(self.active) + len(self.prefilling)
        runner.assign(req.slot, row)
        runner.pool.drop(matched)  # the row holds them now
        runner.set_lengths(req.slot, [start])
        req.cached_tokens = start
        self.prefilling.append(req)
        return True

    # --- the scheduler iteration ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One scheduler iteration: drop cancelled requests, give waiting ones free slots, prefill (a chunk of) the
        waiting prompts (batched), then one decode step for every decoding slot. Call from one thread only. Should
        the model itself fail, the requests in flight end with reason "error", the slots are reset and the exception
        propagates."""
        try:
            return self._step()
        except Exception as e:
            for r in self.active + self.prefilling:
                if not r.finished:
                    self._emit([], r, None, "error")
                r.slot = None
            self.active.clear()
            self.prefilling.clear()
            self.runner.permute_slots([])
            self.last_error = f"{type(e).__name__}: {e}"
            raise

    def _step(self) -> list[Event]:
        events: list[Event] = []
        cancelled = [r for r in self.active + self.prefilling if r._cancel]
        for r in cancelled:
            self._emit(events, r, None, "cancelled")
        self._release(cancelled)
        self._admit(events)
        if self.prefilling:
            self._prefill(events)
        if self.active:
            t0 = time.perf_counter()
            if self.speculator is not None:
                emitted = self.speculator.decode(self.active)
                self.counters["draft_tokens"] += len(emitted) * self.num_speculative_tokens
                self.counters["accepted_draft_tokens"] += sum(len(row) - 1 for row in emitted)
                for r, row in zip(self.active, emitted, strict=True):
                    for t in row:
                        self._accept(events, r, t)
                        if r.finished:
                            break
            else:
                tokens = torch.tensor([r.output_ids[-1] for r in self.active]).to(self.device, non_blocking=True)
                logits = self.runner.decode(tokens)
                for r, tok, lp in zip(self.active, *sample(logits, self.active), strict=True):
                    self._accept(events, r, tok, lp)
            self.counters["decode_steps"] += 1
            self.counters["decode_seconds"] += time.perf_counter() - t0
            self._release([r for r in self.active if r.finished])
        return events

    def _admit(self, events: list[Event]) -> None:
        """Waiting requests into the free slots, first come first served (a request waiting for another's prefill,
        see _place, keeps its place in the queue)."""
        free = self.max_batch_size - len(self.active) - len(self.prefilling)
        picked: list[Request] = []
        with self._lock:
            while self._waiting and len(picked) < free:
                r = self._waiting.popleft()
                if r._cancel:
                    self._emit(events, r, None, "cancelled")
                else:
                    picked.append(r)
        later = [r for r in picked if not self._place(r)]
        if later:
            with self._lock:
                self._waiting.extendleft(reversed(later))

    def _prefill(self, events: list[Event]) -> None:
        """Prefill the prompts waiting in the prefilling slots, first come first served, in one right-padded batch:
        at most prefill_chunk tokens in all while requests are decoding (they wait for the prefill), every prompt
        whole otherwise (chunks cost more than one pass: each attends to all the prompt before it). The requests
        whose prompts are complete sample their first tokens (and their first drafts) and join the decoding
        slots."""
        t0 = time.perf_counter()
        budget = self.prefill_chunk if self.prefill_chunk and self.active else sys.maxsize
        rows: list[tuple[Request, int, int]] = []  # (request, first position, tokens)
        for r in self.prefilling:
            pos = self.runner.slot_lengths[r.slot]
            n = min(len(r.prompt_ids) - pos, budget)
            rows.append((r, pos, n))
            budget -= n
            if budget <= 0:
                break
        # only the last row can be cut short, so the complete ones are the first k (slots len(active)..+k-1)
        done = [r for r, pos, n in rows if pos + n == len(r.prompt_ids)]
        hidden, tokens, b, lens = self.runner.prefill_hidden([r.prompt_ids[pos:pos + n] for r, pos, n in rows],
                                                             len(self.active), [pos for _, pos, _ in rows])
        first: list[int] = []
        logprobs: list = []
        if done:
            k = torch.arange(len(done), device=self.device)
            first, logprobs = sample(self.runner.logits(hidden[k, lens[:len(done)] - 1]), done)
        if self.speculator is not None:
            # the MTP module pairs position i with token i + 1: the prompt's next, or the token just sampled
            nxt = torch.zeros_like(tokens)
            for i, (r, pos, n) in enumerate(rows):
                nxt[i, :n] = torch.tensor(r.prompt_ids[pos + 1:pos + n + 1] + first[i:i + 1], device=self.device)
            self.speculator.prefill(hidden, nxt, b, lens, done)
        self.prefilling = self.prefilling[len(done):]
        self.active.extend(done)
        for r, tok, lp in zip(done, first, logprobs, strict=True):
            if self.tree is not None:  # the prompt's full blocks, for the requests that share them from now on
                self.tree.insert(r.prompt_ids, self.runner.slot_blocks[r.slot], self._save_block)
            self._accept(events, r, tok, lp)
        self.counters["requests"] += len(done)
        self.counters["prompt_tokens"] += sum(len(r.prompt_ids) for r in done)
        self.counters["cached_prompt_tokens"] += sum(r.cached_tokens for r in done)
        self.counters["prefill_tokens"] += sum(n for _, _, n in rows)
        self.counters["prefill_steps"] += 1
        self.counters["prefill_seconds"] += time.perf_counter() - t0
        self._release([r for r in done if r.finished])

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
                idle = not self._waiting and not self.active and not self.prefilling
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
            "decode_path": self.runner.decode_path,
            "native": self.runner.native is not None,
            "compiled_graphs": len(self.runner.graphs),
            "compile_seconds": sum(self.runner.graphs.values()),
            "compile_cache": None if self.runner.compile_cache is None else str(self.runner.compile_cache),
            "active_slots": len(self.active) + len(self.prefilling),
            "prefilling": len(self.prefilling),
            "waiting": waiting,
            "tokens_per_second": c["generated_tokens"] / max(c["decode_seconds"] + c["prefill_seconds"], 1e-9),
            "quant": self.quant or str(self.dtype).removeprefix("torch."),
            "weight_bytes": self.runner.weight_bytes(),
            "speculative": self.speculative,
            "num_speculative_tokens": self.num_speculative_tokens if self.speculative else 0,
            "draft_quant": self.runner.draft_quant,
            "acceptance_rate": c["accepted_draft_tokens"] / max(c["draft_tokens"], 1),
            # tokens each verify step emits on average: 1 + accepted drafts (V3: ~1.85 with one MTP draft)
            "tokens_per_verify_step": 1 + c["accepted_draft_tokens"] * self.num_speculative_tokens
            / max(c["draft_tokens"], 1) if self.speculative else 1.0,
            **self.cache_stats(),
        }

    def cache_stats(self) -> dict[str, float | int | bool | None]:
        """The paged cache and the prefix cache: blocks, what the tree holds, the hit rate (prompt tokens read from
        the cache / prompt tokens prefilled) and the disk tier's files."""
        runner, tree, c = self.runner, self.tree, self.counters
        disk = tree.disk if tree is not None else None
        cached = len(tree) if tree is not None else 0
        return {
            "prefix_cache": self.prefix_cache,
            "prefill_chunk": self.prefill_chunk,
            "block_size": runner.block_size,
            "cache_blocks": runner.num_blocks - 1,
            "cache_blocks_used": runner.pool.used,
            # bytes per cached token: every layer's latent (and the MTP module's, cached with the same blocks)
            "prefix_cache_bytes_per_token": self.block_bytes // runner.block_size,
            "prefix_cache_budget_bytes": (runner.num_blocks - 1 - self.max_batch_size * runner.blocks_per_slot)
            * self.block_bytes,
            "prefix_cache_blocks": cached,
            "prefix_cache_tokens": cached * runner.block_size,
            "prefix_cache_bytes": cached * self.block_bytes,
            "prefix_cache_hit_rate": c["cached_prompt_tokens"] / max(c["prompt_tokens"], 1),
            "prefix_cache_disk_hit_blocks": tree.disk_hit_blocks if tree is not None else 0,
            "prefix_cache_disk_bytes": disk.bytes if disk is not None else 0,
            "prefix_cache_disk_writes": disk.writes if disk is not None else 0,
        }
