"""`nanoseek pretrain`'s library: tokenizer -> token data -> V3 pre-training objective -> HF checkpoint.

The loss is L_main + lambda * L_MTP + alpha * L_Bal (V3 section 2), on the shared training loop (trainer.py: AdamW,
the WSD learning rate, the auxiliary-loss-free bias update, checkpoints and resume). pretrain(PretrainConfig) is the
stage; pretrain_loss, prepare_tokenizer, prepare_corpus and sample are reused by sft, ablate and the speedrun.
Under torchrun it trains data-parallel with DDP or FSDP2: nanoseek/distributed.py, docs/distributed.md.

Run directory (out):
  tokenizer/  data/  checkpoints/step_NNNNNN/ (HF checkpoint + trainer_state.json + optimizer.pt)
  checkpoints/latest (names the newest complete checkpoint)  final/  run.json  loss.png  peak_flops.json
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek import distributed, expert_parallel
from nanoseek.config import ModelConfig, get_preset
from nanoseek.data import TokenDataset, default_corpus_files, prepare_data, read_documents
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer, enable_fp8
from nanoseek.osutil import available_cpus, check_writable, load_average, write_failed
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.trainer import (
    Batch,
    LossFn,
    SupervisedStep,
    TrainConfig,
    Trainer,
    check_same_config,
    resolve_device,
    resolve_dtype,
    resume_point,
    train,
)


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """A pre-training run: the model (a preset, or a config.json), the corpus, and the shared training settings
    (TrainConfig's defaults are pre-training's)."""

    preset: str = "cpu"  # model preset, when no config is given
    config: Path | None = None  # a config.json (HF DeepseekV3 field names) instead of a preset
    data: list[Path] | None = None  # .txt / .jsonl files (None: the bundled tinyshakespeare + GSM8K train)
    vocab_size: int | None = None  # tokenizer vocabulary when one is trained (None: the config's vocab_size)
    sample_prompt: str = "ROMEO:"  # prompt of the periodic text samples
    fp8: bool = False  # V3's FP8 GEMMs for every projection and expert (emulated exactly; slower on CPU)
    ep: int = 1  # under torchrun: spread each MoE layer's routed experts over this many processes (expert_parallel)


# --- text samples ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.8,
           seed: int = 0) -> str:
    """Continue `prompt` by recomputing the full sequence each token (no KV cache: the engine comes later).

    temperature 0 = greedy. Stops at eos. Token ids past the tokenizer's vocabulary (padding rows of a larger
    embedding) are never sampled. Returns prompt + continuation.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    n_prompt = len(ids)
    gen = torch.Generator(device=device).manual_seed(seed)
    limit = model.config.max_position_embeddings
    try:
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids[-limit:]], device=device))[0, -1].float()  # [V]
            logits[tokenizer.vocab_size:] = float("-inf")
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            if nxt == tokenizer.eos_id:
                break
            ids.append(nxt)
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(ids[n_prompt:])


