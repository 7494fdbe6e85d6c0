"""Which M a config builds: the MDN-RNN (the default, configs without `arch`) or the transformer.

Every stage rebuilds M from its checkpoint's config through `build_m`, so the architecture a
checkpoint names is the one every later stage uses; no stage takes it from a flag.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from models.mdrnn import MDRNN, MDRNNCell
from models.transformer import ARCH as TRANSFORMER
from models.transformer import TransformerM, TransformerMCell

LSTM = "lstm"
ARCHS = (LSTM, TRANSFORMER)
_CLASSES = {LSTM: (MDRNN, MDRNNCell), TRANSFORMER: (TransformerM, TransformerMCell)}


def m_arch(config: dict[str, Any]) -> str:
    """The architecture a config names ('lstm' when it names none, as the MDN-RNN's configs)."""
    return str(config.get("arch", LSTM))


def m_class(config: dict[str, Any], one_step: bool) -> type[nn.Module]:
    """The sequence (training) or one-step (acting) class of the config's architecture."""
    arch = m_arch(config)
    if arch not in _CLASSES:
        raise ValueError(f"unknown M architecture '{arch}' (known: {', '.join(ARCHS)})")
    return _CLASSES[arch][1 if one_step else 0]


def build_m(config: dict[str, Any], one_step: bool = True) -> nn.Module:
    """A fresh M of the config's architecture and sizes; keys that are not its arguments are ignored."""
    cls = m_class(config, one_step)
    wanted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in config.items() if k in wanted})
