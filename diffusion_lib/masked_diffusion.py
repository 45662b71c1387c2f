"""Masked diffusion: discrete data corrupted by hiding symbols (Austin et al. 2021, "absorbing
state"; Sahoo et al. 2024, MDLM; Shi et al. 2024, MD4).

Data are D symbols, each one of K classes (K = 2 for black-and-white pixels). The forward
process hides each symbol independently behind an extra class, the mask ``m = K``, and a hidden
symbol stays hidden. At time t in [0, 1] a symbol is still visible with probability alpha_t::

    q(x_t^i | x_0^i) = alpha_t [x_t^i = x_0^i] + (1 - alpha_t) [x_t^i = m],

with alpha_0 = 1 (the data) and alpha_1 = 0 (every symbol masked). Going back from t to s < t,
a masked symbol is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), and then it
is x_0^i; a visible one never changes. The network is a denoiser ``model(x_t) -> logits`` of
p_theta(x_0^i | x_t) for every position. It needs no time input: given the visible symbols,
q(x_0 | x_t) does not depend on t.

The negative ELBO is a weighted cross-entropy on the masked positions (MDLM eq. 10, MD4 eq. 5)::

    -log p_theta(x_0) <= int_0^1 -alpha'_t / (1 - alpha_t) E_q[ sum_{i: x_t^i = m}
                                                              -log p_theta(x_0^i | x_t) ] dt,

and it is the same for every schedule alpha. Averaging over t given the number n of masked
symbols turns it into the order-agnostic bound of Uria et al. (2014) and Hoogeboom et al. (2022)::

    -log p_theta(x_0) <= D E_{n ~ U{1..D}} E_{|M| = n} [ (1/n) sum_{i in M} -log p_theta(x_0^i | x_{0, not M}) ],

where M is a uniformly random set of n masked positions. Its weights D / n are bounded, where
the weight 1 / t of the linear schedule is not; :func:`masked_diffusion_loss` uses this form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.sampler_inputs import _evaluating, _model_device
from diffusion_lib.sampling import Trajectory
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import (
    check_choice,
    check_positive_int,
    is_integer,
    is_integer_tensor,
)

MASKING_SCHEDULES = ("linear", "cosine")
# Which masked symbols a sampling step reveals: each with the posterior's probability, or
# the ones the model is surest of (MaskGIT's decoding, Chang et al. 2022, sec. 3.2).
REVEAL_ORDERS = ("random", "confidence")


class MaskedDiffusion:
    """The masking process: K classes, the mask symbol ``mask_id = K``, and a schedule alpha_t.

    ``schedule="linear"``: alpha_t = 1 - t (MDLM). ``"cosine"``: alpha_t = 1 - cos(pi/2 (1 - t))
    (MaskGIT's schedule, MD4), computed as 1 - sin(pi/2 t) so that alpha_0 is exactly 1: near
    t = 1 it reveals symbols slowly, so a sampler's first steps, which see the least context,
    reveal few at a time.

    There are no tensors to move; ``to(device)`` returns the process itself, so it can be
    passed to :func:`~diffusion_lib.training.train` as the schedule.
    """

    def __init__(self, num_classes: int = 2, schedule: str = "linear") -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.mask_id = num_classes
        self.schedule = check_choice("masking schedule", schedule, MASKING_SCHEDULES)

    def __repr__(self) -> str:
        return f"MaskedDiffusion(num_classes={self.num_classes}, schedule={self.schedule!r})"

    def to(self, device: str | torch.device) -> MaskedDiffusion:
        return self

    def alpha(self, t: Tensor) -> Tensor:
        """alpha_t, the probability that a symbol is still visible at time t; ``t`` in [0, 1]."""
        t = _check_times(t)
        if self.schedule == "linear":
            return 1.0 - t
        return 1.0 - torch.sin(0.5 * math.pi * t)

    def alpha_derivative(self, t: Tensor) -> Tensor:
        """d alpha_t / dt (negative: symbols are only ever hidden)."""
        t = _check_times(t)
        if self.schedule == "linear":
            return -torch.ones_like(t)
        return -0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def loss_weight(self, t: Tensor) -> Tensor:
        """-alpha'_t / (1 - alpha_t), the weight of the masked cross-entropy at time t
        (MDLM eq. 10); 1 / t for the linear schedule. Infinite at t = 0."""
        return -self.alpha_derivative(t) / (1.0 - self.alpha(t))

    def unmasking_probability(self, s: Tensor, t: Tensor) -> Tensor:
        """(alpha_s - alpha_t) / (1 - alpha_t): the chance that a symbol masked at time t is
        visible at the earlier time s (the posterior q(x_s | x_t, x_0); Sahoo et al. 2024, eq. 5)."""
        s, t = _check_times(s), _check_times(t)
        if not bool((s < t).all()):
            raise ValueError("unmasking_probability needs an earlier time s < t, both in [0, 1]")
        alpha_s, alpha_t = self.alpha(s), self.alpha(t)
        return (alpha_s - alpha_t) / (1.0 - alpha_t)

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_t ~ q(x_t | x_0): each symbol of ``x0`` (B, ...) int64 is replaced by ``mask_id``
        with probability 1 - alpha_t, independently; ``t``: (B,) times in [0, 1], or one time
        for the whole batch."""
        x0 = self._check_tokens(x0)
        t = _check_times(t).detach().cpu().double()
        if t.dim() == 0:
            t = t.expand(x0.shape[0])
        if t.shape != (x0.shape[0],):
            raise ValueError(
                f"t must be one time or have shape ({x0.shape[0]},), got {tuple(t.shape)}"
            )
        keep = self.alpha(t).to(x0.device, _real_dtype(x0.device))
        hidden = _uniform(tuple(x0.shape), generator, x0.device) >= keep.view(
            -1, *([1] * (x0.dim() - 1))
        )
        return x0.masked_fill(hidden, self.mask_id)

    def _check_tokens(self, tokens: Tensor, *, masks_allowed: bool = False) -> Tensor:
        if not is_integer_tensor(tokens) or tokens.dim() < 2:
            raise ValueError(
                "tokens must be an integer tensor (B, ...) of class indices; turn images into "
                "tokens with tokens_from_images"
            )
        top = self.mask_id if masks_allowed else self.num_classes - 1
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > top):
            raise ValueError(
                f"tokens must lie in 0..{top}, got values from {int(tokens.min())} to "
                f"{int(tokens.max())}"
            )
        return tokens


