"""Checkpoints in the Hugging Face DeepseekV3ForCausalLM layout: config.json + safetensors (sharded or not).

What nanoseek writes loads in transformers / vLLM / SGLang; what they publish loads here. Only safetensors are read:
weights are never unpickled. Writes are atomic: a directory is written under a temporary name and renamed into place,
so a run killed mid-write leaves the previous checkpoint intact.

Name mapping (nanoseek module -> HF tensor):
  embed_tokens / norm / layers.N.*            -> model.embed_tokens / model.norm / model.layers.N.*
  layers.N.mlp.gate_up_proj [E, 2I, D]        -> model.layers.N.mlp.experts.E.{gate_proj,up_proj}.weight [I, D]
  layers.N.mlp.down_proj    [E, D, I]         -> model.layers.N.mlp.experts.E.down_proj.weight [D, I]
  mtp.k.*                                     -> model.layers.{num_hidden_layers + k}.*  (enorm, hnorm, eh_proj,
                                                 shared_head.norm, + copies of embed_tokens and shared_head.head
                                                 as in the official release)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer

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


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """nanoseek state dict -> HF tensors (new contiguous tensors; safetensors refuses shared storage)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _EXPERT_3D.match(name) or re.match(r"^mtp\.(\d+)\.mlp\.(gate_up_proj|down_proj)$", name)
        if m:
            base = _hf_prefix(name.rsplit(".", 1)[0], cfg)  # ...layers.N.mlp
            inter = cfg.moe_intermediate_size
            for e in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    out[f"{base}.experts.{e}.gate_proj.weight"] = t[e, :inter].clone()
                    out[f"{base}.experts.{e}.up_proj.weight"] = t[e, inter:].clone()
                else:
                    out[f"{base}.experts.{e}.down_proj.weight"] = t[e].clone()
            continue
        out[_hf_prefix(name, cfg)] = t.detach().clone().contiguous()
    for k in range(cfg.num_nextn_predict_layers):  # the release duplicates the shared embedding and head per MTP layer
        base = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{base}.embed_tokens.weight"] = model.embed_tokens.weight.detach().clone()
        out[f"{base}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out


class _TensorSource:
    """Lazy access to the tensors of a checkpoint directory (one file or shards with an index)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise NanoseekError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
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
            if not (path / f).is_file():
                raise NanoseekError(f"{path}: shard {f} listed in the index is missing")
            try:
                self.handles[f] = safe_open(str(path / f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise NanoseekError(f"{path / f}: not a readable safetensors file ({e})") from None
        if weight_map is None:
            weight_map = {k: f for f, h in self.handles.items() for k in h.keys()}
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> Iterable[str]:
        return self.weight_map.keys()

    def shape(self, name: str) -> list[int]:
        return list(self.handles[self.weight_map[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        t = self.handles[self.weight_map[name]].get_tensor(name)
        scale_name = name + "_scale_inv"  # FP8 release: e4m3 weight * fp32 scale per 128x128 block
        if t.dtype == torch.float8_e4m3fn and scale_name in self.weight_map:
            s = self.handles[self.weight_map[scale_name]].get_tensor(scale_name).float()
            rows, cols = t.shape
            s = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            t = t.float() * s
        return t


def load_state_dict_from_hf(model: Transformer, source: _TensorSource, origin: str) -> None:
    """Fill `model` from HF-named tensors; every model tensor must be present with the right shape."""
    cfg = model.config
    state = model.state_dict()
    used: set[str] = set()
    missing: list[str] = []
    new_state: dict[str, torch.Tensor] = {}

    def fetch(hf_name: str, shape: torch.Size) -> torch.Tensor | None:
        if hf_name not in source.weight_map:
            missing.append(hf_name)
            return None
        if list(shape) != source.shape(hf_name):
            raise NanoseekError(f"{origin}: tensor {hf_name} has shape {source.shape(hf_name)}, "
                                f"the config needs {list(shape)}")
        used.add(hf_name)
        return source.get(hf_name)

    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _EXPERT_3D.match(name) or re.match(r"^mtp\.(\d+)\.mlp\.(gate_up_proj|down_proj)$", name)
        if m:
            base = _hf_prefix(name.rsplit(".", 1)[0], cfg)
            fused = f"{base}.experts.{m.group(2)}"  # transformers >= 5 in-memory layout, if someone saved it fused
            if fused in source.weight_map:
                new_state[name] = fetch(fused, t.shape)
                continue
            parts = []
            for e in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    half = torch.Size([t.shape[1] // 2, t.shape[2]])
                    g = fetch(f"{base}.experts.{e}.gate_proj.weight", half)
                    u = fetch(f"{base}.experts.{e}.up_proj.weight", half)
                    parts.append(None if g is None or u is None else torch.cat([g, u]))
                else:
                    parts.append(fetch(f"{base}.experts.{e}.down_proj.weight", t.shape[1:]))
            if all(p is not None for p in parts):
                new_state[name] = torch.stack(parts)
            continue
        value = fetch(_hf_prefix(name, cfg), t.shape)
        if value is not None:
            new_state[name] = value
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise NanoseekError(f"{origin}: checkpoint is missing tensor {', '.join(missing[:3])}{more}")
    ignorable = re.compile(r"(rotary_emb\.inv_freq|_scale_inv|\.embed_tokens\.weight|\.shared_head\.head\.weight)$")
    unexpected = [k for k in source.keys() if k not in used and not ignorable.search(k)]
    mtp_layer = re.compile(r"^model\.layers\.(\d+)\.")
    extra_mtp = [k for k in unexpected if (mm := mtp_layer.match(k)) and int(mm.group(1)) >= cfg.num_hidden_layers]
    unexpected = [k for k in unexpected if k not in extra_mtp]  # MTP layers beyond num_nextn_predict_layers: unused
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise NanoseekError(f"{origin}: checkpoint has tensors the config does not describe: "
                            f"{', '.join(unexpected[:3])}{more}")
    with torch.no_grad():
        for name, value in new_state.items():
            state[name].copy_(value.to(state[name].dtype))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Load a DeepseekV3 checkpoint directory (HF's or nanoseek's) into a nanoseek Transformer."""
    path = Path(path)
    if not path.exists():
        raise NanoseekError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise NanoseekError(f"{path} is not a checkpoint directory (expected a folder with config.json + "
                            f"*.safetensors)")
    if not (path / "config.json").is_file():
        raise NanoseekError(f"{path} is not a checkpoint: it has no config.json")
    config = ModelConfig.load(path / "config.json")
    source = _TensorSource(path)
    with torch.device(device):
        model = Transformer(config)
    load_state_dict_from_hf(model, source, str(path))
    # the routing bias stays fp32 (as HF keeps it): selection is sensitive to small differences
    model.to(dtype=dtype)
    for gate in model.gates():
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
        gate.expert_load.data = gate.expert_load.data.float()
    model.eval()
    return model


# --- writing --------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_dir) then move tmp_dir to `path`; an existing `path` is replaced only after the new one is
    complete, so a crash at any point leaves either the old or the new directory (plus a stray temporary)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors creates its files 0600; a checkpoint is meant to be shared
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def save_pretrained(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
                    tokenizer_dir: str | Path | None = None, extra_files: dict[str, bytes] | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `path/` = config.json + model.safetensors (or shards + index) [+ tokenizer files] [+ extra files]."""
    cfg = model.config
    tensors = to_hf_state_dict(model)
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
