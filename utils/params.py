"""Flat parameter vectors, the space CMA-ES searches in.

CMA-ES sees a controller as one float64 numpy vector; torch sees float32 tensors. These two
functions are the only crossing point, so the layout (that of
`torch.nn.utils.parameters_to_vector`: each parameter flattened row-major, in
`model.parameters()` order) is defined once, and `models.controller.batched_actions` agrees
with it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def count_params(model: torch.nn.Module) -> int:
    """Number of scalar parameters, i.e. the CMA-ES search dimension."""
    return sum(p.numel() for p in model.parameters())


def get_flat_params(model: torch.nn.Module) -> np.ndarray:
    """The model's parameters as one float64 numpy vector (a copy), in CMA-ES's dtype."""
    with torch.no_grad():
        return parameters_to_vector(model.parameters()).detach().cpu().double().numpy().copy()


def set_flat_params(model: torch.nn.Module, flat: np.ndarray) -> torch.nn.Module:
    """Write a flat vector (any float dtype) into the model's parameters, in place; returns the model.

    Values are cast to each parameter's dtype and device. A vector of the wrong length is a
    ValueError (vector_to_parameters would silently leave the tail untouched).
    """
    flat = np.asarray(flat)
    expected = count_params(model)
    if flat.shape != (expected,):
        raise ValueError(f"expected a flat vector of {expected} parameters, got shape {flat.shape}")
    first = next(model.parameters())
    with torch.no_grad():
        vector_to_parameters(
            torch.as_tensor(flat, dtype=first.dtype, device=first.device), model.parameters()
        )
    return model
