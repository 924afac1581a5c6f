"""Kept for compatibility: the energy helpers now live in the kernel, :mod:`diffeditor.energies`."""

from diffeditor.energies import (  # noqa: F401
    ALPHA,
    BETA,
    cosine_map,
    inverse_energy,
    level_mean,
    masked_mean,
    mean_feature,
    sim01,
)
