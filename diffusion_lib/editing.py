"""Editing with a trained model: SDEdit and RePaint inpainting.

Neither method trains anything. Both run the reverse process of an ordinary noise predictor
and change only where it starts (SDEdit) or what it is shown at each step (RePaint), so any
model of the book can edit images.

States are counted in levels of the (possibly respaced) chain: level ``n = steps`` is the
noisiest state, handed to the model at its last timestep, and level 0 is the finished image.
Level ``n >= 1`` is the state the model sees at 0-based timestep ``n - 1`` of the respaced
schedule, the paper's ``x_n``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_lib.respacing import _respaced_chain
from diffusion_lib.reverse_process import VARIANCES, _ancestral_step, _conditioning
from diffusion_lib.sampler_inputs import NoisePredictor, _evaluating, _randn
from diffusion_lib.sampling import Trajectory
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import (
    check_choice,
    check_finite,
    check_number,
    check_positive_int,
)


def _noise_to_level(
    schedule: NoiseSchedule, x0: Tensor, level: int, generator: torch.Generator | None
) -> Tensor:
    """A draw from q(x_level | x_0) on ``schedule``; level 0 is ``x0`` itself."""
    if level == 0:
        return x0
    t = torch.full((x0.shape[0],), level - 1, device=x0.device, dtype=torch.long)
    return schedule._q_sample(x0, t, _randn(tuple(x0.shape), generator, x0.device))


def _alpha_bar_at_level(schedule: NoiseSchedule, level: int) -> float:
    return 1.0 if level == 0 else float(schedule.alphas_cumprod[level - 1])


def _renoise(
    schedule: NoiseSchedule,
    x: Tensor,
    level: int,
    new_level: int,
    generator: torch.Generator | None,
) -> Tensor:
    """A draw from q(x_new_level | x_level) of the forward chain, for ``new_level > level``.

    The forward steps in between compose into one Gaussian: ``sqrt(r) x + sqrt(1 - r) z`` with
    ``r = alpha_bar_new / alpha_bar_level`` (Ho et al. 2020, eq. 2 applied repeatedly).
    """
    ratio = _alpha_bar_at_level(schedule, new_level) / _alpha_bar_at_level(schedule, level)
    noise = _randn(tuple(x.shape), generator, x.device)
    return ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise


def _check_image(name: str, image: Tensor) -> Tensor:
    if not isinstance(image, Tensor) or image.dim() < 2 or image.shape[0] < 1:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a tensor of shape (B, C, H, W) or (B, D), got {shape}")
    if not image.dtype.is_floating_point:
        raise ValueError(f"{name} must hold floating-point pixels, got dtype {image.dtype}")
    check_finite(name, image)
    return image


def sdedit(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    guide: Tensor,
    strength: float,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    variance: str = "large",
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Trajectory]:
    """SDEdit (Meng et al. 2022, Algorithm 1): noise a guide image part of the way, then denoise.

    With ``n0 = round(strength * steps)`` (at least 1), the guide is noised in one jump to
    level ``n0``, ``x_n0 ~ q(x_n0 | x_0 = guide)`` (Ho et al. 2020, eq. 4), and ancestral
    sampling (Algorithm 2) runs from there down to level 0. The noise washes out the details
    that make the guide unrealistic while the coarse layout survives; ``strength`` (the paper's
    t0) trades faithfulness to the guide (small) against realism (large). ``strength = 1``
    forgets the guide up to the little signal left at the last step.

    Args:
        model: noise predictor ``model(x_t, t)`` trained with ``schedule``.
        guide: (B, C, H, W) images in the model's pixel range, e.g. a rough sketch.
        strength: in (0, 1], the fraction of the chain to run.
        steps: respace the chain to this many steps (Nichol & Dhariwal 2021, sec. 4); ``None``
            uses all T. The editing runs ``n0`` of them.
        variance: as for :func:`~diffusion_lib.sampling.ddpm_sample`, but ``"large"`` by
            default: on a respaced chain the small variance draws too narrow a spread.
        clip_x0, labels, guidance, null_label: as for
            :func:`~diffusion_lib.sampling.ddpm_sample`.
        return_trajectory: also return the visited states as a
            :class:`~diffusion_lib.sampling.Trajectory`, starting with the noised guide.

    Returns the edited images (B, C, H, W), or ``(images, trajectory)``.
    """
    guide = _check_image("guide", guide)
    strength = check_number("strength", strength, 0.0, 1.0, low_open=True, high_open=False)
    check_choice("variance", variance, VARIANCES)
    steps = cap_sampling_steps(schedule.timesteps if steps is None else steps)
    sampling_schedule, kept, wrapped = _respaced_chain(model, schedule, steps, guide.device)
    extra = _conditioning(labels, guidance, null_label, guide.shape[0], guide.device)
    start = max(1, round(strength * steps))
    x = _noise_to_level(sampling_schedule, guide, start, generator)
    states = [x.cpu()]
    with _evaluating(model):
        for index in reversed(range(start)):
            x = _ancestral_step(
                wrapped, sampling_schedule, x, index, generator, variance, clip_x0, extra
            )
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    timesteps = torch.cat([kept[:start].flip(0), torch.tensor([-1])])
    return x, Trajectory(torch.stack(states), timesteps)


def repaint_schedule(steps: int, jump_length: int = 10, resamplings: int = 10) -> list[int]:
    """The levels RePaint visits, in order (Lugmayr et al. 2022, sec. 4.2 and Fig. 3).

    The chain goes down one level at a time from ``steps`` to 0. On reaching a level
    ``n = 1, 1 + j, 1 + 2j, ...`` (``j = jump_length``) with ``n + j <= steps``, it jumps back
    up to ``n + j`` and comes down again, until that stretch has been walked ``resamplings``
    times. The stretches end at level 1, so the last step, which returns the image, is never
    undone; with ``jump_length = 1`` this is the paper's Algorithm 1. ``resamplings = 1`` is
    plain ancestral sampling: ``[steps, steps - 1, ..., 0]``. Consecutive entries differ by -1
    (a denoising step) or by ``+jump_length`` (noising): about ``steps * resamplings``
    denoising steps in all.
    """
    check_positive_int("steps", steps)
    check_positive_int("jump_length", jump_length, maximum=steps)
    check_positive_int("resamplings", resamplings)
    levels, level = [steps], steps
    walks: dict[int, int] = {}
    while level > 0:
        level -= 1
        levels.append(level)
        walked = walks.get(level, 1)
        is_jump_point = level >= 1 and (level - 1) % jump_length == 0
        if is_jump_point and level + jump_length <= steps and walked < resamplings:
            walks[level] = walked + 1
            level += jump_length
            levels.append(level)
    return levels


def _check_mask(mask: Tensor, known: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    try:
        torch.broadcast_shapes(mask.shape, known.shape)
    except RuntimeError:
        raise ValueError(
            f"mask must broadcast against the known images {tuple(known.shape)}, "
            f"got shape {tuple(mask.shape)}"
        ) from None
    if mask.dim() > known.dim():
        raise ValueError(f"mask has more dimensions ({mask.dim()}) than the images ({known.dim()})")
    mask = mask.to(device=known.device, dtype=known.dtype)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (to fill in) and 1 (to keep) or booleans")
    return mask


def repaint(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    known: Tensor,
    mask: Tensor,
    *,
    steps: int | None = None,
    jump_length: int = 10,
    resamplings: int = 10,
    generator: torch.Generator | None = None,
    variance: str = "large",
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
) -> Tensor:
    """Fill in the pixels where ``mask`` is 0 so that they fit the kept ones (Lugmayr et al. 2022).

    Algorithm 1 of RePaint, with the jumps of its sec. 4.2. Every denoising step from level n
    to n - 1 combines two states of level n - 1 (eq. 8)::

        x_{n-1} = m * x_known + (1 - m) * x_unknown,
        x_known ~ q(x_{n-1} | x_0 = known)           (the forward process, eq. 4),
        x_unknown ~ p_theta(x_{n-1} | x_n)           (one ancestral step, Algorithm 2 of Ho et al.).

    The model sees the kept pixels only through the noised copies pasted into its input, so a
    single pass leaves the filled region unaware of them until the noise is low. Walking each
    stretch of ``jump_length`` levels ``resamplings`` times, noising back up with
    ``q(x_{n+j} | x_n)`` in between (:func:`repaint_schedule`), lets the two parts agree.
    ``resamplings = 1`` is the plain replacement method.

    Args:
        model: noise predictor ``model(x_t, t)`` trained with ``schedule``.
        known: (B, C, H, W) images in the model's pixel range; only pixels with ``mask = 1``
            are read.
        mask: 1 (or True) where ``known`` is kept, 0 where new pixels are drawn; any shape that
            broadcasts against ``known``, such as (1, 1, H, W) for one mask for the whole batch.
        steps: respace the chain to this many steps (``None``: all T; RePaint used 250).
        jump_length, resamplings: see :func:`repaint_schedule`. The cost is about
            ``steps * resamplings`` calls of the model.
        variance: as for :func:`~diffusion_lib.sampling.ddpm_sample`, but ``"large"`` by
            default: every walk of a respaced chain with the small variance narrows the spread
            a little more (Gaussian data of std 0.5 comes out at 0.458 after 100 steps with 3
            walks, and at 0.505 with the large variance).
        clip_x0, labels, guidance, null_label: as for
            :func:`~diffusion_lib.sampling.ddpm_sample`.

    Returns the completed images (B, C, H, W); the kept pixels equal ``known`` exactly.
    """
    known = _check_image("known", known)
    mask = _check_mask(mask, known)
    check_choice("variance", variance, VARIANCES)
    steps = check_positive_int(
        "steps", schedule.timesteps if steps is None else steps, maximum=schedule.timesteps
    )
    check_positive_int("jump_length", jump_length, maximum=steps)
    steps = cap_sampling_steps(steps)
    levels = repaint_schedule(steps, min(jump_length, steps), resamplings)
    sampling_schedule, _, wrapped = _respaced_chain(model, schedule, steps, known.device)
    extra = _conditioning(labels, guidance, null_label, known.shape[0], known.device)
    x = _randn(tuple(known.shape), generator, known.device)
    with _evaluating(model):
        for level, new_level in zip(levels[:-1], levels[1:], strict=True):
            if new_level > level:
                x = _renoise(sampling_schedule, x, level, new_level, generator)
                continue
            unknown = _ancestral_step(
                wrapped, sampling_schedule, x, new_level, generator, variance, clip_x0, extra
            )
            noised_known = _noise_to_level(sampling_schedule, known, new_level, generator)
            x = mask * noised_known + (1 - mask) * unknown
    return x
