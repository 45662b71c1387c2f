"""A small residual MLP that predicts the noise of points in a few dimensions (not images)."""

from __future__ import annotations

from torch import Tensor, nn

from diffusion_lib.models.embeddings import TimeEmbedding
from diffusion_lib.validation import check_positive_int, check_weights_dtype


class ToyMLP(nn.Module):
    """``forward(x_t, t) -> eps`` for points ``x_t`` of shape (B, D).

    The input is lifted to ``hidden`` features; each of ``blocks`` residual blocks adds the
    learned timestep embedding (Ho et al. 2020, appendix B) and applies
    ``SiLU -> Linear -> SiLU -> Linear``; a final linear layer maps back to D.

    Args:
        dim: D, the dimension of a point.
        hidden: width of the hidden features.
        blocks: number of residual blocks.
        embedding_dim: length of the sinusoidal timestep embedding.
    """

    def __init__(
        self, dim: int = 2, hidden: int = 128, blocks: int = 3, embedding_dim: int = 32
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        hidden = check_positive_int("hidden", hidden)
        self.time_embedding = TimeEmbedding(
            check_positive_int("embedding_dim", embedding_dim), hidden
        )
        self.lift = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            for _ in range(check_positive_int("blocks", blocks))
        )
        self.project = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``x_t``: (B, D), ``t``: (B,) 0-based timesteps -> (B, D) noise estimate."""
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must have shape (B, {self.dim}), got {tuple(x_t.shape)}")
        check_weights_dtype(type(self).__name__, "x_t", x_t, self.lift.weight.dtype)
        if not isinstance(t, Tensor):
            raise ValueError(
                f"t must be a tensor of shape ({x_t.shape[0]},), one time per point, e.g. "
                f"torch.full(({x_t.shape[0]},), 500); got {type(t).__name__}"
            )
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        embedding = self.time_embedding(t)
        h = self.lift(x_t)
        for block in self.blocks:
            h = h + block(h + embedding)
        return self.project(h)