# --- the objective, tokenizer and data --------------------------------------------------------------------------------
def pretrain_loss(mtp_lambda: float, balance_alpha: float) -> LossFn:
    """L_main + lambda * L_MTP + alpha * L_Bal; stats['loss'] is L_main alone (comparable with the val loss).

    Under torchrun each term is normalised by the whole batch's counts (distributed.loss_norm): the ranks' losses
    and gradients then average to the single-process ones, however the rows or their targets are spread."""

    def loss_fn(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lam = mtp_lambda if model.training else 0.0
        norm = distributed.loss_norm(y, -1, len(model.mtp) if lam else 0)
        loss, stats = model.compute_loss(x, y, mtp_lambda=lam, balance_alpha=balance_alpha if model.training else 0.0,
                                         norm=norm)
        return loss, {"loss": stats["loss_main"], "loss_total": stats["loss"],
                      **{k: v for k, v in stats.items() if k in ("loss_mtp", "loss_balance")}}

    return loss_fn


def load_config(preset: str, config: Path | None) -> ModelConfig:
    """The model config: a config.json (HF DeepseekV3 field names) when given, else the preset."""
    return ModelConfig.load(config) if config else get_preset(preset)


def prepare_tokenizer(paths: list[Path], out_dir: Path, vocab_size: int) -> Tokenizer:
    """out_dir/tokenizer: reused when present, else trained on the documents of `paths`."""
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(tok_dir)
        print(f"tokenizer: reusing {tok_dir} ({tok.vocab_size} tokens; delete it to train a new one)")
        return tok
    t = time.time()
    tmp = out_dir / f".tokenizer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = train_tokenizer((doc for p in paths for doc in read_documents(p)), vocab_size, tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)  # a tokenizer/ without tokenizer.json is a leftover
        os.replace(tmp, tok_dir)  # a half-trained tokenizer must never be mistaken for a finished one
    except OSError as e:
        raise write_failed(tok_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"tokenizer: trained {tok.vocab_size} tokens in {time.time() - t:.1f}s -> {tok_dir}")
    return tok


def prepare_corpus(paths: list[Path], out: Path, config: ModelConfig, vocab_size: int | None, seq_len: int,
                   seed: int) -> tuple[Tokenizer, TokenDataset, TokenDataset]:
    """out/tokenizer (trained or reused) and the train/val token shards in out/data, checked against the model's
    vocabulary and the sequence length. Under torchrun rank 0 builds them and the other ranks reuse them."""
    vocab = vocab_size or config.vocab_size
    if vocab > config.vocab_size:
        raise NanoseekError(f"--vocab-size {vocab} exceeds the model's vocab_size ({config.vocab_size})")
    tokenizer = distributed.main_first(lambda: prepare_tokenizer(paths, out, vocab))
    if tokenizer.vocab_size > config.vocab_size:
        raise NanoseekError(f"{out / 'tokenizer'} has {tokenizer.vocab_size} tokens, more than the model's "
                            f"vocab_size ({config.vocab_size}); delete it or use another --out")
    t = time.time()
    meta = distributed.main_first(lambda: prepare_data(paths, tokenizer, out / "data", seed=seed))
    train_ds = TokenDataset(out / "data" / "train.bin", meta["dtype"])
    val_ds = TokenDataset(out / "data" / "val.bin", meta["dtype"])
    for name, ds in (("train", train_ds), ("val", val_ds)):
        if len(ds) < seq_len + 1:
            raise NanoseekError(f"data: the {name} split has {len(ds)} tokens, fewer than --seq-len + 1 = "
                                f"{seq_len + 1}; add data or lower --seq-len")
    print(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {out / 'data'} "
          f"({time.time() - t:.1f}s)")
    return tokenizer, train_ds, val_ds


# --- the stage ------------------------------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig) -> Path:
    """Pre-train a model into cfg.out; returns the final checkpoint (HF layout + tokenizer).

    One process, or one rank of `torchrun --nproc_per_node=N -m nanoseek pretrain ... [--parallel fsdp]`.
    """
    return distributed.run(resolve_device(cfg.device), lambda device: _pretrain(cfg, device))


def _pretrain(cfg: PretrainConfig, device: torch.device) -> Path:
    t_start = time.time()
    # under torchrun the processes share the cores: by default each gets cores / processes-per-node threads
    threads = cfg.threads or max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if threads < 1:
        raise NanoseekError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    cores, load = available_cpus(), load_average() or 0.0
    if threads > 1 and load > cores and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # measured on the 2-core dev box at load ~7: 2 threads ran 3-5x slower than 1 (docs/pretrain.md)
        print(f"note: the machine is busy (load {load:.1f} on {cores} cores): {threads} OpenMP threads spin-waiting "
              f"on each other can run several times slower; try --threads 1 or OMP_WAIT_POLICY=PASSIVE")
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the tokenizers library's thread pool
    config = load_config(cfg.preset, cfg.config)
    cfg.check(config)
    if cfg.ep > 1 and not distributed.initialized():
        raise NanoseekError(f"--ep {cfg.ep} spreads the experts over processes: start with torchrun "
                            f"--nproc_per_node (a multiple of {cfg.ep})")
    expert_parallel.check(config, cfg.ep, distributed.world_size())
    local_batch = distributed.local_batch_size(cfg.batch_size)  # the batch is global: same run at any world size
    paths = [Path(p) for p in (cfg.data or default_corpus_files())]
    for p in paths:
        read_documents(p)  # raises NanoseekError naming a missing or unsupported file, before any work
    out = Path(cfg.out)
    resume_from = resume_point(out, cfg.resume)
    if resume_from is not None:
        check_same_config(config, resume_from)  # fail before the tokenizer and data work, not after
    check_writable(out)  # a read-only or full out fails now, not at the first checkpoint

    tokenizer, train_ds, val_ds = prepare_corpus(paths, out, config, cfg.vocab_size, cfg.seq_len, cfg.seed)

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = Transformer(config)
    if cfg.fp8:
        print(f"fp8: {enable_fp8(model)} weight tensors compute with DeepSeek-V3 FP8 GEMMs (emulated)")
    expert_parallel.parallelize(model, cfg.ep)  # --ep: keep this rank's experts (before DDP / FSDP wrap the rest)
    # before the Trainer builds the optimizer (FSDP shards the parameters)
    model = distributed.wrap_model(model, cfg.parallel, resolve_dtype(cfg.dtype, device, config.hidden_size))
    trainer = Trainer(model, cfg, tokenizer_dir=out / "tokenizer", stage="pretrain")
    trainer.session_start = t_start  # the wall clock includes tokenizer and data preparation
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    n = config.num_params()
    print(f"model: {n['total'] / 1e6:.2f}M params ({n['active'] / 1e6:.2f}M active, MTP {n['mtp_total'] / 1e6:.2f}M) | "
          f"{cfg.batch_size}x{cfg.seq_len}x{cfg.grad_accum} tokens/step | {str(trainer.amp_dtype)[6:]} on "
          f"{device} x{threads} threads | measured peak {trainer.peak_flops / 1e9:.0f} GFLOP/s")

    if distributed.initialized():
        print(f"distributed: {distributed.world_size()} processes ({cfg.parallel}, {dist.get_backend()}), "
              f"{local_batch} of the {cfg.batch_size} sequences per micro-batch on rank 0")
    if cfg.ep > 1:
        print(f"expert parallel: {cfg.ep} ranks x {config.n_routed_experts // cfg.ep} routed experts per MoE layer "
              f"({distributed.world_size() // cfg.ep} data-parallel replicas of each); a token visits at most "
              f"{expert_parallel.max_ranks_per_token(config, cfg.ep)} of them")
    loss_fn = pretrain_loss(cfg.mtp_lambda, cfg.balance_alpha)
    # every rank draws the same global batch and keeps its rows (distributed.shard): the tokens of a step do not
    # depend on the world size
    val_batches = [distributed.shard(val_ds.get_batch(cfg.batch_size, cfg.seq_len, step=i, seed=cfg.seed))
                   for i in range(cfg.eval_iters)]

    def get_batch(step: int, micro: int) -> Batch:
        return distributed.shard(train_ds.get_batch(cfg.batch_size, cfg.seq_len, step, micro=micro, seed=cfg.seed))

    def show_sample() -> str:
        full = trainer.full_model()  # FSDP gathers the shards (every rank calls this); only rank 0 samples
        if full is None:
            return ""
        return sample(full, tokenizer, cfg.sample_prompt, max_new_tokens=48, temperature=0.8, seed=cfg.seed)

    train(trainer, SupervisedStep(get_batch, loss_fn, val_batches, show_sample))
    final = trainer.save_final()
    print(f"sample: {show_sample()!r}")
    r = trainer.run_record()
    if cfg.fp8:
        r = dataclasses.replace(r, dtype=f"fp8-e4m3 (emulated) + {r.dtype}")
    r = trainer.write_report(r)
    val = f"{r.final_val_loss:.4f}" if r.final_val_loss is not None else "n/a"
    print(f"done: {r.steps} steps, {r.tokens:,} tokens in {r.wall_seconds / 60:.1f} min "
          f"({r.tokens_per_second:.0f} tok/s, MFU {r.mfu:.1%}, {r.cpu_hours:.3f} CPU-h, ~${r.cost_usd:.4f}); "
          f"final val loss {val}")
    print(f"final checkpoint (HF DeepseekV3 layout + tokenizer): {final}")
    print(f"run record: {out / 'run.json'}   loss curve: {out / 'loss.png'}")
    print(f"next: nanoseek info --config {final}")
    return final
