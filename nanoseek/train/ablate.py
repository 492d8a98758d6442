"""The DeepSeek-V2/V3 ablations, re-run at CPU scale: `nanoseek ablate {balance,mla,mtp,fp8}`, ablate(AblateConfig).

Every ablation trains a few variants of the same model on the same data, seed, batches and steps, changing one
thing, with the pre-training recipe (trainer.py's Trainer and train(), pretrain.pretrain_loss: V3 defaults for
everything not being ablated):

  balance  auxiliary-loss-free bias balancing (gamma > 0, alpha = 0) vs the sequence-wise balance loss only
           (gamma = 0, alpha > 0) vs no balancing: val loss and MaxVio over training      (V3 paper 2.1.2, 4.5.2)
  mla      MLA vs standard multi-head (MHA) and grouped-query (GQA) attention at a matched parameter budget:
           val loss and KV-cache bytes per token                                        (V2 paper 2.1, App. D)
  mtp      with vs without the multi-token-prediction objective, at the same steps and at the same training
           FLOPs: next-token val loss                                                  (V3 paper 2.2, 4.5.1)
  fp8      FP8 (block-wise e4m3 GEMMs) vs bf16 vs fp32: relative loss difference      (V3 paper 3.3, App. B.1)

The tokenizer and token data are prepared once per ablation in DIR (default runs/ablate/<name>) and shared:
  DIR/tokenizer/ DIR/data/ DIR/<variant>/{run.json, loss.png, history.json} DIR/ablation.{json,md,png}
A variant is finished when its run.json exists; a rerun skips finished variants and retrains the others from step 0
(variants are short, so they write no checkpoints). The MHA/GQA attention below is ablation-only: model.py stays
the HF DeepseekV3 architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.data import TokenDataset, default_corpus_files, read_documents
from nanoseek.errors import NanoseekError
from nanoseek.model import MLA, Transformer, apply_rope
from nanoseek.osutil import check_writable, load_average, write_file_atomically, write_text_atomically
from nanoseek.train.pretrain import load_config, prepare_corpus, pretrain_loss
from nanoseek.train.trainer import SupervisedStep, TrainConfig, Trainer, resolve_device, set_threads, train

ABLATIONS = ("balance", "mla", "mtp", "fp8")
KV_BYTES_PER_ELEMENT = 2  # the KV cache is counted in bf16, as served (V2 paper Table 1 counts elements)
PARAM_TOLERANCE = 0.05  # MHA/GQA attention parameters per layer within 5% of MLA's (total model: within 1%)


@dataclass(kw_only=True)
class AblateConfig(TrainConfig):
    """One ablation: which, the variants' settings, the model and corpus (as PretrainConfig), and the training
    settings every variant shares (short runs: no checkpoints, no samples)."""

    ablation: str  # one of ABLATIONS
    preset: str = "cpu"  # model preset, when no config is given
    config: Path | None = None  # a config.json (HF DeepseekV3 field names) instead of a preset
    data: list[Path] | None = None  # .txt / .jsonl files (None: the bundled tinyshakespeare + GSM8K train)
    vocab_size: int | None = None  # tokenizer vocabulary when one is trained (None: the config's vocab_size)
    gammas: list[float] = field(default_factory=lambda: [0.001, 0.01])  # balance: aux-loss-free bias speeds
    alphas: list[float] = field(default_factory=lambda: [0.01, 0.001])  # balance: balance-loss weights
    variants: list[str] | None = None  # run only these variants (None: all)
    kv_heads: int | None = None  # mla: key/value heads of the GQA variant (None: num_attention_heads / 2)
    steps: int = 150
    eval_every: int = 25
    eval_iters: int = 8
    save_every: int = 0
    sample_every: int = 0
    out: Path | None = None  # None: runs/ablate/<ablation>


# --- the ablation-only attention: standard MHA / GQA with RoPE on the whole head ----------------------------------
class GQAttention(nn.Module):
    """Standard attention with n_kv_heads key/value heads: MHA when n_kv_heads == n_heads, GQA when fewer.

    q = W_Q h [B,T,H,hd], k = W_K h and v = W_V h [B,T,H_kv,hd]; RoPE on the *full* head dim of q and k (Llama
    style, half-split pairs), so no decoupled rope part; each K/V head serves H/H_kv query heads. The KV cache holds
    k and v: 2 * H_kv * hd elements per token per layer. Same call signature as MLA so it drops into a Block.
    """

    def __init__(self, config: ModelConfig, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        if n_heads % n_kv_heads or head_dim % 2:
            raise NanoseekError(f"ablate mla: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}) "
                                f"and head_dim ({head_dim}) even")
        if config.rope_scaling:
            raise NanoseekError("ablate mla: the MHA/GQA variants support plain RoPE only (the config sets "
                                "rope_scaling)")
        d = config.hidden_size
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(d, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,T,D]; the Block's cos/sin are for MLA's rope dims only, so the full-head angles are computed here
        for positions 0..T-1 (the only positions training uses); attn_mask None = causal."""
        bsz, seqlen, _ = x.shape
        freqs = torch.arange(seqlen, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq  # [T, hd/2]
        c, s = freqs.cos(), freqs.sin()
        q = apply_rope(self.q_proj(x).view(bsz, seqlen, self.n_heads, -1).transpose(1, 2), c, s, False)
        k = apply_rope(self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, -1).transpose(1, 2), c, s, False)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, -1).transpose(1, 2)  # [B,H_kv,T,hd]
        if self.n_kv_heads < self.n_heads:  # each K/V head serves a group of consecutive query heads
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # attend in fp32 under CPU autocast, as MLA does, so the two differ in architecture, not in kernels
        upcast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        return self.o_proj(o.transpose(1, 2).reshape(bsz, seqlen, -1).to(x.dtype))  # [B,H,T,hd] -> [B,T,D]


