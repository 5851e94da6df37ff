"""The baselines LOKI is compared against, behind the same ``Editor`` interface.

- ``FTEditor``: constrained fine-tuning of one down_proj (ROME's FT-L).
- ``MemitEditor``: MEMIT, v* plus closed-form updates spread over several layers.
- ``AlphaEditEditor``: AlphaEdit, MEMIT's update projected onto the null space of ordinary-text
  keys and solved jointly with the keys of past edits.
"""

from workers.editing.baselines.alphaedit import AlphaEditConfig, AlphaEditEditor
from workers.editing.baselines.ft import FTConfig, FTEditor
from workers.editing.baselines.memit import MemitConfig, MemitEditor
from workers.editing.target_value import TargetValueConfig

__all__ = [
    "AlphaEditConfig",
    "AlphaEditEditor",
    "FTConfig",
    "FTEditor",
    "MemitConfig",
    "MemitEditor",
    "TargetValueConfig",
]
