"""Native CPU kernels for the engine's decode step: the whole model in one C call per step (docs/kernels.md).

    from nanoseek.kernels import NativeDecoder, status
    native = NativeDecoder(engine)                  # reads the engine's prepared weights, caches and RoPE tables
    logits = native.decode(tokens, lengths)          # tokens [n] int64 for slots 0..n-1, lengths [n] cached per slot
    hidden, logits = native.forward(tokens, lengths) # tokens [n, S]: S new tokens per slot (the MTP verify step)
    h, logits = native.mtp(hidden, next_tokens, lengths, pick)   # the first MTP module, over engine.mtp_caches[0]

They write the new latent rows into the engine's own paged cache tensors (`engine.caches`, [num_blocks, block_size,
c + r]) and read them through its block table (`engine.block_table`, int32, read at every call), so prefill can stay
PyTorch and decode run natively on the same cache, prefix-cached blocks shared between slots included; none
touches `engine.lengths` (the caller advances them, as `Engine.forward` does). The C library (native.c,
forward.h) is built by `pip install -e .` (setup.py) as an optional extension and loaded here with ctypes; a plain
C ABI was measured cheaper to call than a torch.library op (docs/kernels.md).

Instruction sets: `avx512` (AVX-512 F/BW/DQ/VL + VNNI), `avx2` (AVX2 + FMA) or `generic` (portable C), the best
the CPU runs unless the environment variable NANOSEEK_KERNELS says `avx512`, `avx2`, `generic` or `off`
(`off`, or no library: the engine's PyTorch path). `status()` says which, and why.
Weights: fp32 tensors are read in place; quant.Int8Weight's int8 codes too (plus fp32 copies of its scales);
quant.Int4Weight's codes are repacked into blocks of 32 (16 bytes) with bf16 scales and zeros per block; W_UK is
transposed per head (a copy), and W_UK / W_UV are quantised per head when the engine is (quantize_kv_b).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from ctypes import POINTER, Structure, c_float, c_int, c_int32, c_void_p
from functools import cache
from pathlib import Path

import numpy as np
import torch

from nanoseek.errors import NanoseekError
from nanoseek.quant import Int4Weight, Int8Weight, quantize

ISAS = ("generic", "avx2", "avx512")  # native.h NS_ISA_*: index = the C enum
ENV = "NANOSEEK_KERNELS"
F32, INT8, INT4 = 0, 1, 2


# --- the C structs (native.h; same field order) --------------------------------------------------------------------
class _Weight(Structure):
    _fields_ = [("type", c_int32), ("n", c_int32), ("k", c_int32), ("pad", c_int32), ("w", c_void_p),
                ("scale", c_void_p), ("s4", c_void_p), ("z4", c_void_p)]


class _Layer(Structure):
    _fields_ = [("attn_norm", c_void_p), ("q_norm", c_void_p), ("kv_norm", c_void_p), ("ffn_norm", c_void_p),
                ("wq_a_kv_a", _Weight), ("wq_b", _Weight), ("wo", _Weight),
                ("w_uk", POINTER(_Weight)), ("w_uv", POINTER(_Weight)),
                ("ffn_gate_up", _Weight), ("ffn_down", _Weight), ("moe", c_int32), ("pad", c_int32),
                ("gate_w", c_void_p), ("gate_bias", c_void_p), ("experts_gate_up", POINTER(_Weight)),
                ("experts_down", POINTER(_Weight)), ("cache", c_void_p), ("block_table", c_void_p)]


class _Step(Structure):
    _fields_ = [("n", c_int32), ("s", c_int32), ("tokens", c_void_p), ("lens", c_void_p), ("pick", c_void_p),
                ("h_in", c_void_p), ("hidden", c_void_p), ("logits", c_void_p)]


class _Config(Structure):
    _fields_ = [(name, c_int32) for name in (
        "n_layers", "hidden", "vocab", "n_heads", "q_lora_rank", "kv_lora_rank", "nope", "rope", "v_head", "n_routed",
        "n_group", "topk_group", "top_k", "norm_topk_prob", "rope_interleave", "max_batch", "rows")] + [
        ("eps", c_float), ("softmax_scale", c_float), ("routed_scaling_factor", c_float),
        ("block_size", c_int32), ("max_blocks", c_int32), ("num_blocks", c_int32)]


# --- the library and the instruction set -----------------------------------------------------------------------------
@cache
def library() -> ctypes.CDLL | None:
    """The built extension (nanoseek/kernels/_native*.so), or None when it was not built."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_native{suffix}"
        if path.is_file():
            lib = ctypes.CDLL(str(path))  # CDLL releases the GIL during calls: the server's loop keeps running
            lib.ns_model_new.restype = c_void_p
            lib.ns_model_new.argtypes = [POINTER(_Config), POINTER(_Layer), c_void_p, c_void_p, POINTER(_Weight),
                                         c_void_p, c_void_p, c_int]
            lib.ns_model_free.argtypes = [c_void_p]
            lib.ns_forward.argtypes = [c_void_p, POINTER(_Step), c_int]
            lib.ns_model_set_mtp.argtypes = [c_void_p, c_void_p, c_void_p, POINTER(_Weight)]
            lib.ns_linear.argtypes = [c_void_p, POINTER(_Weight), c_void_p, c_int, c_void_p, c_int]
            lib.ns_noop.argtypes = [c_void_p, c_int, c_void_p, c_void_p]
            lib.ns_profile.argtypes = [c_void_p, c_int, c_void_p]
            return lib
    return None


