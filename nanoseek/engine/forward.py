"""The model side of the engine: `ModelRunner` holds the weights (weights.py), the latent caches and the cache
lengths, and runs the forward over them (layers.py): prefill, decode, the MTP module, perplexity, and the
torch.compile'd graphs of compile=True.

- latent cache (V3 "absorb" mode), paged: per layer one buffer [num_blocks, block_size, c + r] whose columns [:c] are
  `kv_cache` = kv_a_layernorm(c_kv) and [c:] are `pe_cache` = RoPE(k_pe), so q.k is one matmul. Slot i's position p
  lives in block `block_table[i, p // block_size]` at row p % block_size; `lengths` / `slot_lengths` say how many
  positions of each slot hold tokens. Blocks are counted by a prefix_cache.BlockPool, so a prefix tree can share
  them between slots (the scheduler fills the table rows; `cover` gives a slot fed through the low-level API a row
  of its own). The MTP module has its own buffers of the same shape and the same block tables (`mtp_caches`).
- prefill: right-padded prompts fed together from position 0 (`fresh`), or from each slot's length (a prompt's
  suffix over a cached prefix, the next chunk of a chunked prefill: `offsets`); decode: one token per slot at its
  length.
- compiled graphs: the decode step (and the speculative verify forward, and the MTP module) as graphs without
  data-dependent shapes (the gather MoE of layers.moe_ffn). The attended length T is a dynamic dimension, and so is
  the batch from 2 rows up (dynamo specialises sizes 0 and 1): two graphs per tokens-per-row cover every batch size
  and length, one for batch 1, whose products are loops (Batch.matvec, decided from the traced shapes), and one for
  the rest.

Shapes: B batch rows (slots), S new tokens per row, T attended cache length, D hidden, H heads, c kv_lora_rank,
r qk_rope_head_dim, V vocab.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from nanoseek.engine import compile_cache
from nanoseek.engine.layers import Batch, block, linear, rms_norm
from nanoseek.engine.prefix_cache import BLOCK_SIZE, BlockPool
from nanoseek.engine.request import is_int
from nanoseek.engine.weights import LayerWeights
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.quant import quantize, weight_bytes


class ModelRunner:
    """Weights, latent caches and the forward for `max_batch_size` slots of `rows` cache positions each.

    `compile_backend`: None runs eagerly; a torch.compile backend ("inductor") runs decode steps as compiled graphs.
    `draft_quant`: the MTP module (its block, eh_proj, and an lm_head copy for its logits) quantised to "int8" /
    "int4" whatever `quant` the main model has: drafts only propose tokens, so they may be cheaper and coarser.
    The caches hold a full row of blocks for every slot plus `cache_blocks` more (the prefix cache's budget)."""

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, spare_rows: int = 0,
                 prefill_mode: str = "naive", quant: str | None = None, group_size: int = 32,
                 compile_backend: str | None = None, draft_quant: str | None = None, cache_blocks: int = 0,
                 block_size: int = BLOCK_SIZE):
        cfg = self.config = model.config
        self.max_batch_size, self.max_seq_len, self.prefill_mode = max_batch_size, max_seq_len, prefill_mode
        self.quant, self.group_size = quant, group_size
        # cache rows per slot: a speculative verify step may write past max_seq_len (spare_rows = k - 1)
        self.rows = max_seq_len + spare_rows
        self.dtype, self.device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
        with torch.no_grad():
            self.layers = [LayerWeights(b, cfg) for b in model.layers]
            self.mtp_layers = [LayerWeights(m, cfg) for m in model.mtp]
            self.embed = model.embed_tokens.weight
            self.norm = model.norm.weight
            self.lm_head = model.lm_head.weight
            # RoPE tables for every cache position, fp32 as model.RotaryEmbedding makes them: [rows, r/2]
            self.cos, self.sin = model.rotary(torch.arange(self.rows, device=self.device))
            # the embedding is a row gather and stays as it is; the router stays fp32
            for mode, layers in ((quant, self.layers), (draft_quant or quant, self.mtp_layers)):
                for lw in layers if mode is not None else []:
                    lw.quantize(lambda w, mode=mode: quantize(w, mode, group_size))
            if quant is not None:
                self.lm_head = quantize(self.lm_head, quant, group_size)
            # the MTP module's logits (drafts): the shared lm_head, or a copy in draft_quant
            self.draft_lm_head = self.lm_head
            if draft_quant not in (None, quant) and self.mtp_layers:
                self.draft_lm_head = quantize(model.lm_head.weight, draft_quant, group_size)
        self.draft_quant = draft_quant if self.mtp_layers else None
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.block_size = block_size
        self.blocks_per_slot = -(-self.rows // block_size)
        # block 0 (the null block) + a full row for every slot + the prefix cache's: every slot can always get its
        # row, evicting cached prefixes if needed
        self.num_blocks = 1 + max_batch_size * self.blocks_per_slot + cache_blocks
        self.caches = [torch.zeros(self.num_blocks, block_size, width, dtype=self.dtype, device=self.device)
                       for _ in self.layers]
        self.mtp_caches = [torch.zeros_like(self.caches[0]) for _ in self.mtp_layers]  # the MTP module's own
        self.pool = BlockPool(self.num_blocks)
        # per slot, the blocks holding positions 0, bs, 2 bs, ... (int32: the native kernels read it too); entries
        # past a slot's own blocks are 0, the null block
        self.block_table = torch.zeros(max_batch_size, self.blocks_per_slot, dtype=torch.int32, device=self.device)
        # the same, per position: row_map[i, p] = the row of cache.view(-1, c+r) holding slot i's position p, so a
        # forward's write and read indices are a gather and a slice (the indices from the table took 100 us a step)
        self.row_map = torch.zeros(max_batch_size, self.blocks_per_slot * block_size, dtype=torch.long,
                                   device=self.device)
        self._offsets = torch.arange(block_size, device=self.device).repeat(self.blocks_per_slot)
        self.row_map[:] = self._offsets  # every position in the null block
        self.slot_blocks: list[list[int]] = [[] for _ in range(max_batch_size)]  # the table rows, as lists
        # tokens cached per slot, as a tensor (for positions) and a list (for shapes, without syncs)
        self.lengths = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self.slot_lengths = [0] * max_batch_size
        # a kernels.NativeDecoder when decode / verify / MTP-draft steps run natively, and the line saying which path
        # runs and why (set by the Engine: engine/native.py)
        self.native = None
        self.decode_path = "PyTorch decode"
        self.compiled = compile_backend is not None
        self.compile_cache = None  # the directory inductor caches compiled graphs in (compile=True)
        self.graphs: dict[tuple[str, int, int], float] = {}  # (graph, batch 1 or more, tokens per row) -> compile s
        if self.compiled:
            # every engine compiles its own graphs of the same code: more than dynamo's default limit of 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # inductor's C++ wrapper calls the kernels from C++ instead of Python (~10% at batch 1)
            kw = dict(options={"cpp_wrapper": True}) if compile_backend == "inductor" and self.device.type == "cpu" \
                else {}
            if compile_backend == "inductor":  # compiled graphs cached on disk across runs (compile_cache.py)
                self.compile_cache = compile_cache.configure()
            self._decode_graph = torch.compile(self._static_decode, fullgraph=True, dynamic=False,
                                               backend=compile_backend, **kw)
            self._mtp_graph = torch.compile(self._static_mtp, fullgraph=True, dynamic=False, backend=compile_backend,
                                            **kw)

    # --- cache views and bookkeeping ------------------------------------------------------------------------------
    def slot_view(self, cache: torch.Tensor) -> torch.Tensor:
        """A cache [num_blocks, bs, c+r] read through the block tables: [max_batch, rows, c+r], a copy."""
        flat = cache.view(-1, cache.shape[-1])
        return flat[self.read_index(0, self.max_batch_size, self.rows)]

    def kv_cache(self, layer: int) -> torch.Tensor:
        """[max_batch, rows, kv_lora_rank]: kv_a_layernorm(c_kv) per cached token (a copy)."""
        return self.slot_view(self.caches[layer])[..., :self.config.kv_lora_rank]

    def pe_cache(self, layer: int) -> torch.Tensor:
        """[max_batch, rows, qk_rope_head_dim]: k_pe after RoPE per cached token (a copy)."""
        return self.slot_view(self.caches[layer])[..., self.config.kv_lora_rank:]

    def set_lengths(self, start: int, lens: list[int]) -> None:
        if self.device.type == "cpu":  # through a numpy view: ~1 us against ~8 (a native step can take 10)
            self.lengths.numpy()[start:start + len(lens)] = lens
        else:  # non_blocking: on CUDA the copy is queued behind the step's kernels instead of waiting for them
            self.lengths[start:start + len(lens)] = torch.tensor(lens).to(self.device, non_blocking=True)
        self.slot_lengths[start:start + len(lens)] = lens

    def assign(self, slot: int, blocks: list[int]) -> None:
        """Point slot's table row at blocks (one reference held on each), releasing the row it held."""
        self.pool.hold(blocks)
        self.pool.drop(self.slot_blocks[slot])
        self.slot_blocks[slot] = list(blocks)
        self.block_table[slot] = 0
        if blocks:
            self.block_table[slot, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32, device=self.device)
        self.row_map[slot] = self.block_table[slot].long().repeat_interleave(self.block_size) * self.block_size \
            + self._offsets

    def permute_slots(self, order: list[int]) -> None:
        """Slot i takes what slot order[i] held (its table row and length), for i < len(order); the other slots'
        rows are released (lengths 0). The scheduler keeps its requests in slots 0..n-1 with this."""
        for s in set(range(self.max_batch_size)) - set(order):  # released: drop their references (rows n.. are
            self.pool.drop(self.slot_blocks[s])  # reset below; assign() per slot cost ~1 ms a request at batch 16)
        n, idx = len(order), torch.tensor(order, dtype=torch.long, device=self.device)
        self.slot_blocks[:n] = [self.slot_blocks[s] for s in order]
        self.slot_blocks[n:] = [[] for _ in range(self.max_batch_size - n)]
        self.block_table[:n] = self.block_table[idx]
        self.block_table[n:] = 0
        self.row_map[:n] = self.row_map[idx]
        self.row_map[n:] = self._offsets
        self.set_lengths(0, [self.slot_lengths[s] for s in order] + [0] * (self.max_batch_size - n))

    def cover(self, start: int, needs: list[int]) -> None:
        """Make sure slots start.. hold blocks for their first needs[i] positions: a slot fed through the low-level
        API (prefill / forward / decode / perplexity on slots the scheduler did not fill) gets a full row of its
        own. The scheduler reserves each request's blocks itself, so this does nothing for it."""
        for i, need in enumerate(needs):
            have = self.slot_blocks[start + i]
            if len(have) * self.block_size < need:
                self.assign(start + i, have + self.pool.allocate(self.blocks_per_slot - len(have)))

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block src's latents (main and MTP caches) into block dst."""
        for cache in self.caches + self.mtp_caches:
            cache[dst] = cache[src]

    def block_data(self, block: int, mtp: bool) -> torch.Tensor:
        """One block's latents over the main layers (and the MTP module's, if mtp): [L, bs, c+r], a copy."""
        return torch.stack([c[block] for c in self.caches + (self.mtp_caches if mtp else [])]).cpu()

    def set_block_data(self, block: int, data: torch.Tensor) -> None:
        """Write latents [L, bs, c+r] (block_data's layout) into block."""
        for c, d in zip(self.caches + self.mtp_caches, data, strict=False):
            c[block] = d.to(device=self.device, dtype=self.dtype)

    def weight_bytes(self) -> int:
        return weight_bytes([vars(lw) for lw in self.layers + self.mtp_layers]
                            + [self.embed, self.norm, self.lm_head]
                            + ([self.draft_lm_head] if self.draft_lm_head is not self.lm_head else []))

    # --- batches --------------------------------------------------------------------------------------------------
    def write_index(self, start: int, pos: torch.Tensor) -> torch.Tensor:
        """Rows of cache.view(-1, c+r) holding positions pos [B,S] of slots start..start+B-1, through the block
        table: [B,S]."""
        return self.row_map[start:start + pos.shape[0]].gather(1, pos)

    def read_index(self, start: int, bsz: int, t: int | torch.Tensor) -> torch.Tensor:
        """Rows of cache.view(-1, c+r) holding positions 0..T-1 of slots start..start+B-1: [B,T]. t is T, or
        arange(T) (a compiled graph's dynamic T)."""
        return self.row_map[start:start + bsz, :t if isinstance(t, int) else t.shape[0]]

    def batch(self, start: int, bsz: int, seqlen: int, fresh: bool, new: list[int] | None = None,
              expand: bool = False) -> Batch:
        """Positions, RoPE angles, cache write / read indices and mask for feeding [B,S] tokens to slots start..
        new[i] (default S): the real tokens of row i, the rest is right padding, written to the null block.
        expand: a prefill over cached positions (fresh=False) in naive mode, which expands keys and values."""
        rows = slice(start, start + bsz)
        offsets = torch.arange(seqlen, device=self.device)
        pos = offsets.expand(bsz, -1) if fresh else self.lengths[rows, None] + offsets  # [B,S]
        lens = [0] * bsz if fresh else self.slot_lengths[rows]
        new = [seqlen] * bsz if new is None else new
        self.cover(start, [m + k for m, k in zip(lens, new, strict=True)])
        real = pos.clamp(max=self.rows - 1)  # padding may run past the slot's last row
        write = self.write_index(start, real)
        if min(new) < seqlen:  # padding: to the null block (rows 0..bs-1 of the flat cache), never read unmasked
            write = torch.where(offsets < torch.tensor(new, device=self.device)[:, None], write,
                                offsets % self.block_size)
        cos, sin = self.cos[real][:, :, None], self.sin[real][:, :, None]  # [B,S,1,r/2] fp32 (broadcast over heads)
        read = None
        if fresh:
            mask, t = None, seqlen  # causal over the new tokens
            if self.prefill_mode == "absorbed":
                mask, read = self.mask(pos, t), self.read_index(start, bsz, t)
        else:
            t = max(lens) + seqlen
            read = self.read_index(start, bsz, t)
            expand = expand and self.prefill_mode == "naive" and self.expand_pays(seqlen)
            if expand:
                mask = self.mask(pos, t, heads=False)
            else:  # one token per slot and every slot at the same length: everything is visible, skip the mask
                mask = self.mask(pos, t) if seqlen > 1 or min(lens) < max(lens) else pos.new_empty(0)
        return Batch(start, write.flatten(), cos, sin, mask, t, read_index=read, expand=expand and not fresh)

    def static_batch(self, pos0: torch.Tensor, seqlen: int, t_index: torch.Tensor, start: int = 0,
                     static: bool = True) -> Batch:
        """Batch for S = seqlen new tokens per row at slots start..start+B-1 (compiled graphs: start 0), from the
        first positions pos0 [B]; t_index = arange(T), whose size carries the dynamic T under torch.compile. The mask
        is always built (no data-dependent branch). static: for a compiled graph, whose batch-1 form (a size dynamo
        specialises, so known while tracing) writes its products as loops."""
        pos = pos0[:, None] + torch.arange(seqlen, device=self.device)  # [B,S]
        t = t_index.shape[0]
        # the slots' rows of row_map by index, not as a slice: slicing B rows of the max_batch_size-row table would
        # make dynamo specialise the dynamic B to max_batch_size when a graph is first traced with every slot busy
        rows = self.row_map.index_select(0, start + torch.arange(pos.shape[0], device=self.device))  # [B, rows]
        return Batch(start, rows.gather(1, pos).flatten(), self.cos[pos][:, :, None],
                     self.sin[pos][:, :, None], self.mask(pos, t), t, static=static,
                     matvec=static and pos.shape[0] == 1, read_index=rows[:, :t])

    def expand_pays(self, seqlen: int) -> bool:
        """For S new tokens per row over T cached positions: whether expanding the T keys and values (naive, masked
        SDPA) costs fewer multiply-adds than the absorbed attention. Per head and cached position, the absorbed form
        costs S (2c + r) (scores, weighted sum), the expanded one c (nope + v) (the expansion) + S (qk + v):
        expanding pays from S > c (nope + v) / (2c + r - qk - v) tokens. Measured on the `cpu` preset (64 there):
        16 tokens over 1,700 cached took 18 ms expanded, 13 ms absorbed; 160 tokens 48 and 54 ms."""
        cfg = self.config
        gain = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim - cfg.qk_head_dim - cfg.v_head_dim
        return gain > 0 and seqlen * gain > cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim)

    def mask(self, pos: torch.Tensor, t: int, heads: bool = True) -> torch.Tensor:
        """Additive mask [B, S*H, T] (the absorbed attention's rows; heads=False: [B, 1, S, T], SDPA's): the query
        at position pos[b,s] sees cached keys 0..pos[b,s]."""
        bsz, seqlen = pos.shape
        hidden = torch.arange(t, device=pos.device) > pos[..., None]  # [B,S,T]
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=pos.device).masked_fill_(hidden, float("-inf"))
        if not heads:
            return mask[:, None]
        return mask[:, :, None].expand(-1, -1, self.config.num_attention_heads, -1).reshape(bsz, -1, t)

    # --- forward --------------------------------------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, b: Batch) -> torch.Tensor:
        """tokens [B,S] through the main blocks -> hidden states [B,S,D] before the final norm (lengths untouched)."""
        x = F.embedding(tokens, self.embed)
        for lw, cache in zip(self.layers, self.caches, strict=True):
            x = block(x, lw, cache, b, self.config)
        return x

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int = 0, fresh: bool = False) -> torch.Tensor:
        """Feed tokens [B,S] to slots start..start+B-1 at positions lengths[slot] + 0..S-1 (0.. if fresh: the slots
        are emptied first, as for a prefill); returns hidden states [B,S,D] before the final norm, and advances
        `lengths` by S."""
        bsz, seqlen = tokens.shape
        lens = [0] * bsz if fresh else self.slot_lengths[start:start + bsz]
        x = self._forward(tokens, self.batch(start, bsz, seqlen, fresh))
        self.set_lengths(start, [n + seqlen for n in lens])
        return x

    def logits(self, hidden: torch.Tensor, matvec: bool = False) -> torch.Tensor:
        """hidden [..., D] -> fp32 logits [..., V]."""
        return linear(rms_norm(hidden, self.norm, self.config.rms_norm_eps), self.lm_head, matvec).float()

    def prefill_hidden(self, prompts: list[list[int]], start: int, offsets: list[int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, Batch, torch.Tensor]:
        """Right-padded batched prefill into slots start..: (hidden [n,S,D], tokens [n,S], its Batch, lengths [n]).
        Without offsets the prompts start at position 0; with them, prompts[i] continues slot start+i from
        position offsets[i] (its length: a cached prefix, earlier chunks) and attends to what the slot holds.
        Sets each slot's length to its offset + the tokens fed."""
        lens = [len(p) for p in prompts]
        tokens = torch.zeros(len(prompts), max(lens), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        fresh = offsets is None or not any(offsets)
        if not fresh:
            self.set_lengths(start, offsets)
        b = self.batch(start, len(prompts), tokens.shape[1], fresh=fresh, new=lens, expand=True)
        hidden = self._forward(tokens, b)
        self.set_lengths(start, lens if fresh else [o + n for o, n in zip(offsets, lens, strict=True)])
        return hidden, tokens, b, torch.tensor(lens, device=self.device)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], start: int = 0) -> torch.Tensor:
        """Prefill prompts into slots start.. (right-padded, one batched pass); returns last-position logits [n,V]
        and sets each slot's length to its prompt length."""
        hidden, _, _, lens = self.prefill_hidden(prompts, start)
        return self.logits(hidden[torch.arange(len(prompts), device=self.device), lens - 1])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per slot for slots 0..n-1 (tokens [n]); returns logits [n,V]."""
        if self.native is not None:  # one C call (docs/kernels.md); it leaves the lengths to us
            lens = self.slot_lengths[:len(tokens)]
            logits = self.native.decode(tokens, lens)
            self.set_lengths(0, [m + 1 for m in lens])
            return logits
        with torch.inference_mode():  # (here, not as a decorator: entering it costs more than a small native step)
            if self.compiled:
                _, logits = self._run_graph("decode", tokens[:, None])
                self.set_lengths(0, [m + 1 for m in self.slot_lengths[:len(tokens)]])
                return logits[:, -1]
            return self.logits(self.forward(tokens[:, None], 0)[:, -1])

    def verify_forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [n,S] for slots 0..n-1 at their lengths -> (hidden [n,S,D], fp32 logits [n,S,V]). Writes the
        cache and leaves the lengths alone: speculative verification sets them once it knows what it accepts."""
        if self.native is not None:
            return self.native.forward(tokens, self.slot_lengths[:tokens.shape[0]])
        if self.compiled:
            return self._run_graph("decode", tokens)
        hidden = self._forward(tokens, self.batch(0, tokens.shape[0], tokens.shape[1], fresh=False))
        return hidden, self.logits(hidden)

    @torch.inference_mode()
    def perplexity(self, token_ids: list[int] | torch.Tensor, seq_len: int = 256) -> float:
        """exp(mean next-token NLL) over token_ids, in non-overlapping windows of seq_len inputs (each window read
        from an empty cache, like a prompt) through this forward: its dtype and quantised weights. Uses cache slots
        0.., whatever they held."""
        if not is_int(seq_len) or not 1 <= seq_len <= self.max_seq_len:
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

    # --- the MTP module (speculative decoding) --------------------------------------------------------------------
    def mtp(self, hidden: torch.Tensor, next_tokens: torch.Tensor, b: Batch) -> torch.Tensor:
        """MTP depth 1 at the positions b feeds: position i pairs the main model's h_i [B,S,D] (before the final
        norm) with the embedding of t_{i+1} (next_tokens [B,S]), h'_i = eh_proj([enorm(emb) ; hnorm(h)]), then its
        block over its own latent cache. Returns the block output [B,S,D] (shared_head.norm comes in mtp_logits)."""
        lw, eps = self.mtp_layers[0], self.config.rms_norm_eps
        x = torch.cat([rms_norm(F.embedding(next_tokens, self.embed), lw.enorm, eps), rms_norm(hidden, lw.hnorm, eps)],
                      dim=-1)
        return block(linear(x, lw.eh_proj, b.matvec), lw, self.mtp_caches[0], b, self.config)

    def mtp_logits(self, h: torch.Tensor, matvec: bool = False) -> torch.Tensor:
        """The MTP module's block output h [..., D] -> fp32 logits [..., V] (shared_head.norm, the shared lm_head)."""
        lw = self.mtp_layers[0]
        return linear(rms_norm(h, lw.head_norm, self.config.rms_norm_eps), self.draft_lm_head, matvec).float()

    def mtp_step(self, hidden: torch.Tensor, next_tokens: torch.Tensor, pick: torch.Tensor | list[int],
                 lens: list[int], start: int = 0, want_h: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The MTP module over hidden [n,S,D] and next_tokens [n,S] at positions lens[i] + 0..S-1 of slots
        start..start+n-1 -> (h' [n,D], logits [n,V]) at position pick[i] of each row (the compiled graph for
        slots 0.., and the native one, which returns h' None unless want_h: only chained drafts read it)."""
        if self.native is not None and start == 0:
            h, logits = self.native.mtp(hidden, next_tokens, lens, pick)
            return (h[torch.arange(h.shape[0]), torch.as_tensor(pick)] if want_h else None), logits
        pick = torch.as_tensor(pick, device=self.device)
        if self.compiled and start == 0:
            return self._run_graph("mtp", hidden, next_tokens, pick, lens=lens)
        t_index = torch.arange(max(lens) + hidden.shape[1], device=self.device)
        return self._static_mtp(hidden, next_tokens, pick, torch.tensor(lens, device=self.device), t_index, start,
                                static=False)

    # --- compiled graphs (compile_backend) ------------------------------------------------------------------------
    def _static_decode(self, tokens: torch.Tensor, pos0: torch.Tensor, t_index: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled decode graph: tokens [B,S] at slots 0..B-1 -> (hidden [B,S,D] before the final norm, fp32
        logits [B,S,V]); writes the cache, leaves the lengths alone."""
        b = self.static_batch(pos0, tokens.shape[1], t_index)
        x = F.embedding(tokens, self.embed)
        for lw, cache in zip(self.layers, self.caches, strict=True):
            x = block(x, lw, cache, b, self.config)
        return x, self.logits(x, b.matvec)

    def _static_mtp(self, hidden: torch.Tensor, next_tokens: torch.Tensor, pick: torch.Tensor, pos0: torch.Tensor,
                    t_index: torch.Tensor, start: int = 0, static: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`mtp` over S positions per row from pos0 [B], then the output at position pick [B] of each row and its
        logits: (h' [B,D], fp32 logits [B,V]). Compiled as the MTP graph; called eagerly with static=False."""
        b = self.static_batch(pos0, next_tokens.shape[1], t_index, start, static)
        h = self.mtp(hidden, next_tokens, b)[torch.arange(pick.shape[0], device=self.device), pick]
        return h, self.mtp_logits(h, b.matvec)

    def _run_graph(self, name: str, *tensors: torch.Tensor, lens: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a compiled graph for slots 0..n-1 (tensors[0] [n, S, ...]) at positions lens[i] + 0..S-1 (default:
        the slots' lengths). T, and the batch from 2 rows up, are marked dynamic: a graph of batch 1 and one of
        batch >= 2 per S."""
        n, seqlen = tensors[0].shape[:2]
        lens = self.slot_lengths[:n] if lens is None else lens
        pos0 = torch.tensor(lens).to(self.device, non_blocking=True)
        t_index = torch.arange(max(lens) + seqlen, device=self.device)  # >= 2
        torch._dynamo.mark_dynamic(t_index, 0)
        if n > 1:
            for t in (*tensors, pos0):
                torch._dynamo.mark_dynamic(t, 0)
        key = (name, min(n, 2), seqlen)
        t0 = time.perf_counter()
        out = (self._decode_graph if name == "decode" else self._mtp_graph)(*tensors, pos0, t_index)
        if key not in self.graphs:  # the first call of a shape compiles it
            self.graphs[key] = time.perf_counter() - t0
        return out