def _check_times(t: Tensor | float) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    if bool(((t < 0) | (t > 1) | t.isnan()).any()):
        raise ValueError("times must lie in [0, 1]")
    return t if t.dtype.is_floating_point else t.double()


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """U[0, 1) drawn on the generator's device, so a seed gives the same draw anywhere."""
    source = generator.device if generator is not None else device
    dtype = _real_dtype(source, device)
    return torch.rand(shape, generator=generator, device=source, dtype=dtype).to(device)


def _real_dtype(*devices: torch.device) -> torch.dtype:
    """float64 for the probabilities, except on Apple's MPS, which has no float64."""
    return torch.float32 if any(device.type == "mps" for device in devices) else torch.float64


def _check_num_classes(num_classes: object) -> int:
    if not is_integer(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def tokens_from_images(images: Tensor, num_classes: int = 2) -> Tensor:
    """Quantise images (B, C, H, W) in [-1, 1] to ``num_classes`` evenly spaced grey levels:
    int64 tokens of the same shape, each pixel to the nearest level and a pixel halfway between
    two to the brighter. With two classes, pixels at or above 0 become 1 (white). Images scaled
    to [0, 1] would all come out in the upper half: rescale them to [-1, 1] first."""
    num_classes = _check_num_classes(num_classes)
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")
    if images.numel() and (float(images.min()) < -1.001 or float(images.max()) > 1.001):
        raise ValueError(
            f"images must lie in [-1, 1], got values from {float(images.min()):.3g} to "
            f"{float(images.max()):.3g}"
        )
    levels = (images.clamp(-1.0, 1.0) + 1.0) / 2.0 * (num_classes - 1)
    return (levels + 0.5).floor().long()


def images_from_tokens(tokens: Tensor, num_classes: int = 2) -> Tensor:
    """Tokens (B, C, H, W) back to images in [-1, 1]; a masked symbol (``num_classes``) is drawn
    as mid-grey, 0."""
    num_classes = _check_num_classes(num_classes)
    if not is_integer_tensor(tokens):
        raise ValueError(f"tokens must be an integer tensor of classes, got dtype {tokens.dtype}")
    low, high = (int(tokens.min()), int(tokens.max())) if tokens.numel() else (0, 0)
    if low < 0 or high > num_classes:
        raise ValueError(
            f"tokens must lie in 0..{num_classes} ({num_classes} is the mask) for "
            f"num_classes={num_classes}, got values from {low} to {high}: pass the num_classes "
            "the tokens were made with"
        )
    images = tokens.float() / (num_classes - 1) * 2.0 - 1.0
    return images.masked_fill(tokens == num_classes, 0.0)


class TokenDenoiser(nn.Module):
    """p_theta(x_0 | x_t) from an image network: tokens in, logits out.

    The input tokens (B, C, H, W), each in 0..K (K is the mask), become one-hot channels
    (B, C (K + 1), H, W); ``network`` must take that many channels and return C K, e.g.
    ``AttentionUNet(channels=3, out_channels=2)`` for black-and-white digits. The network is
    called with t = 0 throughout: the masked pixels already say how far the process has gone.

    Shapes: ``forward(x_t)`` with ``x_t`` (B, C, H, W) int64 -> logits (B, K, C, H, W), the
    layout ``F.cross_entropy`` reads.
    """

    def __init__(self, network: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.network = network
        self.num_classes = MaskedDiffusion(num_classes).num_classes

    def forward(self, x_t: Tensor) -> Tensor:
        if x_t.dim() != 4 or not is_integer_tensor(x_t):
            raise ValueError(
                f"x_t must be tokens, an integer tensor (B, C, H, W) with values in "
                f"0..{self.num_classes} ({self.num_classes} is the mask); got dtype {x_t.dtype} "
                f"and shape {tuple(x_t.shape)} (tokens_from_images makes tokens of images)"
            )
        batch, channels, height, width = x_t.shape
        one_hot = F.one_hot(x_t, self.num_classes + 1).permute(0, 1, 4, 2, 3)
        inputs = one_hot.reshape(batch, channels * (self.num_classes + 1), height, width)
        time = torch.zeros(batch, dtype=torch.long, device=x_t.device)
        logits = self.network(inputs.float(), time)
        expected = (batch, channels * self.num_classes, height, width)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"the network must return {channels * self.num_classes} channels (C K logits), "
                f"shape {expected}; got {tuple(logits.shape)}"
            )
        return logits.view(batch, channels, self.num_classes, height, width).transpose(1, 2)


def masked_nll_bound(
    model: nn.Module,
    process: MaskedDiffusion,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One unbiased draw of the bound on -log p_theta(x_0), in nats per sample: (B,).

    For each sample, n ~ U{1..D} symbols are masked at uniformly random positions, and the
    cross-entropy of the model's logits at those positions is summed and scaled by D / n (the
    order-agnostic form of the ELBO in the module docstring). ``x0``: (B, ...) int64 tokens.
    Average several draws for a tighter estimate of the expectation.
    """
    x0 = process._check_tokens(x0)
    batch, dims = x0.shape[0], x0[0].numel()
    device = x0.device
    counts = 1 + (_uniform((batch,), generator, device) * dims).long().clamp(max=dims - 1)
    ranks = _uniform((batch, dims), generator, device).argsort(dim=1).argsort(dim=1)
    hidden = (ranks < counts[:, None]).view_as(x0)
    logits = model(x0.masked_fill(hidden, process.mask_id))
    cross_entropy = F.cross_entropy(logits.float(), x0, reduction="none")
    # where, not a product: a denoiser may be certain (-inf logits) about visible symbols.
    masked_sum = torch.where(hidden, cross_entropy, 0.0).flatten(1).sum(dim=1)
    return masked_sum * dims / counts


def masked_diffusion_loss(
    model: nn.Module,
    process: MaskedDiffusion,
    x0: Tensor,
    *,
    noise: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The training loss: :func:`masked_nll_bound` averaged over the batch, in nats per symbol.

    ``x0`` is either int64 tokens (B, ...) or images in [-1, 1], which are quantised with
    :func:`tokens_from_images`; so ``train(denoiser, process, images, loss=masked_diffusion_loss)``
    works on the images the rest of the book uses. ``noise`` and ``labels`` are not used (the
    signature is the ``loss=`` protocol of :func:`~diffusion_lib.training.train`).
    """
    if noise is not None or labels is not None:
        raise ValueError("masked_diffusion_loss takes neither fixed noise nor labels")
    if x0.dtype.is_floating_point:
        x0 = tokens_from_images(x0, process.num_classes)
    return masked_nll_bound(model, process, x0, generator=generator).mean() / x0[0].numel()


def masked_sample(
    model: nn.Module,
    process: MaskedDiffusion,
    shape: tuple[int, ...],
    steps: int,
    *,
    generator: torch.Generator | None = None,
    order: str = "random",
    return_trajectory: bool = False,
) -> Tensor | Trajectory:
    """Ancestral sampling from all-masked to data in ``steps`` equal steps of t (MDLM sec. 3.3).

    At each step from t to s, every masked symbol is revealed with probability
    :meth:`~MaskedDiffusion.unmasking_probability` (1 at the last step) and then drawn from the
    model's p_theta(x_0^i | x_t); the symbols revealed in one step are drawn independently of
    each other. With ``order="confidence"`` the step instead draws a candidate for every masked
    symbol and reveals those whose candidates the model gives the highest probability, as many
    as leave D (1 - alpha_s), rounded, of each sample's D symbols masked (MaskGIT's decoding, Chang
    et al. 2022, sec. 3.2, without their noise on the confidences). That is no longer the
    reverse process of the bound: it favours each symbol's likelier value, and on black-and-white
    digits, whose background the model is surest of, it collapses to strokes, dashes and blank
    images (chapter 19).

    The denoiser ignores time, so when a step reveals nothing its logits are reused instead of
    recomputed, and once nothing is masked the network is not called again: however many
    steps, B samples of D symbols cost at most B D calls, and never more than ``steps``.

    Returns int64 tokens ``shape`` (B, C, H, W), or a :class:`~diffusion_lib.sampling.Trajectory`
    with ``states`` as images (see :func:`images_from_tokens`) and ``timesteps`` the times t.
    In smoke mode ``steps`` is capped.
    """
    steps = cap_sampling_steps(check_positive_int("steps", steps))
    check_choice("order", order, REVEAL_ORDERS)
    if len(shape) < 2 or any(not is_integer(n) or n < 1 for n in shape):
        raise ValueError(f"shape must be (B, ...) of positive integers, got {shape}")
    shape = tuple(int(n) for n in shape)
    device = _model_device(model)
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x = torch.full(shape, process.mask_id, dtype=torch.long, device=device)
    states, probabilities = [x.cpu()], None
    with _evaluating(model):
        for t, s in zip(times[:-1], times[1:], strict=True):
            masked = x == process.mask_id
            if not bool(masked.any()):
                states.append(x.cpu())
                continue
            if probabilities is None:
                probabilities = model(x).float().softmax(dim=1)
            if order == "random":
                chance = process.unmasking_probability(s, t).item()
                reveal = masked & (_uniform(shape, generator, device) < chance)
                candidates = _categorical(probabilities, generator) if bool(reveal.any()) else x
            else:
                candidates = _categorical(probabilities, generator)
                confidence = probabilities.gather(1, candidates.unsqueeze(1)).squeeze(1)
                still_masked = round(x[0].numel() * (1.0 - process.alpha(s).item()))
                reveal = _most_confident(masked, confidence, still_masked)
            if bool(reveal.any()):
                x = torch.where(reveal, candidates, x)
                probabilities = None
            states.append(x.cpu())
    if not return_trajectory:
        return x
    images = torch.stack([images_from_tokens(state, process.num_classes) for state in states])
    return Trajectory(states=images, timesteps=times.float())


def _most_confident(masked: Tensor, confidence: Tensor, still_masked: int) -> Tensor:
    """Which masked symbols to reveal (B, ...) bool: in each sample, the masked ones of highest
    ``confidence``, as many as leave ``still_masked`` of them masked (none if fewer are)."""
    flat_masked = masked.flatten(1)
    reveal_count = (flat_masked.sum(dim=1) - still_masked).clamp(min=0)
    score = torch.where(flat_masked, confidence.flatten(1), -math.inf)
    rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return ((rank < reveal_count[:, None]) & flat_masked).view_as(masked)


def _categorical(probabilities: Tensor, generator: torch.Generator | None) -> Tensor:
    """One class per position from ``probabilities`` (B, K, ...), by inverting the CDF."""
    cumulative = probabilities.cumsum(dim=1)
    u = _uniform(
        (probabilities.shape[0], 1, *probabilities.shape[2:]), generator, cumulative.device
    )
    drawn = (cumulative < u.to(cumulative.dtype)).sum(dim=1)
    return drawn.clamp(max=probabilities.shape[1] - 1)