def cpu_isas() -> list[str]:
    """The variants this CPU runs and the library holds, worst first (empty without the library)."""
    lib = library()
    if lib is None:
        return []
    mask = lib.ns_cpu_isas() & lib.ns_built_isas()
    return [name for i, name in enumerate(ISAS) if mask >> i & 1]


def choose_isa() -> tuple[str | None, str]:
    """(the variant to run, or None for the PyTorch path; why), from the CPU and NANOSEEK_KERNELS."""
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "off", *ISAS):
        raise NanoseekError(f"{ENV}={want!r}: choose auto, off, {', '.join(reversed(ISAS))}")
    if want == "off":
        return None, f"{ENV}=off"
    if library() is None:
        return None, "the native library was not built (no C compiler when nanoseek was installed?)"
    runs = cpu_isas()
    if want == "auto":
        return runs[-1], f"the best this CPU runs of {', '.join(runs)}"
    if want not in runs:
        raise NanoseekError(f"{ENV}={want}: this CPU (or this build) runs only {', '.join(runs)}")
    return want, f"{ENV}={want}"


def status() -> str:
    """One line: which decode path the engine would take here, and why."""
    try:
        isa, why = choose_isa()
    except NanoseekError as e:
        return f"PyTorch ({e})"
    return f"native {isa} ({why})" if isa else f"PyTorch ({why})"


def unsupported(engine) -> str | None:
    """Why the native path cannot run this engine (an Engine or its ModelRunner; None: it can)."""
    engine = getattr(engine, "runner", engine)
    cfg = engine.config
    if engine.device.type != "cpu":
        return f"the engine runs on {engine.device}"
    if engine.dtype != torch.float32:
        return f"the engine's dtype is {engine.dtype} (the kernels read fp32 activations and caches)"
    if cfg.n_routed_experts > 1024 or cfg.qk_rope_head_dim > 512:
        return "more than 1024 routed experts or a RoPE dim above 512"
    return None


# --- weights in the C layout -----------------------------------------------------------------------------------------
def _int4_codes(w: Int4Weight) -> torch.Tensor:
    """The codes [N, K] (0..15) of an Int4Weight, read out of torch's packed layout through its permutation."""
    nib = torch.stack([w.packed & 15, w.packed >> 4], dim=-1).flatten()
    codes = torch.empty(w.out_features * w.in_features, dtype=torch.uint8)
    codes[_int4_pack_order(w.out_features, w.in_features)] = nib
    return codes.view(w.out_features, w.in_features)


