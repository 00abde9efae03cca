"""Loading GSA checkpoints from local folders: ours, and the paper authors' releases (fla-hub/gsa-*).

Only safetensors are read (pickled .bin files can run code when loaded). The authors' exports come in two layouts:
- current: model.layers.N.{attn_norm, attn.*, mlp_norm, mlp.{gate,up,down}_proj}: loads as it is;
- older (config `norm_first`): pre-norms inside the mixers (attn.norm, mlp.norm) and one fused mlp.gate_proj
  of width 2I holding [gate; up]: converted on load.
A tensor the model lacks, or one the model needs but the files lack, is an error that names it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .configuration_gsa import GSAConfig

_ALIASES = [
    (re.compile(r"^model\.embed_tokens\."), "model.embeddings."),
    (re.compile(r"^(model\.layers\.\d+)\.attn\.norm\."), r"\1.attn_norm."),
    (re.compile(r"^(model\.layers\.\d+)\.mlp\.norm\."), r"\1.mlp_norm."),
]


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        pickled = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (
            f" It holds pickled weights ({', '.join(pickled)}), which gsa does not load because unpickling can run "
            "code; convert them once in a trusted environment with safetensors.torch.save_file."
            if pickled
            else ""
        )
        raise FileNotFoundError(f"no *.safetensors weights in {path}.{hint}")
    return [os.path.join(path, f) for f in files]


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    state = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name)
    return state


def convert_state_dict(state: dict[str, torch.Tensor], config: GSAConfig) -> dict[str, torch.Tensor]:
    """Rename the authors' older layout to ours; split fused [gate; up] MLP projections."""
    out = {}
    intermediate = config.mlp_intermediate_size
    for name, tensor in state.items():
        for pattern, replacement in _ALIASES:
            name = pattern.sub(replacement, name)
        match = re.match(r"^(model\.layers\.\d+\.mlp)\.gate_proj\.weight$", name)
        if match and tensor.shape[0] == 2 * intermediate:
            out[f"{match.group(1)}.gate_proj.weight"], out[f"{match.group(1)}.up_proj.weight"] = tensor.chunk(2, 0)
            continue
        out[name] = tensor
    return out


_LOADER_OPTIONS = {
    "adapter_kwargs", "attn_implementation", "cache_dir", "force_download", "local_files_only", "low_cpu_mem_usage",
    "proxies", "revision", "subfolder", "token", "trust_remote_code", "use_safetensors", "code_revision",
}


def _dtype(value) -> torch.dtype | None:
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return None if value == "auto" else value
    return getattr(torch, str(value).replace("torch.", ""))


def check_model_folder(path: str | os.PathLike, config: bool = True) -> Path:
    """path as a Path when it is a model folder (a folder holding config.json, or any folder with config False:
    where only a tokenizer is read); a ValueError naming what is missing otherwise (before anything tries to read
    a tokenizer or weights from it)."""
    if not Path(path).is_dir():
        expected = "a folder with config.json and weights" if config else "a model or tokenizer folder"
        raise ValueError(f"model {str(path)!r} is not a folder; expected {expected}")
    if config and not (Path(path) / "config.json").is_file():
        raise ValueError(f"model folder {str(path)!r} has no config.json")
    return Path(path)


def load_pretrained(cls, path: str, *args, config: GSAConfig | None = None, **kwargs):
    """Build `cls` from `path`/config.json and load its safetensors strictly. Accepts dtype / torch_dtype and
    device (or device_map given as one device)."""
    if args:
        raise TypeError(f"unexpected positional arguments after the path: {args}")
    check_model_folder(path, config=config is None)  # named here, not as transformers' missing-file error
    dtype = _dtype(kwargs.pop("dtype", kwargs.pop("torch_dtype", None)))
    device = kwargs.pop("device", None) or kwargs.pop("device_map", None)
    for name in list(kwargs):
        if name in _LOADER_OPTIONS or name.startswith("_"):
            kwargs.pop(name)  # transformers' hub/loader options; nothing to do for a local safetensors folder
    if config is None:
        config = GSAConfig.from_pretrained(path, **kwargs)
    elif kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)} when a config is given")
    state = convert_state_dict(read_safetensors(path), config)
    if dtype is None:
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        expected.discard("lm_head.weight")
    prefix = cls.base_model_prefix + "."
    if not any(k.startswith(prefix) for k in expected) and any(k.startswith(prefix) for k in state):
        # a base model loaded from a causal-LM checkpoint: keep the backbone, leave the head
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match {cls.__name__}({config.model_type}): "
            f"missing tensors {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected tensors {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )
    model = model.to_empty(device=device or "cpu").to(dtype)
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model
