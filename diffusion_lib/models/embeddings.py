"""Timestep and class embeddings: how a network is told which noise level it is looking at,
and which class it should draw.

The sinusoidal embedding is the position encoding of Vaswani et al. (2017, sec. 3.5), used
for diffusion timesteps by Ho et al. (2020, appendix B). A timestep ``t`` becomes the vector ::

    [sin(t * w_0), ..., sin(t * w_{h-1}), cos(t * w_0), ..., cos(t * w_{h-1})],
    w_i = max_period^(-i / h),   h = dim // 2,

so nearby timesteps get nearby vectors and the wavelengths grow geometrically from 2 pi to
2 pi * max_period^((h - 1) / h), just short of 2 pi * max_period. Vaswani et al. interleave
sines and cosines; putting all sines first is the same set of features in another order,
which makes no difference to the linear layer that reads them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusion_lib.validation import check_positive_int, is_integer_tensor


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, app. B).

    Args:
        t: (B,) timesteps, integer (0-based) or real.
        dim: length of each embedding vector. An odd ``dim`` gets a final column of zeros.
        max_period: sets the range of wavelengths, whose longest is
            ``2 pi max_period^((h - 1) / h)`` (10000 in both papers).

    Returns:
        (B, dim) float32 tensor on ``t``'s device: sines in the first ``dim // 2`` columns,
        cosines in the next ``dim // 2``.
    """
    check_positive_int("dim", dim)
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got shape {tuple(t.shape)}")
    if max_period <= 1:
        raise ValueError(f"max_period must be > 1, got {max_period}")
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1)
    frequencies = torch.exp(-math.log(max_period) * exponents)
    angles = t.to(torch.float32)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        embedding = nn.functional.pad(embedding, (0, 1))
    return embedding


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a small MLP: ``Linear -> SiLU -> Linear``.

    This is the timestep pathway of Ho et al.'s U-net (2020, appendix B): the fixed sinusoidal
    features are turned into learned ones that each block then projects to its own width.

    Args:
        dim: length of the sinusoidal embedding.
        hidden_dim: width of both linear layers and of the output; ``4 * dim`` by default.
        max_period: passed to :func:`sinusoidal_embedding`.

    Shapes: ``t`` (B,) -> (B, hidden_dim). The output width is the attribute ``out_dim``.
    """

    def __init__(
        self, dim: int, hidden_dim: int | None = None, max_period: float = 10000.0
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.out_dim = check_positive_int(
            "hidden_dim", hidden_dim if hidden_dim is not None else 4 * dim
        )
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(self.dim, self.out_dim),
            nn.SiLU(),
            nn.Linear(self.out_dim, self.out_dim),
        )

    def forward(self, t: Tensor) -> Tensor:
        """``t``: (B,) timesteps -> (B, out_dim) learned embedding."""
        features = sinusoidal_embedding(t, self.dim, self.max_period)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def embed_labels(
    table: nn.Embedding | None,
    labels: Tensor | None,
    batch: int,
    device: torch.device,
    owner: nn.Module,
) -> Tensor | None:
    """(B, dim) rows of a conditional network's label ``table``, or None for an unconditional one.

    ``table`` has ``num_classes + 1`` rows; the last, index ``num_classes``, is the null label
    ("no label", Ho & Salimans 2021), used for the whole batch when ``labels`` is None. An
    unconditional network (``table`` None) must get no labels. ``owner`` names the network in
    the error messages.
    """
    if table is None:
        if labels is not None:
            name = type(owner).__name__
            raise ValueError(
                f"this {name} is unconditional (num_classes=None) and takes no labels; "
                "build it with num_classes=... to condition on labels"
            )
        return None
    null_label = table.num_embeddings - 1
    if labels is None:
        labels = torch.full((batch,), null_label, dtype=torch.long, device=device)
    elif not torch.compiler.is_compiling():
        _check_labels(labels, null_label, batch)
    return table(labels)


def _check_labels(labels: Tensor, null_label: int, batch: int) -> None:
    """Raise ``ValueError`` unless ``labels`` is an integer tensor (B,) with values 0..null_label."""
    if not isinstance(labels, Tensor):
        raise ValueError(
            f"labels must be an int64 tensor of shape (B,), got {type(labels).__name__}"
        )
    if not is_integer_tensor(labels):
        raise ValueError(
            f"labels must hold integer class indices (int64), got dtype {labels.dtype}"
        )
    if labels.shape != (batch,):
        raise ValueError(
            f"labels must have shape ({batch},), one per image; got {tuple(labels.shape)}"
        )
    if labels.numel() and bool(((labels < 0) | (labels > null_label)).any()):
        raise ValueError(
            f"labels must lie in 0..{null_label} (0..{null_label - 1} are classes, {null_label} is "
            f"the null label); got values from {int(labels.min())} to {int(labels.max())}"
        )
