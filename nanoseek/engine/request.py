"""What a caller hands the engine and gets back: SamplingParams (validated), Request (one generation's state) and
Event (one step's output for one request).

A Request is created by `Engine.submit` (scheduler.py), which checks the prompt against the model and prepares the
per-request sampling state below: the request's own torch.Generator (so its tokens do not depend on what else shares
the batch), the token counts of the penalties, the logit_bias as tensors, and the grammar state of a constraint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from nanoseek.errors import NanoseekError

if TYPE_CHECKING:
    from nanoseek.engine.scheduler import Engine
    from nanoseek.grammar import Constraint, GrammarState

# temperatures below this sample greedily: logits / 1e-50 overflow fp32 to inf, the softmax turns inf - inf into NaN,
# and the inverse CDF then picks one fixed token. 1e-5 keeps logits / T finite for any |logit| < 3e33.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # v == v: not NaN


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
        checks = [("max_new_tokens", is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
                  ("temperature", is_num(self.temperature) and self.temperature >= 0, ">= 0"),
                  ("top_p", is_num(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
                  ("top_k", is_int(self.top_k) and self.top_k >= 0, "an integer >= 0"),
                  ("seed", self.seed is None or is_int(self.seed), "an integer or None"),
                  ("stop_token_ids", self.stop_token_ids is None or (isinstance(self.stop_token_ids, (list, tuple))
                                                                     and all(map(is_int, self.stop_token_ids))),
                   "a list of integers or None"),
                  ("presence_penalty", is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                   "a number in [-2, 2]"),
                  ("frequency_penalty", is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                   "a number in [-2, 2]"),
                  ("logit_bias", self.logit_bias is None or (
                      isinstance(self.logit_bias, dict) and all(is_int(k) and k >= 0 for k in self.logit_bias)
                      and all(is_num(v) and -100 <= v <= 100 for v in self.logit_bias.values())),
                   "None or a dict of token id -> number in [-100, 100]"),
                  ("logprobs", self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
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
    slot: int | None = None  # the block table row it holds while prefilling or decoding
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of prefilled (the usage's cache hit)
    done: threading.Event = field(default_factory=threading.Event)
    _cancel: bool = False
    _engine: Engine | None = None  # the engine it was submitted to (cancel wakes its loop)

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
