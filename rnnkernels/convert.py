"""Swapping torch.nn recurrent modules for their rnnkernels twins inside a model."""

from __future__ import annotations

from torch import nn

from .modules import TWINS


def convert(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every torch.nn RNN/GRU/LSTM and cell inside `module` (exact types, not
    subclasses with their own forward) by its rnnkernels twin holding the same parameter tensors.
    Returns the module, or its twin if `module` itself is one of them."""
    twin = TWINS.get(type(module))
    if twin is not None:
        return twin.from_torch(module, backend)
    for name, child in module.named_children():
        converted = convert(child, backend)
        if converted is not child:
            setattr(module, name, converted)
    return module
