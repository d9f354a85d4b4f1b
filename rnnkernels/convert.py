"""Swapping torch.nn recurrent modules for their rnnkernels twins inside a model."""

from __future__ import annotations

from torch import nn

from .modules import TWINS


def convert(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every torch.nn RNN/GRU/LSTM and cell inside `module` (exact types, not
    subclasses with their own forward) by its rnnkernels twin holding the same parameter tensors and
    taking over its hooks; a module found under several names becomes one twin under all of them.
    Returns the module, or its twin if `module` itself is one of them."""
    return _convert(module, backend, {})


def _convert(module: nn.Module, backend: str, done: dict[int, nn.Module]) -> nn.Module:
    """done: what each module already visited became, by id."""
    if id(module) in done:
        return done[id(module)]
    twin = TWINS.get(type(module))
    if twin is not None:
        done[id(module)] = twin.from_torch(module, backend, in_its_place=True)
        return done[id(module)]
    done[id(module)] = module
    # _modules, not named_children(), which names a module only the first time it meets it.
    for name, child in list(module._modules.items()):
        converted = child if child is None else _convert(child, backend, done)
        if converted is not child:
            setattr(module, name, converted)
    return module
