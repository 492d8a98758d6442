"""The Engine: requests in, tokens out. Continuous batching over the runner's cache slots, and the loop thread.

- `submit` validates a request and queues it (thread-safe); `step` runs one scheduler iteration: cancelled requests
  leave, waiting ones are prefilled together (right-padded) into free slots, then every active slot decodes one token
  (or, speculative=True, verifies its drafts: speculative.py); sampling.py turns logits into tokens.
- slots are cache rows, and active requests always hold slots 0..n-1: a finished request's slot is refilled from the
  last slot, so a decode step reads the contiguous rows 0..n-1.
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

from nanoseek.engine.forward import ModelRunner
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
    quant "int8" / "int4" weight-only (quant.py); speculative=True drafts num_speculative_tokens with the MTP module;
    compile=True runs decode steps as compiled graphs (docs/engine.md)."""

    def __init__(self, model: Transformer, max_batch_size: int = 8, max_seq_len: int | None = None,
                 prefill_mode: str = "naive", quant: str | None = None, group_size: int = 32,
                 speculative: bool = False, num_speculative_tokens: int = 1, compile: bool = False):
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
        if compile and quant is not None:
            raise NanoseekError(f"engine: compile=True runs full-precision weights only, not quant={quant!r}")
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
        self.runner = ModelRunner(model, max_batch_size, max_seq_len,
                                  num_speculative_tokens - 1 if speculative else 0, prefill_mode, quant, group_size,
                                  backend)
        self.speculator = Speculator(self.runner, num_speculative_tokens) if self.speculative else None
        self.dtype, self.device = self.runner.dtype, self.runner.device
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
                             decode_seconds=0.0, draft_tokens=0, accepted_draft_tokens=0)

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
        """The latent cache of each layer [max_batch, rows, c + r]."""
        return self.runner.caches

    @property
    def mtp_caches(self) -> list[torch.Tensor]:
        """The MTP module's latent cache(s), same shape."""
        return self.runner.mtp_caches

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
        if self.active:
            raise NanoseekError("engine: perplexity() needs an idle engine (requests are running)")
        return self.runner.perplexity(token_ids, seq_len)

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
        """Free the slots of finished requests, moving the last active slot into each hole (slots stay 0..n-1)."""
        for req in sorted(finished, key=lambda r: r.slot, reverse=True):
            i, j = req.slot, len(self.active) - 1
            if i != j:
                moved = self.active[j]
                self.runner.move_slot(j, i)
                moved.slot, self.active[i] = i, moved
            self.active.pop()
            req.slot = None

    # --- the scheduler iteration ----------------------------------------------------------------------------------
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
            self._prefill(new, events)
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

    def _prefill(self, new: list[Request], events: list[Event]) -> None:
        """Give the new requests the next free slots, prefill their prompts in one batch and sample their first
        tokens (and their first drafts)."""
        t0 = time.perf_counter()
        start = len(self.active)
        for i, r in enumerate(new):
            r.slot = start + i
        self.active.extend(new)
        hidden, tokens, b, lens = self.runner.prefill_hidden([r.prompt_ids for r in new], start)
        first, logprobs = sample(self.runner.logits(hidden[torch.arange(len(new), device=self.device), lens - 1]),
                                 new)
        if self.speculator is not None:
            self.speculator.prefill(hidden, tokens, b, lens, first, new)
        for r, tok, lp in zip(new, first, logprobs, strict=True):
            self._accept(events, r, tok, lp)
        self.counters["requests"] += len(new)
        self.counters["prompt_tokens"] += sum(len(r.prompt_ids) for r in new)
        self.counters["prefill_seconds"] += time.perf_counter() - t0
        self._release([r for r in new if r.finished])

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
            "compiled_graphs": len(self.runner.graphs),
            "compile_seconds": sum(self.runner.graphs.values()),
            "active_slots": len(self.active),
            "waiting": waiting,
            "tokens_per_second": c["generated_tokens"] / max(c["decode_seconds"] + c["prefill_seconds"], 1e-9),
            "quant": self.quant or str(self.dtype).removeprefix("torch."),
            "weight_bytes": self.runner.weight_bytes(),
            "speculative": self.speculative,
            "num_speculative_tokens": self.num_speculative_tokens if self.speculative else 0,
            "acceptance_rate": c["accepted_draft_tokens"] / max(c["draft_tokens"], 1),
            # tokens each verify step emits on average: 1 + accepted drafts (V3: ~1.85 with one MTP draft)
            "tokens_per_verify_step": 1 + c["accepted_draft_tokens"] * self.num_speculative_tokens
            / max(c["draft_tokens"], 1) if self.speculative else 1.0,
        }