# --- parameter, FLOP and KV-cache accounting ----------------------------------------------------------------------
def mla_attention_params(config: ModelConfig) -> int:
    """Parameters of one MLA block's attention (projections and the two latent norms); counted on the meta device,
    so nothing is allocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in MLA(config).parameters())


def gqa_attention_params(hidden_size: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """q_proj + o_proj (H * hd each way) + k_proj + v_proj (H_kv * hd each)."""
    return 2 * hidden_size * head_dim * (n_heads + n_kv_heads)


def matched_head_dim(config: ModelConfig, n_kv_heads: int) -> int:
    """The even head dim (RoPE rotates pairs) whose MHA/GQA attention has the parameter count closest to MLA's,
    keeping MLA's number of query heads."""
    target, d, h = mla_attention_params(config), config.hidden_size, config.num_attention_heads
    exact = target / (2 * d * (h + n_kv_heads))
    candidates = {max(2, 2 * math.floor(exact / 2)), max(2, 2 * math.ceil(exact / 2))}
    return min(candidates, key=lambda hd: abs(gqa_attention_params(d, h, n_kv_heads, hd) - target))


def kv_cache_bytes_per_token(config: ModelConfig, attention: str = "mla", n_kv_heads: int | None = None,
                             head_dim: int | None = None, bytes_per_element: int = KV_BYTES_PER_ELEMENT) -> int:
    """KV-cache bytes one token costs across the main model's layers (the MTP module is not used to decode).

    MLA: (kv_lora_rank + qk_rope_head_dim) * layers * bytes  (the latent c_kv and the shared rope key, V2 Table 1)
    MHA/GQA: 2 * n_kv_heads * head_dim * layers * bytes      (k and v of every KV head)
    """
    if attention == "mla":
        return config.kv_cache_bytes_per_token(bytes_per_element)
    if n_kv_heads is None or head_dim is None:
        raise NanoseekError(f"kv_cache_bytes_per_token: {attention} needs n_kv_heads and head_dim")
    return 2 * n_kv_heads * head_dim * config.num_hidden_layers * bytes_per_element


