"""MTP speculative decoding (speculative=True): the checkpoint's MTP module drafts k tokens, the main model verifies
them in one (k+1)-token forward per slot, and every emitted token is what plain decoding would have emitted.

- draft: the MTP module reads the main model's last hidden state and the token just sampled, and predicts the token
  after it (draft 1); drafts 2..k chain the module on its own output, as V3's sequential MTP feeds depth j the output
  of depth j - 1 (module 1 stands in for the deeper ones);
- verify (`verify`): greedy drafts are accepted while they equal the main model's argmax; sampled drafts by
  speculative sampling (Leviathan et al. 2023), so the output distribution is exactly the main model's;
- roll back: the main and MTP caches of rejected positions lie past the slot's new length, hidden by the mask and
  overwritten by the next step.

Shapes: n slots (rows), k drafts per row, V vocabulary, D hidden, m sampled rows.
"""

from __future__ import annotations

import torch

from nanoseek.engine.forward import ModelRunner
from nanoseek.engine.layers import Batch
from nanoseek.engine.request import Request
from nanoseek.engine.sampling import inverse_cdf, probabilities


def verify(logits: torch.Tensor, drafts: torch.Tensor, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n,k+1,V] of the main model at [last token, d_1..d_k], drafts [n,k] -> (tokens [n,k+1], accepted [n]):
    row i emits tokens[i, :accepted[i] + 1], its accepted drafts and then one token of the main model's (at the first
    rejected position, or the bonus token after k accepted drafts).

    Greedy: d_j is accepted while it equals the argmax, so the output is plain greedy decoding. Sampled (speculative
    sampling, position by position): d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); the first
    rejection draws from normalise(max(p_j - q_j, 0)) instead. p and q are the main and MTP distributions after
    temperature / top-k / top-p (each request's draft_probs hold its q), so every emitted token is distributed
    exactly as plain sampling from p. k + 1 uniform draws per request and step."""
    k = drafts.shape[1]
    out = logits.argmax(-1)
    accepted = (out[:, :k] == drafts).long().cumprod(1).sum(1)
    rows = [i for i, r in enumerate(reqs) if r.generator is not None]
    if rows:
        m = len(rows)
        ps = [reqs[i].params for i in rows]
        p = probabilities(logits[rows].flatten(0, 1), [x for x in ps for _ in range(k + 1)]).view(m, k + 1, -1)
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
        tokens[ar, acc] = inverse_cdf(residual[ar, acc], u[:, k])
        out[rows] = tokens
        accepted[rows] = acc
    return out, accepted


class Speculator:
    """Drafts with the runner's MTP module and verifies them with its main model, k drafts per slot and step."""

    def __init__(self, runner: ModelRunner, num_speculative_tokens: int):
        self.runner, self.k = runner, num_speculative_tokens

    def draft_one(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """MTP logits [n,V] -> one draft per request [n]: the argmax, or for a sampled request a draw from its
        filtered MTP distribution q (appended to request.draft_probs for the acceptance test)."""
        drafts = logits.argmax(-1)
        rows = [i for i, r in enumerate(reqs) if r.generator is not None]
        if rows:
            q = probabilities(logits[rows], [reqs[i].params for i in rows])
            drafts[rows] = inverse_cdf(q, torch.cat([torch.rand(1, generator=reqs[i].generator) for i in rows]))
            for j, i in enumerate(rows):
                reqs[i].draft_probs.append(q[j])
        return drafts

    def draft(self, h: torch.Tensor, logits: torch.Tensor, lens: list[int], reqs: list[Request],
              start: int = 0) -> None:
        """k drafts per request, into request.drafts. h [n,D] and logits [n,V] are the MTP module's output at each
        slot's last read position lens[i] - 1, which predicts the token after the one just sampled: draft 1. Drafts
        2..k chain the module on its own output: position lens[i] + j - 2 pairs the previous h' with draft j - 1.
        Those MTP cache rows hold guesses; the next verify step overwrites them with the main model's own states."""
        runner = self.runner
        for r in reqs:
            r.draft_probs = []
        if self.k == 1 and all(r.generator is None for r in reqs):  # greedy, one draft: its argmax
            for r, d in zip(reqs, logits.argmax(-1).tolist(), strict=True):
                r.drafts = [d]
            return
        cols = [self.draft_one(logits, reqs)]
        for j in range(1, self.k):
            # a request that has just finished may sit past its limit: clamp its (discarded) position into the cache
            pos = [min(m + j - 1, runner.rows - 1) for m in lens]
            pick = torch.zeros(len(reqs), dtype=torch.long, device=runner.device)  # one position per row
            h, logits = runner.mtp_step(h[:, None], cols[-1][:, None], pick, pos, start)
            cols.append(self.draft_one(logits, reqs))
        for r, ds in zip(reqs, torch.stack(cols, dim=1).tolist(), strict=True):
            r.drafts = ds

    def prefill(self, hidden: torch.Tensor, next_tokens: torch.Tensor, b: Batch, lens: torch.Tensor,
                reqs: list[Request]) -> None:
        """After a main prefill (hidden [n,S,D] of n prompt chunks of lens [n] tokens, fed with Batch b): fill the
        MTP cache over the same slots and positions, position i pairing h_i with next_tokens[:, i] (the prompt's
        next token; after a complete prompt's last, the token just sampled), and draft the next k tokens for reqs,
        the first len(reqs) rows, whose prompts are complete."""
        runner = self.runner
        h = runner.mtp(hidden, next_tokens, b)
        if reqs:
            rows = torch.arange(len(reqs), device=runner.device)
            h = h[rows, lens[:len(reqs)] - 1]
            self.draft(h, runner.mtp_logits(h), runner.slot_lengths[b.start:b.start + len(reqs)], reqs, b.start)

    def decode(self, reqs: list[Request]) -> list[list[int]]:
        """One verify step for the requests in slots 0..n-1: the main model reads [last token, d_1..d_k] per slot in
        one forward; the MTP module reads the same positions, pairing h_{L+j} with the verified t_{L+j+1}, and drafts
        again from the last accepted position. Returns the tokens each request emits: its accepted drafts, then the
        main model's token."""
        runner = self.runner
        tokens = torch.tensor([[r.output_ids[-1], *r.drafts] for r in reqs], device=runner.device)  # [n,k+1]
        lens = runner.slot_lengths[:len(reqs)]
        hidden, logits = runner.verify_forward(tokens)
        if any(r.generator is not None for r in reqs):
            out, accepted = verify(logits, tokens[:, 1:], reqs)
            rows, acc = out.tolist(), accepted.tolist()
        else:  # greedy: the same rule on lists (a few small tensor ops cost as much as a native step of a small model)
            out = logits.argmax(-1)
            rows = out.tolist()
            acc = [next((j for j, (d, o) in enumerate(zip(r.drafts, row, strict=False)) if d != o), self.k)
                   for r, row in zip(reqs, rows, strict=True)]
        h, mtp_logits = runner.mtp_step(hidden, out, acc, lens, want_h=self.k > 1)
        new_lens = [m + 1 + a for m, a in zip(lens, acc, strict=True)]
        runner.set_lengths(0, new_lens)
        self.draft(h, mtp_logits, new_lens, reqs)
        return [row[:a + 1] for row, a in zip(rows, acc, strict=True)]
