"""From logits to tokens, per request: logits processors, temperature / top-k / top-p, the draw, log-probabilities.

Every function takes a batch of rows, logits [n,V] fp32, and the requests (or their SamplingParams) row by row, so
one decode step samples every active request at once whatever each asked for:
- `process`: OpenAI's presence / frequency penalties, then logit_bias, then a constraint's grammar mask (-inf on the
  tokens its grammar forbids), in place, on the rows that have any;
- `filter_probs` / `probabilities`: temperature, then top-k and top-p, as the distribution a token is drawn from
  (speculative.py tests drafts against the same distributions);
- `sample`: argmax for greedy rows; one uniform draw from the request's own torch.Generator per token for sampled
  rows, turned into a token by the inverse CDF (over the sorted, filtered distribution; or, for a row with no top-k /
  top-p cut and no logprobs, over the softmax in vocabulary order, which needs no sort), so a request's tokens are
  reproducible whatever shares its batch.

Shapes: n rows, m sampled rows, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.engine.request import Request, SamplingParams

# an emitted token's log-probability and its distribution's most likely (token id, log-probability) pairs
Logprobs = tuple[float, list[tuple[int, float]]]


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [m,V] (unnormalised, >= 0), u [m] uniform in [0,1) -> the first index whose CDF exceeds u * total."""
    cdf = probs.cumsum(-1)
    return (cdf <= u[:, None].to(cdf.device) * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)


def filter_probs(logits: torch.Tensor, ps: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [m,V] -> temperature, then top-k and top-p: (probabilities sorted descending with the dropped ones
    zeroed, unnormalised [m,V]; their token ids [m,V])."""
    vocab = logits.shape[-1]
    # the host's values reach the device with non_blocking copies (on CUDA queued, not waited for)
    temp = torch.tensor([p.temperature for p in ps]).to(logits.device, non_blocking=True)[:, None]
    probs, order = F.softmax(logits / temp, dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(-1) - probs  # probability mass ranked above each token
    top_p = torch.tensor([p.top_p for p in ps]).to(logits.device, non_blocking=True)[:, None]
    top_k = torch.tensor([p.top_k or vocab for p in ps]).to(logits.device, non_blocking=True)[:, None]
    drop = (before >= top_p) | (torch.arange(vocab, device=logits.device) >= top_k)
    drop[:, 0] = False  # always keep the most likely token
    return probs.masked_fill(drop, 0.0), order


def uncut(p: SamplingParams, vocab: int) -> bool:
    """No top-k or top-p cut and no logprobs asked for: the token can be drawn from the softmax without sorting."""
    return p.top_p >= 1.0 and (not p.top_k or p.top_k >= vocab) and p.logprobs is None


def probabilities(logits: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
    """The distribution sampling draws from, normalised, in vocabulary order [m,V]."""
    kept, order = filter_probs(logits, ps)
    return torch.zeros_like(kept).scatter_(1, order, kept / kept.sum(-1, keepdim=True))


def process(logits: torch.Tensor, reqs: list[Request]) -> None:
    """Apply each request's logits processors to its row of logits [n,V], in place: penalties, then logit_bias, then
    the grammar mask. Only the rows that have processors are touched."""
    for i, r in enumerate(reqs):
        if not r.processed:
            continue
        row, p = logits[i], r.params
        if r.counts is not None:
            row.sub_(r.counts * p.frequency_penalty + (r.counts > 0) * p.presence_penalty)
        if r.bias is not None:
            row.index_add_(0, *r.bias)
        if r.grammar is not None:
            grammar_mask(row, r)


def forbidden(r: Request, size: int) -> torch.Tensor | None:
    """[size] bool, True where the request's active grammar forbids the token. Stop tokens are allowed only where the
    grammar is complete. None (and the grammar marked dead) when nothing at all is allowed."""
    g = r.grammar
    allow = g.allowed(size).numpy()  # numpy: a few us for what takes tens in small torch ops
    allow[r.stop_array] = g.accepting
    if not allow.any():  # a dead end (the grammar's own error, e.g. a parser limit): the scheduler ends the request
        g.dead = g.error or "no token is allowed"
        return None
    return torch.from_numpy(~allow)


def grammar_mask(row: torch.Tensor, r: Request) -> None:
    """-inf on every token the request's grammar forbids (before its start_after token: on its stop tokens, so the
    free part cannot end the request)."""
    g = r.grammar
    if not g.active:
        row[torch.from_numpy(r.stop_array).to(row.device)] = float("-inf")
        return
    forbid = forbidden(r, row.shape[0])
    if forbid is not None:
        row.masked_fill_(forbid.to(row.device), float("-inf"))


def _top(ids: torch.Tensor, logp: torch.Tensor) -> list[tuple[int, float]]:
    """(token id, log-probability) pairs, most likely first, without the impossible tokens (log-probability -inf)."""
    return [(t, v) for t, v in zip(ids.tolist(), logp.tolist(), strict=True) if v != float("-inf")]


def sample(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[Logprobs | None]]:
    """logits [n,V] fp32 -> one token per request: argmax, or temperature / top-k / top-p sampling with the request's
    own generator (one uniform draw per token: reproducible whatever else is in the batch), after the request's
    logits processors (which modify `logits` in place). Also (log-probability, top alternatives) per request that
    asked for them, else None: from the distribution the token was drawn from (sampled), or the softmax of the
    processed logits at temperature 1 (greedy)."""
    if any(r.processed for r in reqs):
        process(logits, reqs)
    tokens = logits.argmax(-1)
    rows = [i for i, r in enumerate(reqs) if r.generator is not None]
    logprobs: list[Logprobs | None] = [None] * len(reqs)
    # rows with no top-k / top-p cut and no logprobs (GRPO's rollouts) draw from the softmax in vocabulary order: no
    # [m,V] sort, which took ~40% of a decode step at batch 64 with a 4096-token vocabulary. Chosen row by row, so a
    # request's tokens still depend only on its own parameters and generator, whatever shares its batch.
    plain = [i for i in rows if uncut(reqs[i].params, logits.shape[-1])]
    if plain:
        temp = torch.tensor([reqs[i].params.temperature for i in plain], device=logits.device)[:, None]
        u = torch.cat([torch.rand(1, generator=reqs[i].generator) for i in plain]).to(logits.device)
        tokens[plain] = inverse_cdf(F.softmax(logits[plain] / temp, dim=-1), u)
    rows = [i for i in rows if i not in set(plain)]
    if rows:
        kept, order = filter_probs(logits[rows], [reqs[i].params for i in rows])
        u = torch.cat([torch.rand(1, generator=reqs[i].generator) for i in rows]).to(logits.device, non_blocking=True)
        rank = inverse_cdf(kept, u)  # [m] position of each drawn token in its row's sorted order
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
