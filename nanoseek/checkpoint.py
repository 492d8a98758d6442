"""Checkpoints in the Hugging Face DeepseekV3ForCausalLM layout: config.json + safetensors (sharded or not).

What nanoseek writes loads in transformers / vLLM / SGLang; what they publish loads here. Only safetensors are read:
weights are never unpickled. Writes are atomic: a directory is written under a temporary name and renamed into place,
so a run killed mid-write leaves the previous checkpoint intact. load_model also reads the weights of a training
checkpoint that a torchrun job wrote as torch.distributed.checkpoint shards (config.json + dcp/, distributed.py).

Name mapping (nanoseek module -> HF tensor):
  embed_tokens / norm / layers.N.*            -> model.embed_tokens / model.norm / model.layers.N.*
  layers.N.mlp.gate_up_proj [E, 2I, D]        -> model.layers.N.mlp.experts.E.{gate_proj,up_proj}.weight [I, D]
  layers.N.mlp.down_proj    [E, D, I]         -> model.layers.N.mlp.experts.E.down_proj.weight [D, I]
  mtp.k.*                                     -> model.layers.{num_hidden_layers + k}.*  (enorm, hnorm, eh_proj,
                                                 shared_head.norm, + copies of embed_tokens and shared_head.head
                                                 as in the official release)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer
from nanoseek.osutil import write_failed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_EXPERT_3D = re.compile(r"^layers\.(\d+)\.mlp\.(gate_up_proj|down_proj)$")


# --- name mapping ---------------------------------------------------------------------------------------------------
def _hf_prefix(name: str, config: ModelConfig) -> str:
    """The HF name of a nanoseek 2-D/1-D tensor (everything but the 3-D expert stacks)."""
    if name == "lm_head.weight":
        return name
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{config.num_hidden_layers + int(k)}.{rest}"
    return "model." + name


def _owned_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor of its own (safetensors refuses shared storage): a copy of a CPU tensor, or the one
    copy an accelerator's tensor needs to reach CPU memory (no second copy on the accelerator)."""
    t = t.detach()
    return t.clone(memory_format=torch.contiguous_format) if t.device.type == "cpu" else t.cpu().contiguous()


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """nanoseek state dict -> HF tensors (new contiguous CPU tensors; safetensors refuses shared storage)."""
    return hf_state_dict(model.config, model.state_dict())


def hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], owned: bool = False) -> dict[str, torch.Tensor]:
    """A nanoseek state dict (a model's, or the whole tensors distributed.full_state_dict_cpu gathered) -> HF
    tensors, each a contiguous CPU tensor of its own. owned: the caller gives up `state`, a dict of CPU tensors that
    nothing changes while they are written (a gathered copy, or a model's own tensors): they are written as they are
    instead of copied, and the dict is emptied as it goes (each expert stack is freed, if nothing else holds it, once
    its experts are cut out of it), so a gathered export holds about one copy of the weights, not two."""
    out: dict[str, torch.Tensor] = {}
    take = (lambda t: t.contiguous()) if owned else _owned_cpu
    for name in list(state):
        t = state.pop(name) if owned else state[name]
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _EXPERT_3D.match(name) or re.match(r"^mtp\.(\d+)\.mlp\.(gate_up_proj|down_proj)$", name)
        if m:
            base = _hf_prefix(name.rsplit(".", 1)[0], cfg)  # ...layers.N.mlp
            inter = cfg.moe_intermediate_size
            for e in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    out[f"{base}.experts.{e}.gate_proj.weight"] = _owned_cpu(t[e, :inter])
                    out[f"{base}.experts.{e}.up_proj.weight"] = _owned_cpu(t[e, inter:])
                else:
                    out[f"{base}.experts.{e}.down_proj.weight"] = _owned_cpu(t[e])
            continue
        out[_hf_prefix(name, cfg)] = take(t)
    head = out.get("lm_head.weight", out["model.embed_tokens.weight"])  # tied: the embedding is the head
    for k in range(cfg.num_nextn_predict_layers):  # the release duplicates the shared embedding and head per MTP layer
        base = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{base}.embed_tokens.weight"] = _owned_cpu(out["model.embed_tokens.weight"])
        out[f"{base}.shared_head.head.weight"] = _owned_cpu(head)
    return out