# --- variants -------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One run of an ablation: training-argument overrides plus an optional change to the freshly built model."""

    name: str  # run directory and table row
    label: str  # legend text
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields: bias_update_speed, dtype...
    attention: str = "mla"  # "mla", "mha" or "gqa"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    fp8: bool = False

    def attention_delta(self, config: ModelConfig) -> int:
        """Parameters per block of this variant's attention minus MLA's (0 for MLA)."""
        if self.attention == "mla":
            return 0
        return (gqa_attention_params(config.hidden_size, config.num_attention_heads, self.n_kv_heads, self.head_dim)
                - mla_attention_params(config))

    def params(self, config: ModelConfig) -> dict[str, int]:
        """Analytic counts as config.num_params() reports them, with the attention swap applied."""
        p, delta = config.num_params(), self.attention_delta(config)
        main, mtp = config.num_hidden_layers * delta, config.num_nextn_predict_layers * delta
        return {"total": p["total"] + main, "active": p["active"] + main, "mtp_total": p["mtp_total"] + mtp}

    def flops_per_token(self, config: ModelConfig, seq_len: int, mtp: bool) -> float:
        """Training FLOPs per token (forward + backward), config.flops_per_token plus two corrections: the swapped
        attention's weights and score dims, and the MTP module's pass through the shared output head (a V x D
        matmul that config.flops_per_token does not count because the head's parameters belong to the main model)."""
        f = config.flops_per_token(seq_len, mtp)
        layers = config.num_hidden_layers + (config.num_nextn_predict_layers if mtp else 0)
        if self.attention != "mla":
            h = config.num_attention_heads
            score_dims = 2 * self.head_dim - (config.qk_head_dim + config.v_head_dim)  # q.k and p.v dims per head
            f += 3 * (2 * layers * self.attention_delta(config) + 2 * layers * h * score_dims * (seq_len + 1) / 2)
        if mtp:
            f += 3 * 2 * config.num_nextn_predict_layers * config.vocab_size * config.hidden_size
        return f

    def describe(self, config: ModelConfig) -> dict[str, Any]:
        d: dict[str, Any] = {"attention": self.attention, "fp8": self.fp8, **self.overrides}
        if self.attention != "mla":
            d.update(n_heads=config.num_attention_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                     rope="full head")
        return d

    def build(self, config: ModelConfig, seed: int, device: torch.device) -> Transformer:
        """The model of this variant: same seed, then the attention swap (re-initialised with model.py's scheme)."""
        torch.manual_seed(seed)
        with torch.device(device):
            model = Transformer(config)
            if self.attention != "mla":
                for block in [*model.layers, *model.mtp]:
                    block.self_attn = GQAttention(config, config.num_attention_heads, self.n_kv_heads, self.head_dim)
                torch.manual_seed(seed)
                model.reset_parameters()  # normal(0, std); o_proj scaled by 1/sqrt(2 * layers), as for MLA
        if self.fp8:
            try:
                from nanoseek.model import enable_fp8
            except ImportError:
                raise NanoseekError("ablate fp8: nanoseek.fp8.enable_fp8 is not available in this version") from None
            enable_fp8(model)
        return model


def balance_variants(config: ModelConfig, cfg: AblateConfig) -> list[Variant]:
    """Aux-loss-free (gamma, alpha 0) vs balance loss only (gamma 0, alpha) vs neither."""
    out = [Variant(f"aux-free-g{g:g}", f"aux-loss-free, gamma {g:g}", {"bias_update_speed": g, "balance_alpha": 0.0})
           for g in cfg.gammas]
    out += [Variant(f"aux-loss-a{a:g}", f"balance loss only, alpha {a:g}", {"bias_update_speed": 0.0,
                                                                           "balance_alpha": a})
            for a in cfg.alphas]
    out.append(Variant("none", "no balancing", {"bias_update_speed": 0.0, "balance_alpha": 0.0}))
    return out


