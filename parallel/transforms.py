"""Bookkeeping shared by the model transforms: each one marks the model and refuses to run twice on it."""

from __future__ import annotations

from torch import nn

_APPLIED = "_lsys_transforms"


def mark_applied(model: nn.Module, transform: str) -> None:
    """Record `transform` on `model`; ValueError if it was already applied (wrapping twice would nest it)."""
    applied = model.__dict__.setdefault(_APPLIED, set())
    if transform in applied:
        raise ValueError(f"{transform} was already applied to this model; build a fresh model instead")
    applied.add(transform)


def applied_transforms(model: nn.Module) -> set[str]:
    return set(model.__dict__.get(_APPLIED, ()))
