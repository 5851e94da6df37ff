"""Where the editable matrices live in common decoder architectures.

LOKI and the baselines edit the MLP output projection ("down projection"): its input is the MLP
key the DESIGN talks about, its weight is ``d_model x d_ff`` like an ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from transformers import PreTrainedModel

# (path to the list of decoder blocks, path inside a block to the MLP output projection)
_LAYOUTS = (
    ("model.layers", "mlp.down_proj"),  # llama, mistral, qwen, gemma, smollm
    ("gpt_neox.layers", "mlp.dense_4h_to_h"),  # pythia
    ("model.decoder.layers", "fc2"),  # opt
    ("transformer.h", "mlp.fc_out"),  # gpt-j
)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    node: object = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nn.Module) else None


def _layout(model: PreTrainedModel) -> tuple[str, str]:
    for blocks_path, proj_path in _LAYOUTS:
        blocks = _get(model, blocks_path)
        if isinstance(blocks, nn.ModuleList) and isinstance(_get(blocks[0], proj_path), nn.Linear):
            return blocks_path, proj_path
    raise ValueError(
        f"model: unsupported architecture {type(model).__name__}; "
        "expected decoder blocks with an nn.Linear MLP output projection"
    )


def _blocks(model: PreTrainedModel) -> tuple[nn.ModuleList, str]:
    blocks_path, proj_path = _layout(model)
    blocks = _get(model, blocks_path)
    assert isinstance(blocks, nn.ModuleList)
    return blocks, proj_path


def num_layers(model: PreTrainedModel) -> int:
    return len(_blocks(model)[0])


def block(model: PreTrainedModel, layer: int) -> nn.Module:
    """The whole decoder block: its output is the residual stream MEMIT-style editors target."""
    blocks, _ = _blocks(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layers: index {layer} outside 0..{len(blocks) - 1}")
    return blocks[layer]


def down_proj(model: PreTrainedModel, layer: int) -> nn.Linear:
    module = _get(block(model, layer), _blocks(model)[1])
    assert isinstance(module, nn.Linear)
    return module


def down_proj_name(model: PreTrainedModel, layer: int) -> str:
    """The state-dict name of the layer's down-projection weight."""
    blocks_path, proj_path = _layout(model)
    return f"{blocks_path}.{layer}.{proj_path}.weight"


@contextmanager
def only_blocks_from(model: PreTrainedModel, first: int) -> Iterator[None]:
    """While open, the decoder runs blocks ``first..`` only; feed it ``inputs_embeds`` = the
    residual stream entering block ``first``. The same modules, no copy. Whether the rest of
    the forward treats ``inputs_embeds`` as a plain residual (no scaling, no added positions)
    depends on the architecture: callers check the result against a full forward."""
    blocks_path, _ = _layout(model)
    owner_path, _, attr = blocks_path.rpartition(".")
    owner = _get(model, owner_path) if owner_path else model
    full = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(list(full)[first:]))
    try:
        yield
    finally:
        setattr(owner, attr, full)


def input_embeddings(model: PreTrainedModel) -> nn.Module:
    return model.get_input_embeddings()