def mla_variants(config: ModelConfig, cfg: AblateConfig) -> list[Variant]:
    """MLA vs MHA vs GQA, each keeping MLA's query heads, head dim chosen to match MLA's attention parameters."""
    h = config.num_attention_heads
    kv = cfg.kv_heads or max(1, h // 2)
    if h % kv or kv >= h:
        raise NanoseekError(f"--kv-heads {kv} must divide num_attention_heads ({h}) and be smaller than it")
    hd_mha, hd_gqa = matched_head_dim(config, h), matched_head_dim(config, kv)
    return [Variant("mla", "MLA"),
            Variant("mha", f"MHA ({h} x {hd_mha})", attention="mha", n_kv_heads=h, head_dim=hd_mha),
            Variant("gqa", f"GQA ({h} q / {kv} kv heads x {hd_gqa})", attention="gqa", n_kv_heads=kv,
                    head_dim=hd_gqa)]


def mtp_variants(config: ModelConfig, cfg: AblateConfig) -> list[Variant]:
    """MTP vs none at the same steps (MTP spends more FLOPs), and none with more steps to match MTP's FLOPs."""
    if not cfg.mtp_lambda > 0:
        raise NanoseekError("ablate mtp: --mtp-lambda must be > 0 (it is the weight of the MTP variant)")
    if config.num_nextn_predict_layers < 1:
        raise NanoseekError("ablate mtp: the config has no MTP module (num_nextn_predict_layers is 0)")
    base = Variant("base", "")
    ratio = base.flops_per_token(config, cfg.seq_len, True) / base.flops_per_token(config, cfg.seq_len, False)
    steps = round(cfg.steps * ratio)
    return [Variant("mtp", f"MTP, lambda {cfg.mtp_lambda:g}", {"mtp_lambda": cfg.mtp_lambda}),
            Variant("no-mtp", "no MTP, same steps", {"mtp_lambda": 0.0}),
            Variant("no-mtp-flops", f"no MTP, same FLOPs ({steps} steps)", {"mtp_lambda": 0.0, "steps": steps})]


def fp8_variants(config: ModelConfig, cfg: AblateConfig) -> list[Variant]:
    """bf16 (the baseline, as in V3's comparison), FP8 GEMMs with the rest in bf16, and fp32 as a yardstick."""
    return [Variant("bf16", "bf16 autocast", {"dtype": "bf16"}),
            Variant("fp8", "FP8 GEMMs (e4m3, 1x128 / 128x128 scales)", {"dtype": "bf16"}, fp8=True),
            Variant("fp32", "fp32", {"dtype": "fp32"})]


VARIANTS: dict[str, Callable[[ModelConfig, AblateConfig], list[Variant]]] = {
    "balance": balance_variants, "mla": mla_variants, "mtp": mtp_variants, "fp8": fp8_variants}


# --- running a variant ----------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    write_text_atomically(path, json.dumps(obj, indent=1) + "\n")


def run_variant(variant: Variant, ablation: str, config: ModelConfig, cfg: AblateConfig, out: Path,
                train_ds: TokenDataset, val_batches: list, device: torch.device) -> dict[str, Any]:
    """Train one variant into out/<name> (or read it back if finished): {"history", "record"}."""
    vdir = out / variant.name
    if (vdir / "run.json").is_file() and (vdir / "history.json").is_file():
        print(f"[{ablation}] {variant.name}: finished earlier, skipped ({vdir / 'run.json'})")
        return {"history": json.loads((vdir / "history.json").read_text()),
                "record": json.loads((vdir / "run.json").read_text())}
    shutil.rmtree(vdir, ignore_errors=True)  # an unfinished variant starts again from step 0
    vdir.mkdir(parents=True)
    vcfg = dataclasses.replace(cfg, **variant.overrides, save_every=0, sample_every=0, out=vdir)
    model = variant.build(config, cfg.seed, device)
    # no checkpoints: an unfinished variant is retrained from step 0 by the next run of the ablation
    trainer = Trainer(model, vcfg, stage=f"{ablation}/{variant.name}", checkpoints=False,
                      flops_per_token=lambda seq_len: variant.flops_per_token(config, seq_len, vcfg.mtp_lambda > 0))
    n = variant.params(config)
    print(f"[{ablation}] {variant.name}: {variant.label} | {n['total'] / 1e6:.3f}M params | {vcfg.steps} steps | "
          f"{str(trainer.amp_dtype).removeprefix('torch.')}")

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return train_ds.get_batch(vcfg.batch_size, vcfg.seq_len, step, micro=micro, seed=vcfg.seed)

    train(trainer, SupervisedStep(get_batch, pretrain_loss(vcfg.mtp_lambda, vcfg.balance_alpha), val_batches))
    _write_json(vdir / "history.json", trainer.history)
    # this variant's parameter counts and attention in run.json; run.json last: its presence marks it finished
    record = dataclasses.replace(trainer.run_record(), params_total=n["total"], params_active=n["active"],
                                 params_mtp=n["mtp_total"],
                                 config={**config.to_hf_dict(), "ablation_variant": variant.describe(config)})
    trainer.write_report(record)
    return {"history": trainer.history, "record": record.to_dict()}


# --- summaries, tables, plots ------------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _smooth(xs: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def relative_difference(history: dict, baseline: dict, window: int = 10) -> list[tuple[int, float]]:
    """(step, (L - L_base) / L_base) of the smoothed train losses at the steps both runs have: the runs see the same
    batch at every step, so the per-step difference is paired, not noise between different data."""
    a = {r["step"]: r["loss"] for r in history["train"]}
    b = {r["step"]: r["loss"] for r in baseline["train"]}
    steps = sorted(set(a) & set(b))
    sa, sb = _smooth([a[s] for s in steps], window), _smooth([b[s] for s in steps], window)
    return [(s, (x - y) / y) for s, x, y in zip(steps, sa, sb, strict=True)]


def summarize(ablation: str, variants: list[Variant], results: list[dict[str, Any]], config: ModelConfig,
              cfg: AblateConfig) -> list[dict[str, Any]]:
    """One row of numbers per variant (the table and ablation.json)."""
    rows = []
    base = results[0]
    for v, res in zip(variants, results, strict=True):
        hist, rec = res["history"], res["record"]
        train_h = hist["train"]
        tail = train_h[len(train_h) // 2:]  # second half of the run
        row: dict[str, Any] = {
            "variant": v.name, "label": v.label, "settings": v.describe(config), "steps": rec["steps"],
            "final_val_loss": rec["final_val_loss"], "final_train_loss": rec["final_train_loss"],
            "params_total": rec["params_total"], "params_active": rec["params_active"], "flops": rec["flops"],
            "train_seconds": rec["train_seconds"], "tokens_per_second": rec["tokens_per_second"]}
        if ablation == "balance":
            row["maxvio_final"] = _mean([r["maxvio"] for r in train_h[-max(1, len(train_h) // 10):]])
            row["maxvio_mean"] = _mean([r["maxvio"] for r in train_h])
            row["maxvio_second_half"] = _mean([r["maxvio"] for r in tail])
        if ablation == "mla":
            row["attention_params_per_layer"] = (mla_attention_params(config) + v.attention_delta(config))
            row["kv_bytes_per_token"] = kv_cache_bytes_per_token(config, v.attention, v.n_kv_heads, v.head_dim)
        if ablation == "mtp":
            row["loss_mtp_second_half"] = _mean([r["loss_mtp"] for r in tail if "loss_mtp" in r])
        if ablation == "fp8":
            rel = relative_difference(hist, base["history"])
            warm = [d for s, d in rel if s > cfg.warmup_steps]
            row["rel_diff_train_mean"] = _mean(warm)
            row["rel_diff_train_max_abs"] = max((abs(d) for d in warm), default=None)
            bval = base["record"]["final_val_loss"]
            row["rel_diff_val_final"] = (rec["final_val_loss"] - bval) / bval if bval else None
        rows.append(row)
    return rows


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown_table(ablation: str, rows: list[dict[str, Any]], config: ModelConfig) -> str:
    base = rows[0]
    if ablation == "balance":
        head = ["variant", "gamma", "alpha", "final val loss", "MaxVio (last 10%)", "MaxVio (mean)", "tok/s"]
        body = [[r["label"], _fmt(r["settings"]["bias_update_speed"], "g"), _fmt(r["settings"]["balance_alpha"], "g"),
                 _fmt(r["final_val_loss"]), _fmt(r["maxvio_final"], ".3f"), _fmt(r["maxvio_mean"], ".3f"),
                 _fmt(r["tokens_per_second"], ".0f")] for r in rows]
    elif ablation == "mla":
        mha = next((r for r in rows if r["variant"] == "mha"), base)
        head = ["variant", "attn params / layer", "total params", "KV bytes / token (bf16)", "KV vs MHA",
                "final val loss", "tok/s"]
        body = [[r["label"], f"{r['attention_params_per_layer']:,} "
                 f"({(r['attention_params_per_layer'] / base['attention_params_per_layer'] - 1):+.1%})",
                 f"{r['params_total']:,} ({r['params_total'] / base['params_total'] - 1:+.2%})",
                 f"{r['kv_bytes_per_token']:,}", f"{r['kv_bytes_per_token'] / mha['kv_bytes_per_token']:.0%}",
                 _fmt(r["final_val_loss"]), _fmt(r["tokens_per_second"], ".0f")] for r in rows]
    elif ablation == "mtp":
        head = ["variant", "steps", "training FLOPs", "train seconds", "final val loss (next token)",
                "vs MTP"]
        body = [[r["label"], str(r["steps"]), f"{r['flops']:.3g}", f"{r['train_seconds']:.0f}",
                 _fmt(r["final_val_loss"]), _fmt(r["final_val_loss"] - base["final_val_loss"], "+.4f")]
                for r in rows]
    else:
        head = ["variant", "final val loss", "val rel. diff vs bf16", "train rel. diff vs bf16 (mean)",
                "max abs train rel. diff", "tok/s"]
        body = [[r["label"], _fmt(r["final_val_loss"]), _fmt(r["rel_diff_val_final"], "+.3%"),
                 _fmt(r["rel_diff_train_mean"], "+.3%"), _fmt(r["rel_diff_train_max_abs"], ".3%"),
                 _fmt(r["tokens_per_second"], ".0f")] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


NOTES = {
    "balance": "MaxVio = max_i load_i / mean load - 1 on each step's batch, averaged over MoE layers (V3 paper's "
               "MaxVio_batch). Val loss = next-token cross-entropy on fixed val batches.",
    "mla": "Matched budget: MHA/GQA keep MLA's query heads and take the even head dim whose attention parameters "
           "(q, k, v, o) are closest to MLA's (q_a, q_b, kv_a, kv_b, o, latent norms); RoPE on the full head "
           "(MLA: on the decoupled qk_rope_head_dim part only). KV bytes: MLA (kv_lora_rank + qk_rope_head_dim) x "
           "layers x 2; MHA/GQA 2 x kv_heads x head_dim x layers x 2 (bf16, main model's layers).",
    "mtp": "Val loss is the main next-token loss only (MTP is a training objective). 'Same FLOPs' gives the no-MTP "
           "run round(steps x F_mtp / F_no_mtp) steps, counting the MTP module and its pass through the shared head; "
           "its lr schedule is stretched to its own length.",
    "fp8": "Relative difference = (L - L_bf16) / L_bf16 of the 10-step moving average of the train loss on the same "
           "batches, after warmup; V3 reports < 0.25% for FP8 vs BF16. fp32 shows how far a different precision "
           "moves the loss at all at this scale.",
}


def plot_ablation(ablation: str, rows: list[dict[str, Any]], results: list[dict[str, Any]], path: Path,
                  title: str) -> Path:
    """Val-loss curves (x = training FLOPs for mtp, else step) plus one ablation-specific panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), tight_layout=True)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    for row, res in zip(rows, results, strict=True):
        val = res["history"]["val"]
        per_step = row["flops"] / max(row["steps"], 1)
        xs = [r["step"] * per_step if ablation == "mtp" else r["step"] for r in val]
        ax.plot(xs, [r["loss"] for r in val], "o-", ms=3, lw=1.2, label=row["label"])
    ax.set_xlabel("training FLOPs" if ablation == "mtp" else "step")
    ax.set_ylabel("val loss (next-token cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    if ablation == "balance":
        for row, res in zip(rows, results, strict=True):
            tr = res["history"]["train"]
            ax2.plot([r["step"] for r in tr], _smooth([r["maxvio"] for r in tr], 5), lw=1, label=row["label"])
        ax2.set_ylabel("MaxVio (5-step mean)")
        ax2.set_xlabel("step")
    elif ablation == "mla":
        names = [r["variant"].upper() for r in rows]
        ax2.bar(names, [r["kv_bytes_per_token"] for r in rows], color=["tab:blue", "tab:orange", "tab:green"])
        ax2.set_ylabel("KV cache bytes per token (bf16, all layers)")
    elif ablation == "mtp":
        for row, res in zip(rows, results, strict=True):
            tr = res["history"]["train"]
            ax2.plot([r["step"] for r in tr], _smooth([r["loss"] for r in tr], 10), lw=1, label=row["label"])
        ax2.set_ylabel("train next-token loss (10-step mean)")
        ax2.set_xlabel("step")
    else:
        base = results[0]["history"]
        for i, (row, res) in enumerate(zip(rows, results, strict=True)):
            if i:  # same colour as in the val-loss panel
                rel = relative_difference(res["history"], base)
                ax2.plot([s for s, _ in rel], [100 * d for _, d in rel], lw=1, color=f"C{i}",
                         label=f"{row['label']} vs {rows[0]['label']}")
        for y in (-0.25, 0.25):
            ax2.axhline(y, color="grey", ls="--", lw=0.8)
        ax2.set_ylabel("relative train-loss difference, % (10-step mean)")
        ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    if ablation != "mla":
        ax2.legend(fontsize=8)
    return write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=80))


# --- the stage --------------------------------------------------------------------------------------------------------
def prepare_shared_data(cfg: AblateConfig, config: ModelConfig, out: Path) -> tuple[TokenDataset,
                                                                                          TokenDataset]:
    """Tokenizer and token data in `out`, once for all variants (reused on reruns)."""
    paths = [Path(p) for p in (cfg.data or default_corpus_files())]
    for p in paths:
        read_documents(p)  # raises NanoseekError naming a missing or unsupported file, before any work
    check_writable(out)
    # the val split does not follow --seed: runs with other seeds (a noise estimate) are scored on the same documents
    _, train_ds, val_ds = prepare_corpus(paths, out, config, cfg.vocab_size, cfg.seq_len, seed=0)
    return train_ds, val_ds


def ablate(cfg: AblateConfig) -> Path:
    """Train every variant of cfg.ablation (skipping finished ones), then write the table, JSON and plot; returns
    the ablation's directory."""
    t_start = time.time()
    if cfg.ablation not in ABLATIONS:
        raise NanoseekError(f"unknown ablation {cfg.ablation!r} (choose from {', '.join(ABLATIONS)})")
    threads = set_threads(cfg.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    device = resolve_device(cfg.device)
    config = load_config(cfg.preset, cfg.config)
    cfg.check(config)
    out: Path = cfg.out or Path("runs/ablate") / cfg.ablation
    variants = VARIANTS[cfg.ablation](config, cfg)  # argument errors before the data work
    if cfg.variants:
        unknown = sorted(set(cfg.variants) - {v.name for v in variants})
        if unknown:
            raise NanoseekError(f"--variants: {', '.join(unknown)} is not a variant of {cfg.ablation} (choose from "
                                f"{', '.join(v.name for v in variants)})")
        variants = [v for v in variants if v.name in cfg.variants]
    train_ds, val_ds = prepare_shared_data(cfg, config, out)
    val_batches = [val_ds.get_batch(cfg.batch_size, cfg.seq_len, step=i, seed=0) for i in range(cfg.eval_iters)]
    results = [run_variant(v, cfg.ablation, config, cfg, out, train_ds, val_batches, device) for v in variants]

    rows = summarize(cfg.ablation, variants, results, config, cfg)
    source = str(cfg.config) if cfg.config else f"preset {cfg.preset}"
    title = (f"nanoseek ablate {cfg.ablation}: {source}, {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} "
             f"tokens, seed {cfg.seed}")
    table = markdown_table(cfg.ablation, rows, config)
    load = load_average()
    _write_json(out / "ablation.json", {
        "ablation": cfg.ablation, "config": config.to_hf_dict(), "args": cfg.to_dict(), "rows": rows,
        "histories": {v.name: r["history"] for v, r in zip(variants, results, strict=True)},
        "note": NOTES[cfg.ablation], "load_average": load})
    write_text_atomically(out / "ablation.md", f"# {title}\n\n{table}\n{NOTES[cfg.ablation]}\n")
    plot_ablation(cfg.ablation, rows, results, out / "ablation.png", title)
    print(f"\n{title}\n\n{table}\n{NOTES[cfg.ablation]}\n")
    load_text = f"load average {load:.1f}" if load is not None else "load average n/a"
    print(f"done in {(time.time() - t_start) / 60:.1f} min ({load_text}): {out / 'ablation.md'}, "
          f"{out / 'ablation.json'}, {out / 'ablation.png'}")
    return out