@cache
def _int4_pack_order(n: int, k: int) -> torch.Tensor:
    """For each nibble of torch._convert_weight_to_int4pack_for_cpu's output [n, k/2] (low first), the flat index
    of the [n, k] code it holds: packing the index's base-16 digits one at a time reads the permutation off."""
    idx = torch.arange(n * k)
    order = torch.zeros(n * k, dtype=torch.long)
    for digit in range(max(1, ((n * k - 1).bit_length() + 3) // 4)):
        q = ((idx >> (4 * digit)) & 15).to(torch.int32).view(n, k)
        p = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        order |= torch.stack([p & 15, p >> 4], dim=-1).flatten().long() << (4 * digit)
    return order


class _Weights:
    """Turns engine weights into _Weight structs, keeping every tensor they point into alive."""

    def __init__(self):
        self.keep: list[object] = []

    def ptr(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach()
        assert t.is_contiguous() and t.device.type == "cpu", "native kernels need contiguous CPU tensors"
        self.keep.append(t)
        return t.data_ptr()

    def f32(self, t: torch.Tensor | None) -> int | None:
        return None if t is None else self.ptr(t.detach().float().contiguous())

    def weight(self, w) -> _Weight:
        if w is None:
            return _Weight()  # n = 0: absent
        if isinstance(w, torch.Tensor):
            t = w.detach().float().contiguous()
            return _Weight(F32, t.shape[0], t.shape[1], 0, self.ptr(t))
        if isinstance(w, Int8Weight):
            return _Weight(INT8, w.out_features, w.in_features, 0, self.ptr(w.q.contiguous()),
                           self.f32(w.scale.float()))
        if isinstance(w, Int4Weight):
            n, k, g = w.out_features, w.in_features, w.group_size
            codes = _int4_codes(w).view(n, k // 32, 2, 16)
            packed = (codes[:, :, 0] | (codes[:, :, 1] << 4)).contiguous()  # byte j: code j | code j+16 << 4
            sz = w.scales_zeros.transpose(0, 1).repeat_interleave(g // 32, dim=1)  # [N, K/32, 2] bf16
            s4, z4 = (sz[..., i].contiguous().view(torch.int16) for i in (0, 1))
            return _Weight(INT4, n, k, 0, self.ptr(packed), None, self.ptr(s4), self.ptr(z4))
        raise NanoseekError(f"native kernels: unsupported weight type {type(w).__name__}")

    def array(self, weights: list) -> ctypes.Array:
        arr = (_Weight * len(weights))(*[self.weight(w) for w in weights])
        self.keep.append(arr)
        return arr


# --- the decoder -----------------------------------------------------------------------------------------------------
class NativeDecoder:
    """The engine's decode step in one C call: the main model (decode / forward) and, when the checkpoint has one,
    the first MTP module (mtp). Built once from an Engine's prepared weights; raises NanoseekError when the native
    path cannot run (`status()` / `unsupported()` say why beforehand)."""

    def __init__(self, engine, isa: str | None = None, threads: int | None = None,
                 quantize_kv_b: bool | None = None):
        if isa is None:
            isa, _ = choose_isa()
            if isa is None:
                raise NanoseekError(f"native kernels unavailable: {status()}")
        elif isa not in cpu_isas():
            raise NanoseekError(f"native kernels: {isa!r} is not one of the variants this CPU runs {cpu_isas()}")
        why = unsupported(engine)
        if why:
            raise NanoseekError(f"native kernels: {why}")
        engine = getattr(engine, "runner", engine)  # the engine's ModelRunner holds the weights and caches
        self.isa, self.threads, self.engine = isa, threads, engine
        # kv_b_proj's per-head W_UK / W_UV: the engine keeps them fp32 (its bmm cannot take quantised weights), which
        # at batch 1 is ~1/6 of an int8 token's weight bytes on the 0.54B config; quantised here by default when the
        # engine's other weights are (as llama.cpp's q8_0 / q4_0 quantise attn_k_b / attn_v_b)
        self.quantize_kv_b = engine.quant is not None if quantize_kv_b is None else quantize_kv_b
        self._kv_b_choice = quantize_kv_b  # None: as each model's weights (the MTP module's may be draft_quant)
        self._lib, self._w = library(), _Weights()
        # the lengths and picks of a step, written in place each call (numpy: a list is copied in ~1 us, where
        # torch.as_tensor takes ~5: at batch 1 on small models the wrapper's Python is as long as the step itself)
        self._lens = np.zeros(engine.max_batch_size, dtype=np.int64)
        self._pick = np.zeros(engine.max_batch_size, dtype=np.int64)
        self._lens_ptr, self._pick_ptr = self._lens.ctypes.data, self._pick.ctypes.data
        self._handle = self._model(engine.layers, engine.caches, engine.norm, engine.lm_head, engine.quant)
        self._mtp_handle = None
        if engine.mtp_layers:  # the first MTP module: its block over its own cache, its head norm, the shared head
            lw = engine.mtp_layers[0]  # (or the engine's draft_quant copies of them)
            draft = getattr(engine, "draft_quant", None) or engine.quant
            self._mtp_handle = self._model(engine.mtp_layers[:1], engine.mtp_caches[:1], lw.head_norm,
                                           getattr(engine, "draft_lm_head", engine.lm_head), draft)
            self._mtp_eh_proj = self._w.weight(lw.eh_proj)
            self._lib.ns_model_set_mtp(self._mtp_handle, self._w.f32(lw.enorm), self._w.f32(lw.hnorm),
                                       ctypes.byref(self._mtp_eh_proj))

    def _model(self, layer_weights: list, caches: list[torch.Tensor], norm: torch.Tensor, lm_head,
               quant: str | None) -> int:
        """A C model over these blocks (LayerWeights, quantised in `quant` mode) and their caches, with the engine's
        embedding and RoPE tables, and `norm` and `lm_head` after them."""
        engine, cfg, w = self.engine, self.engine.config, self._w
        layers = (_Layer * len(layer_weights))()
        for out, lw, cache_t in zip(layers, layer_weights, caches, strict=True):
            out.attn_norm, out.q_norm = w.f32(lw.attn_norm), w.f32(lw.q_norm)
            out.kv_norm, out.ffn_norm = w.f32(lw.kv_norm), w.f32(lw.ffn_norm)
            out.wq_a_kv_a, out.wq_b, out.wo = w.weight(lw.wq_a_kv_a), w.weight(lw.wq_b), w.weight(lw.wo)
            w_uk, w_uv = self.kv_b_heads(lw, quant)
            out.w_uk, out.w_uv = w.array(w_uk), w.array(w_uv)
            out.ffn_gate_up, out.ffn_down = w.weight(lw.mlp_gate_up), w.weight(lw.mlp_down)
            out.moe = int(lw.moe)
            if lw.moe:
                out.gate_w, out.gate_bias = w.f32(lw.gate_w), w.f32(lw.gate_bias)
                out.experts_gate_up = w.array(lw.experts_gate_up)
                out.experts_down = w.array(lw.experts_down)
            out.cache = w.ptr(cache_t)  # the engine's paged cache itself [num_blocks, bs, c+r]: written in place
            out.block_table = w.ptr(engine.block_table)  # the engine's table, read at every step (int32)
        w.keep.append(layers)
        c = _Config(
            n_layers=len(layer_weights), hidden=cfg.hidden_size, vocab=cfg.vocab_size,
            n_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
            nope=cfg.qk_nope_head_dim, rope=cfg.qk_rope_head_dim, v_head=cfg.v_head_dim,
            n_routed=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group,
            top_k=cfg.num_experts_per_tok, norm_topk_prob=int(cfg.norm_topk_prob),
            rope_interleave=int(cfg.rope_interleave), max_batch=engine.max_batch_size,
            rows=engine.rows, eps=cfg.rms_norm_eps, softmax_scale=cfg.softmax_scale,
            routed_scaling_factor=cfg.routed_scaling_factor, block_size=engine.block_size,
            max_blocks=engine.blocks_per_slot, num_blocks=engine.num_blocks)
        self.max_batch, self.hidden_size, self.vocab_size = engine.max_batch_size, cfg.hidden_size, cfg.vocab_size
        head = w.weight(lm_head)
        handle = self._lib.ns_model_new(ctypes.byref(c), layers, w.ptr(engine.embed), w.f32(norm),
                                        ctypes.byref(head), w.f32(engine.cos), w.f32(engine.sin),
                                        ISAS.index(self.isa))
        if not handle:
            raise NanoseekError(f"native kernels: could not create the model ({self.isa}; out of memory?)")
        return handle

    def kv_b_heads(self, lw, quant: str | None = "engine") -> tuple[list, list]:
        """The per-head W_UK^T [c, nope] and W_UV [v, c] of a layer as this decoder runs them: fp32 tensors, or
        quant.Int8Weight / Int4Weight when quantize_kv_b (default: when the layer's weights are quantised, in their
        mode `quant`, by default the engine's)."""
        quant = self.engine.quant if quant == "engine" else quant
        w_uk = list(lw.w_uk.transpose(1, 2).contiguous().unbind(0))
        w_uv = list(lw.w_uv.unbind(0))
        if quant is not None if self._kv_b_choice is None else self._kv_b_choice:
            mode = quant or "int8"
            w_uk = [quantize(m, mode, self.engine.group_size) for m in w_uk]
            w_uv = [quantize(m, mode, self.engine.group_size) for m in w_uv]
        return w_uk, w_uv

    def __del__(self):
        for name in ("_handle", "_mtp_handle"):
            handle = getattr(self, name, None)
            setattr(self, name, None)
            if handle:
                self._lib.ns_model_free(handle)

    def _run(self, handle: int, tokens: torch.Tensor, lengths, h_in: torch.Tensor | None, pick,
             want_hidden: bool, want_logits: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if tokens.dtype != torch.int64 or not tokens.is_contiguous():
            tokens = tokens.to(torch.int64).contiguous()
        n, s = tokens.shape
        if n > self.max_batch or len(lengths) != n:
            raise NanoseekError(f"native decode: {n} slots (max_batch_size {self.max_batch}) with {len(lengths)} "
                                f"lengths")
        self._lens[:n] = lengths
        if pick is not None:
            self._pick[:n] = pick
        hidden = torch.empty(n, s, self.hidden_size) if want_hidden else None
        logits = (torch.empty(n, self.vocab_size) if pick is not None else torch.empty(n, s, self.vocab_size)
                  ) if want_logits else None
        if h_in is not None and (h_in.dtype != torch.float32 or not h_in.is_contiguous()):
            h_in = h_in.float().contiguous()
        step = _Step(n, s, tokens.data_ptr(), self._lens_ptr, None if pick is None else self._pick_ptr,
                     None if h_in is None else h_in.data_ptr(), None if hidden is None else hidden.data_ptr(),
                     None if logits is None else logits.data_ptr())
        rc = self._lib.ns_forward(handle, ctypes.byref(step), self.threads or torch.get_num_threads())
        if rc:
            why = {-1: "out of memory", -2: "a position past the cache", -3: "a token id outside the vocabulary",
                   -5: "a pick outside the slot's tokens", -6: "a block table entry outside the cache"}
            raise NanoseekError(f"native decode failed: {why.get(rc, rc)}")
        return hidden, logits

    def forward(self, tokens: torch.Tensor, lengths, want_hidden: bool = True, want_logits: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """tokens [n, S] for slots 0..n-1 at positions lengths[i] + 0..S-1 -> (hidden [n, S, D] before the final
        norm, fp32 logits [n, S, V]); writes the latents into the engine's caches (lengths are left alone)."""
        return self._run(self._handle, tokens, lengths, None, None, want_hidden, want_logits)

    def decode(self, tokens: torch.Tensor, lengths) -> torch.Tensor:
        """One token per slot for slots 0..n-1 (tokens [n]) -> fp32 logits [n, V], as Engine.decode."""
        return self._run(self._handle, tokens.view(-1, 1), lengths, None, None, False, True)[1][:, 0]

    def mtp(self, hidden: torch.Tensor, next_tokens: torch.Tensor, lengths, pick=None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first MTP module, as Engine._mtp / _mtp_logits: position j of slot i pairs the main model's hidden
        state hidden[i, j] (before the final norm) with next_tokens[i, j], at positions lengths[i] + j of the MTP
        cache -> (h' [n, S, D], fp32 logits [n, S, V], or [n, V] at position pick[i] of each slot)."""
        if self._mtp_handle is None:
            raise NanoseekError("native kernels: this checkpoint has no MTP module")
        return self._run(self._mtp_handle, next_tokens, lengths, hidden, pick, True, True)

    PHASES = ("q/kv projections", "attention", "o_proj", "router", "FFN gate/up", "FFN down", "lm_head", "other")

    def profile(self, enable: bool = True) -> dict[str, float]:
        """Seconds per phase of the step (native.h NS_PROF_*) summed since the last call, then reset; the timers
        run while enabled (a clock read per phase: ~1% slower)."""
        out = (ctypes.c_double * len(self.PHASES))()
        self._lib.ns_profile(self._handle, int(enable), out)
        return dict(zip(self.PHASES, out, strict=True))

    def linear(self, weight, x: torch.Tensor) -> torch.Tensor:
        """x [m, K] fp32 -> x W^T [m, N] through this variant's projection kernel (for tests)."""
        w = self._w.weight(weight)
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], w.n)
        if self._lib.ns_linear(self._handle, ctypes.byref(w), x.data_ptr(), x.shape[0], y.data_ptr(),
                               self.threads or torch.get_num_threads()):
            raise NanoseekError("native linear failed (out of memory, or m x K too large for the scratch)")
        return y


def native_decoder(engine, threads: int | None = None) -> tuple[NativeDecoder | None, str]:
    """(a NativeDecoder for the engine, or None; one line saying which path decode takes and why)."""
    isa, why = choose_isa()
    if isa is None:
        return None, f"PyTorch decode ({why})"
    reason = unsupported(engine)
    if reason:
        return None, f"PyTorch decode ({reason})"
    return NativeDecoder(engine, isa, threads), f"native {isa} decode ({why})"


__all__ = ["ISAS", "NativeDecoder", "choose_isa", "cpu_isas", "library", "native_decoder", "status", "unsupported"]
