"""Load and save safetensors checkpoints in the official release layout or in transformers' layout.

Loading streams one tensor at a time from memory-mapped safetensors files (single file or sharded with
`model.safetensors.index.json`) into a model built on the meta device, so a checkpoint never needs twice
its size in RAM. Official FP8 / FP4 weights are dequantised with their scales on the way in
(`dsv4.quant`). Anything that does not match the config fails with a `CheckpointError` that lists the
missing, unexpected and mis-shaped tensors. Saving is atomic: files are written to a temporary folder
which replaces the target only when complete. A model trained over a compact vocabulary carries its
`vocab_map.json` in the folder; `dsv4.tokenizer.tokenizer_for(folder)` gives the tokenizer that matches.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import hf
from .config import Config, ConfigError
from .errors import CheckpointError
from .model import Transformer, keeps_fp32
from .quant import (FP4_BLOCK, FP8_BLOCK, _FP4_STORAGE, _SCALE_SUFFIXES, dequantize_fp4,
                    dequantize_fp8_blockwise, quantize_state_dict)
from .tokenizer import VOCAB_MAP_NAME, VocabMap

INDEX_NAME = "model.safetensors.index.json"


def _tensor_files(path: Path) -> dict[str, Path]:
    """key -> file holding it, from the shard index or by listing the safetensors files."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid shard index: {e}") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files (and no {INDEX_NAME}) in {path}")
    out = {}
    for f in files:
        for key in _open(f).keys():
            out[key] = f
    return out


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from None


class _Reader:
    """Random access to tensors across shard files, each file opened once (memory-mapped)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles = {}

    def get(self, key: str) -> torch.Tensor:
        f = self.files[key]
        if f not in self.handles:
            self.handles[f] = _open(f)
        try:
            return self.handles[f].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {f}: {e}") from None


def _official_tensors(reader: _Reader, dtype: torch.dtype):
    """Yield (official key, float tensor) from an official-layout checkpoint, dequantising FP8 / FP4."""
    keys = set(reader.files)
    for key in sorted(keys):
        if key.endswith(_SCALE_SUFFIXES):
            continue
        t = reader.get(key)
        quantised = t.dtype == torch.float8_e4m3fn or t.dtype in _FP4_STORAGE
        if not quantised:
            yield key, t
            continue
        prefix = key.removesuffix(".weight")
        scale_key = next((prefix + s for s in _SCALE_SUFFIXES if prefix + s in keys), None)
        if scale_key is None:
            raise CheckpointError(f"{key}: quantised weight ({t.dtype}) has no scale tensor {prefix}.scale")
        scale = reader.get(scale_key)
        try:
            if t.dtype == torch.float8_e4m3fn:
                yield key, dequantize_fp8_blockwise(t, scale, FP8_BLOCK, dtype)
            else:
                yield key, dequantize_fp4(t, scale, FP4_BLOCK, dtype)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{key}: cannot dequantise with {scale_key} {tuple(scale.shape)}: {e}") from None


def _hf_tensors(reader: _Reader):
    for key in sorted(reader.files):
        t = reader.get(key)
        try:
            yield from hf.from_hf_state_dict({key: t}).items()
        except KeyError:
            yield key, t  # reported as unexpected


def is_hf_layout(keys) -> bool:
    return any(k.startswith(("model.layers.", "model.embed_tokens", "lm_head.")) for k in keys)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    config: Config | None = None) -> Transformer:
    """Build the model described by `path/config.json` and fill it from the safetensors files in `path`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if config is None:
        config = Config.from_json(path)
    if (path / VOCAB_MAP_NAME).is_file():
        try:
            n = len(VocabMap.load(path / VOCAB_MAP_NAME))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if n != config.vocab_size:
            raise CheckpointError(f"{path / VOCAB_MAP_NAME} maps {n} ids but config.json has vocab_size "
                                  f"{config.vocab_size}; the map belongs to another checkpoint")
    reader = _Reader(_tensor_files(path))
    hf_layout = is_hf_layout(reader.files)
    if hf_layout and config.num_nextn_predict_layers:
        # transformers does not keep MTP weights: load the trunk, without MTP blocks.
        config = config.replace(num_nextn_predict_layers=0, compress_ratios=config.layer_ratios)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v for k, v in model.state_dict().items()}
    tensors = _hf_tensors(reader) if hf_layout else _official_tensors(reader, dtype)
    loaded, unexpected, misshaped = {}, [], []
    for key, t in tensors:
        if key not in expected:
            unexpected.append(key)
            continue
        if tuple(t.shape) != tuple(expected[key].shape):
            misshaped.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(expected[key].shape)}")
            continue
        want = expected[key].dtype if not expected[key].is_floating_point() else (
            torch.float32 if keeps_fp32(key) else dtype)
        loaded[key] = t.to(device=device, dtype=want)
    missing = sorted(set(expected) - set(loaded) - {m.split(":")[0] for m in misshaped})
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", sorted(unexpected)), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"{len(items)} tensors {label}:\n    " + "\n    ".join(shown))
        raise CheckpointError(f"checkpoint {path} does not match its config:\n  " + "\n  ".join(parts))
    model.load_state_dict(loaded, assign=True)
    model.reset_rope()
    return model.to(device).eval()


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, t in sd.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t.contiguous()
        size += n
    return shards + [current] if current else shards


def save_checkpoint(model: Transformer, path: str | Path, layout: str = "official", quantize: bool = False,
                    max_shard_bytes: int = 4 << 30, vocab_map: VocabMap | None = None) -> Path:
    """Write `model` to the folder `path` (replaced atomically) as safetensors + config.json.

    layout="official": official key names and config keys; `quantize=True` writes the release's FP8 / FP4
    packed weights with scales. layout="transformers": what `DeepseekV4ForCausalLM.save_pretrained`
    writes (MTP weights have no place there and are left out). `vocab_map`: the compact vocabulary the
    model was trained over, written as vocab_map.json (`dsv4.tokenizer.tokenizer_for` reads it back).
    """
    if vocab_map is not None and len(vocab_map) != model.config.vocab_size:
        raise ValueError(f"vocab map has {len(vocab_map)} ids, the model's vocabulary {model.config.vocab_size}")
    if layout not in ("official", "transformers"):
        raise ValueError(f"layout must be 'official' or 'transformers', got {layout!r}")
    path = Path(path)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if layout == "official":
        sd = quantize_state_dict(sd) if quantize else sd
        config_dict = model.config.to_dict()
    else:
        if quantize:
            raise ValueError("quantize=True is only available for the official layout")
        sd = hf.to_hf_state_dict(sd, model.config)
        config_dict = hf.to_hf_config(model.config)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = _shards(sd, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    if vocab_map is not None:
        vocab_map.save(tmp / VOCAB_MAP_NAME)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def load(model: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         seed: int = 0) -> Transformer:
    """A checkpoint folder, or a preset name (random weights, seeded) -> model in eval mode.

    dtype defaults to fp32 on CPU and bf16 on GPU.
    """
    from .config import PRESETS, preset

    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if isinstance(model, str) and model in PRESETS and not Path(model).exists():
        m = Transformer(preset(model), seed=seed)
        return m.to_dtype(dtype).to(device).eval()
    if not Path(model).exists():
        raise CheckpointError(f"{model!r} is neither a checkpoint folder nor a preset ({sorted(PRESETS)})")
    try:
        return load_checkpoint(model, dtype=dtype, device=device).to_dtype(dtype)
    except ConfigError as e:
        raise CheckpointError(f"{model}: {e}") from None