class _TensorSource:
    """Lazy access to the tensors of a checkpoint directory (one file or shards with an index): only the headers are
    read until get() is called, so names, shapes and dtypes are checked before any weight is allocated."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            weight_map = None
        if not files:
            bins = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            hint = f" (found {bins[0]}: pickled weights are never loaded; convert to safetensors)" if bins else ""
            raise NanoseekError(f"{path}: no *.safetensors weights found{hint}")
        self.handles = {}
        for f in files:
            shard = _shard_path(path, f, index if weight_map is not None else None)
            try:
                self.handles[f] = safe_open(str(shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise NanoseekError(f"{shard}: not a readable safetensors file ({e})") from None
        held = {f: set(h.keys()) for f, h in self.handles.items()}
        if weight_map is None:
            weight_map = {k: f for f, keys in held.items() for k in keys}
        else:
            wrong = next((k for k, f in weight_map.items() if k not in held[f]), None)
            if wrong is not None:
                raise NanoseekError(f"{index}: maps {wrong} to {weight_map[wrong]}, which does not hold it")
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> Iterable[str]:
        return self.weight_map.keys()

    def shape(self, name: str) -> list[int]:
        return list(self.handles[self.weight_map[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype code from the header: F32, BF16, F8_E4M3, I64, ..."""
        return self.handles[self.weight_map[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        t = self.handles[self.weight_map[name]].get_tensor(name)
        scale_name = name + "_scale_inv"  # FP8 release: e4m3 weight * fp32 scale per 128x128 block
        if t.dtype == torch.float8_e4m3fn and scale_name in self.weight_map:
            s = self.handles[self.weight_map[scale_name]].get_tensor(scale_name).float()
            rows, cols = t.shape
            s = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            t = t.float() * s
        return t


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of model.safetensors.index.json: {tensor name: shard file name}."""
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NanoseekError(f"{index}: not a valid safetensors index ({e})") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise NanoseekError(f"{index}: not a valid safetensors index (no 'weight_map' object of tensor -> file)")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise NanoseekError(f"{index}: weight_map[{bad!r}] must be a shard file name, got {weight_map[bad]!r}")
    return weight_map


def _shard_path(root: Path, name: str, index: Path | None) -> Path:
    """root/name, refused unless it is a regular file inside the checkpoint directory: an index must not make a
    loader read /etc/..., ../other/..., a device or a FIFO. One exception: the Hugging Face hub cache links
    snapshots/<rev>/<file> to ../../blobs/<hash>, which is where such a link may point."""
    where = f"{index}: shard {name!r}" if index else f"{root / name}"
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts:
        raise NanoseekError(f"{where} points outside the checkpoint directory")
    path = root / name
    if not path.exists():
        raise NanoseekError(f"{root}: shard {name} listed in the index is missing" if index else
                            f"{path}: missing")
    real, top = path.resolve(), root.resolve()
    blobs = top.parent.parent / "blobs" if top.parent.name == "snapshots" else None
    if not (real.is_relative_to(top) or (blobs is not None and real.is_relative_to(blobs))):
        raise NanoseekError(f"{where} is a link to {real}, outside the checkpoint directory")
    if not real.is_file():
        raise NanoseekError(f"{where} is not a regular file")
    return path


def _mtp_layers_held(config: ModelConfig, source: _TensorSource) -> list[int]:
    """Indices k of the declared MTP layers (model.layers.{num_hidden_layers + k}) with any tensor in `source`."""
    layer = re.compile(r"^model\.layers\.(\d+)\.")
    held = {int(m.group(1)) for k in source.keys() if (m := layer.match(k))}
    n = config.num_hidden_layers
    return [k for k in range(config.num_nextn_predict_layers) if n + k in held]


_warned_no_mtp: set[str] = set()


def resolve_mtp(config: ModelConfig, source: _TensorSource, origin: str, warn: bool = True) -> ModelConfig:
    """The config to load with: MTP layers as declared when the checkpoint holds them, none when it holds none.

    transformers' DeepseekV3ForCausalLM has no MTP module: its save_pretrained keeps num_nextn_predict_layers (1) in
    config.json but writes no MTP weights. Such a checkpoint is a model without MTP (one warning line). A checkpoint
    with only some of the declared MTP layers is damaged: an error.
    """
    n = config.num_nextn_predict_layers
    held = _mtp_layers_held(config, source)
    if n == 0 or len(held) == n:
        return config
    if held:
        first = config.num_hidden_layers + next(k for k in range(n) if k not in held)
        raise NanoseekError(f"{origin}: config.json declares {n} MTP layers (num_nextn_predict_layers) but the "
                            f"checkpoint has no tensors for model.layers.{first}.*: the MTP weights are incomplete")
    if warn:
        _warn_no_mtp(origin, n)
    return dataclasses.replace(config, num_nextn_predict_layers=0)


def _warn_no_mtp(origin: str, n: int) -> None:
    if origin in _warned_no_mtp:  # once per checkpoint and process (rl loads its model twice)
        return
    _warned_no_mtp.add(origin)
    sys.stderr.write(f"nanoseek: warning: {origin}: config.json declares {n} MTP layer{'s' * (n > 1)} "
                     f"(num_nextn_predict_layers) but the checkpoint holds no MTP weights (transformers' "
                     f"save_pretrained does not write them): loaded without MTP, so --speculate is unavailable\n")


def _plan(model: Transformer, source: _TensorSource, origin: str) -> dict[str, tuple[str, list[str]]]:
    """For every tensor of `model` (meta or real): (how, HF names) to build it from, after checking that each named
    tensor exists with a floating-point dtype and the shape the config needs, and that the checkpoint holds no
    tensor the config does not describe. how: "one" (a tensor as is), "gate_up" (experts' gate and up rows
    concatenated, then stacked) or "stack" (experts stacked). Reads headers only."""
    cfg = model.config
    plan: dict[str, tuple[str, list[str]]] = {}
    missing: list[str] = []

    def need(hf_name: str, shape: list[int]) -> None:
        if hf_name not in source.weight_map:
            missing.append(hf_name)
        elif source.shape(hf_name) != shape:
            raise NanoseekError(f"{origin}: tensor {hf_name} has shape {source.shape(hf_name)}, "
                                f"the config needs {shape}")
        elif source.dtype(hf_name) not in _FLOAT_DTYPES:
            raise NanoseekError(f"{origin}: tensor {hf_name} has dtype {source.dtype(hf_name)}, "
                                f"not a floating-point type")

    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        shape = list(t.shape)
        m = _EXPERT_3D.match(name) or re.match(r"^mtp\.(\d+)\.mlp\.(gate_up_proj|down_proj)$", name)
        if m:
            base = _hf_prefix(name.rsplit(".", 1)[0], cfg)
            fused = f"{base}.experts.{m.group(2)}"  # transformers >= 5 in-memory layout, if someone saved it fused
            if fused in source.weight_map:
                need(fused, shape)
                plan[name] = ("one", [fused])
            elif m.group(2) == "gate_up_proj":
                names = [f"{base}.experts.{e}.{p}_proj.weight" for e in range(shape[0]) for p in ("gate", "up")]
                for n in names:
                    need(n, [shape[1] // 2, shape[2]])
                plan[name] = ("gate_up", names)
            else:
                names = [f"{base}.experts.{e}.down_proj.weight" for e in range(shape[0])]
                for n in names:
                    need(n, shape[1:])
                plan[name] = ("stack", names)
            continue
        need(_hf_prefix(name, cfg), shape)
        plan[name] = ("one", [_hf_prefix(name, cfg)])
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        mtp_only = all(k.startswith("model.layers.") and _layer_of(k) >= cfg.num_hidden_layers for k in missing)
        what = "MTP tensor" if mtp_only else "tensor"  # an MTP layer with some of its weights: incomplete
        raise NanoseekError(f"{origin}: checkpoint is missing {what} {', '.join(missing[:3])}{more}")
    used = {n for _, names in plan.values() for n in names}
    ignorable = re.compile(r"(rotary_emb\.inv_freq|_scale_inv|\.embed_tokens\.weight|\.shared_head\.head\.weight)$")
    unexpected = [k for k in source.keys() if k not in used and not ignorable.search(k)]
    # MTP layers beyond num_nextn_predict_layers: unused, not an error
    unexpected = [k for k in unexpected if not (k.startswith("model.layers.") and
                                                _layer_of(k) >= cfg.num_hidden_layers)]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise NanoseekError(f"{origin}: checkpoint has tensors the config does not describe: "
                            f"{', '.join(unexpected[:3])}{more}")
    return plan


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _layer_of(hf_name: str) -> int:
    """N of model.layers.N.* (-1 when N is not a number)."""
    n = hf_name.split(".")[2]
    return int(n) if n.isdigit() else -1


def load_state_dict_from_hf(model: Transformer, source: _TensorSource, origin: str) -> None:
    """Fill `model` from HF-named tensors; every model tensor must be present with the right shape."""
    _fill(model, source, _plan(model, source, origin))


def _fill(model: Transformer, source: _TensorSource, plan: dict[str, tuple[str, list[str]]]) -> None:
    """Copy the tensors into the model one at a time (no second copy of the whole state dict)."""
    state = model.state_dict()
    with torch.no_grad():
        for name, (how, names) in plan.items():
            if how == "one":
                value = source.get(names[0])
            elif how == "gate_up":
                pairs = zip(names[::2], names[1::2], strict=True)
                value = torch.stack([torch.cat([source.get(g), source.get(u)]) for g, u in pairs])
            else:
                value = torch.stack([source.get(n) for n in names])
            state[name].copy_(value.to(state[name].dtype))


def _check_size(config: ModelConfig, source: _TensorSource, origin: str) -> None:
    """Refuse a config that describes more parameters than the checkpoint holds (an absurd hidden_size, say)
    before anything is built from it: the count is arithmetic, the checkpoint's from its headers."""
    want = config.num_params()["total"]
    have = sum(math.prod(source.shape(k)) for k in source.keys())
    if want > have:
        raise NanoseekError(f"{origin}: config.json describes {want:,} parameters but the checkpoint holds "
                            f"{have:,} values: the config does not match the weights")


def checkpoint_config(path: str | Path, warn: bool = True) -> ModelConfig:
    """The config a checkpoint directory loads with (config.json, without MTP when it holds no MTP weights)."""
    path = check_checkpoint_dir(path)
    config = ModelConfig.load(path / "config.json")
    return resolve_mtp(config, _TensorSource(path), str(path), warn=warn)


def check_checkpoint_dir(path: str | Path) -> Path:
    """`path` as a Path if it is a directory with a config.json; else one line saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise NanoseekError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise NanoseekError(f"{path} is not a checkpoint directory (expected a folder with config.json + "
                            f"*.safetensors)")
    if not (path / "config.json").is_file():
        raise NanoseekError(f"{path} is not a checkpoint: it has no config.json")
    return path


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Load a DeepseekV3 checkpoint directory (HF's or nanoseek's) into a nanoseek Transformer.

    Every tensor's name, shape and dtype is checked against the config from the safetensors headers (on a `meta`
    model) before the real model is allocated, so a damaged or mismatched checkpoint costs no memory. A sharded
    training checkpoint (config.json + dcp/, no safetensors) is read whole by this process."""
    path = check_checkpoint_dir(path)
    if is_sharded_checkpoint(path):
        return _load_sharded_model(path, dtype, device)
    declared = ModelConfig.load(path / "config.json")
    source = _TensorSource(path)
    config = resolve_mtp(declared, source, str(path), warn=False)
    _check_size(config, source, str(path))
    with torch.device("meta"):
        plan = _plan(Transformer(config), source, str(path))
    if config.num_nextn_predict_layers != declared.num_nextn_predict_layers:  # warned only for a model that loads
        _warn_no_mtp(str(path), declared.num_nextn_predict_layers)
    with torch.device(device):
        model = Transformer(config)
    _fill(model, source, plan)
    # the routing bias stays fp32 (as HF keeps it): selection is sensitive to small differences
    model.to(dtype=dtype)
    for gate in model.gates():
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
        gate.expert_load.data = gate.expert_load.data.float()
    model.eval()
    return model


def is_sharded_checkpoint(path: Path) -> bool:
    """A training checkpoint of a torchrun job: torch.distributed.checkpoint shards in dcp/, no safetensors."""
    from nanoseek.distributed import SHARDED_DIR

    return (path / SHARDED_DIR / ".metadata").is_file() and not any(path.glob("*.safetensors"))


def _load_sharded_model(path: Path, dtype: torch.dtype, device: str | torch.device) -> Transformer:
    from nanoseek.distributed import SHARDED_DIR, load_sharded

    with torch.device(device):
        model = Transformer(ModelConfig.load(path / "config.json"))
    load_sharded(model, None, path / SHARDED_DIR)
    model.to(dtype=dtype)
    for gate in model.gates():  # the routing bias stays fp32, as load_model keeps it
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
        gate.expert_load.data = gate.expert_load.data.float()
    return model.eval()


# --- writing --------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_dir) then move tmp_dir to `path`; an existing `path` is replaced only after the new one is
    complete, so a crash at any point leaves either the old or the new directory (plus a stray temporary, which
    the next checkpoint write prunes). A failed write (full disk, read-only directory) removes the temporary, keeps
    the old directory and raises one line naming `path`."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        for f in tmp.iterdir():
            if f.is_dir():  # sharded training state: its writer made and synced the files (distributed.py)
                _fsync_dir(f)
                continue
            f.chmod(0o644)  # safetensors creates its files 0600; a checkpoint is meant to be shared
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the previous directory goes back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:  # save_file reports a full disk as a SafetensorError
        raise write_failed(path, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save_pretrained(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
                    tokenizer_dir: str | Path | None = None, extra_files: dict[str, bytes] | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `path/` = config.json + model.safetensors (or shards + index) [+ tokenizer files] [+ extra files]."""
    return save_state_dict(model.config, model.state_dict(), path, dtype, tokenizer_dir, extra_files,
                           max_shard_bytes)


def save_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], path: str | Path,
                    dtype: torch.dtype | None = None, tokenizer_dir: str | Path | None = None,
                    extra_files: dict[str, bytes] | None = None, max_shard_bytes: int = 5 * 2**30,
                    owned: bool = False) -> Path:
    """save_pretrained for a model's state dict and config: e.g. the whole weights rank 0 of an FSDP job gathered
    into CPU memory (distributed.full_state_dict_cpu; owned=True: see hf_state_dict)."""
    tensors = hf_state_dict(cfg, state, owned)
    if dtype is not None:
        tensors = {k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)) for k, v in tensors.items()}
    weight_dtype = next(v.dtype for k, v in tensors.items() if k.endswith("embed_tokens.weight"))

    def write(tmp: Path) -> None:
        hf = cfg.to_hf_dict()
        hf["dtype"] = str(weight_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}, indent=2) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k in sorted(tensors):
            nbytes = tensors[k].numel() * tensors[k].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = tensors[k]
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_dir_atomically(Path(path), write)
