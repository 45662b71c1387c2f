"""The timestep slider shows q(x_t | x_0): static frames and live widgets draw the same picture."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lib import NoiseSchedule
from diffusion_lib.slider import slider_timesteps, timestep_slider

FRAME_PATTERN = re.compile(r'frames\[(\d+)\] = "data:image/png;base64,([^"]*)"')


@pytest.fixture
def schedules() -> dict[str, NoiseSchedule]:
    return {name: NoiseSchedule.from_name(name, 200) for name in ("linear", "quadratic", "cosine")}


@pytest.fixture
def images() -> torch.Tensor:
    """Four 12x12 'images' in [-1, 1]: a bright square on a dark background, shifted."""
    x0 = -torch.ones(4, 1, 12, 12)
    for i in range(4):
        x0[i, 0, 2 + i : 7 + i, 3:8] = 1.0
    return x0


def _alpha_bar(schedule: NoiseSchedule) -> np.ndarray:
    """alpha-bar computed here, independently of the library: a running product of 1 - beta."""
    return np.cumprod(1.0 - schedule.betas.numpy())


def _decode_frames(html: str) -> dict[int, np.ndarray]:
    frames = {}
    for index, data in FRAME_PATTERN.findall(html):
        png = base64.b64decode(data.replace("\\\n", ""))
        frames[int(index)] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    return frames


def test_slider_timesteps_are_sorted_distinct_and_span_the_chain():
    steps = slider_timesteps(1000, 24)
    assert steps[0] == 0 and steps[-1] == 999 and len(steps) == 24
    assert steps == sorted(set(steps))
    assert steps[1] - steps[0] < steps[-1] - steps[-2]  # denser at small t


def test_static_slider_embeds_one_png_frame_per_timestep(images, schedules):
    shown = [0, 20, 60, 120, 199]
    html = timestep_slider(images, schedules, schedule="cosine", timesteps_to_show=shown).data
    frames = _decode_frames(html)
    assert sorted(frames) == list(range(len(shown)))
    assert 'type="range"' in html and "<img" in html
    first, last = frames[0], frames[len(shown) - 1]
    assert first.shape == last.shape
    assert np.abs(first - last).mean() > 5.0  # grey levels 0..255: clearly different pictures


def test_static_slider_default_frames_and_size(images, schedules):
    html = timestep_slider(images, schedules["linear"]).data
    assert len(FRAME_PATTERN.findall(html)) == len(slider_timesteps(200))
    assert len(html) < 3_000_000


def test_static_and_live_sliders_draw_the_same_picture(images, schedules):
    html = timestep_slider(images, schedules, schedule="quadratic", timesteps_to_show=[0, 150]).data
    ui = timestep_slider(images, schedules, schedule="quadratic", interactive=True)
    ui.slider.value = 150
    live = np.asarray(Image.open(io.BytesIO(ui.picture.value)).convert("RGB"), dtype=float)
    np.testing.assert_array_equal(_decode_frames(html)[1], live)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 37, 199])
def test_live_slider_draws_q_sample_with_fixed_noise(images, schedules, name, t):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    ui = timestep_slider(images, schedules, interactive=True, noise=noise)
    ui.dropdown.value = name
    ui.slider.value = t
    alpha_bar = _alpha_bar(schedules[name])[t]
    expected = np.sqrt(alpha_bar) * images.numpy() + np.sqrt(1 - alpha_bar) * noise.numpy()
    image_axes = [ax for ax in ui.figure.axes if ax.images]
    assert len(image_axes) == len(images)
    for ax, image in zip(image_axes, expected, strict=True):
        np.testing.assert_allclose(ax.images[0].get_array(), image[0], rtol=1e-5, atol=1e-6)


def test_live_slider_widgets_cover_all_timesteps_and_redraw(images, schedules):
    schedules = {**schedules, "short": NoiseSchedule.from_name("linear", 50)}
    ui = timestep_slider(images, schedules, interactive=True)
    assert (ui.slider.min, ui.slider.max, ui.slider.value) == (0, 199, 0)
    assert list(ui.dropdown.options) == ["linear", "quadratic", "cosine", "short"]
    assert ui.dropdown.value == "linear"
    artist = ui.figure.axes[0].images[0]
    before_data, before_png = np.array(artist.get_array()), ui.picture.value
    ui.slider.value = 199
    assert not np.allclose(artist.get_array(), before_data)
    assert ui.picture.value != before_png
    ui.dropdown.value = "short"
    assert ui.slider.max == 49


def test_slider_rejects_unknown_schedules_and_timesteps(images, schedules):
    with pytest.raises(ValueError, match="linear, quadratic, cosine"):
        timestep_slider(images, schedules, schedule="sigmoid")
    with pytest.raises(ValueError, match=r"0\.\.199"):
        timestep_slider(images, schedules, timesteps_to_show=[0, 200])
    with pytest.raises(ValueError, match="embed_limit_mb"):
        timestep_slider(images, schedules, timesteps_to_show=[0, 100, 199], embed_limit_mb=0.01)


@pytest.mark.parametrize(
    "shown",
    [torch.tensor([0, 150]), np.array([0, 150]), [0.0, 150.0], range(0, 151, 150)],
    ids=["tensor", "numpy", "whole floats", "range"],
)
def test_static_slider_takes_timesteps_as_any_sequence_of_integers(images, schedules, shown):
    expected = _decode_frames(timestep_slider(images, schedules, timesteps_to_show=[0, 150]).data)
    frames = _decode_frames(timestep_slider(images, schedules, timesteps_to_show=shown).data)
    assert sorted(frames) == sorted(expected)
    for index, frame in frames.items():
        np.testing.assert_array_equal(frame, expected[index])


def test_static_slider_takes_a_single_timestep(images, schedules):
    expected = _decode_frames(timestep_slider(images, schedules, timesteps_to_show=[50]).data)
    frames = _decode_frames(timestep_slider(images, schedules, timesteps_to_show=50).data)
    assert sorted(frames) == [0]
    np.testing.assert_array_equal(frames[0], expected[0])


@pytest.mark.parametrize(
    ("shown", "message"),
    [
        ([0, 0.5], r"integers in 0\.\.199 .*got \[0\.0, 0\.5\]"),
        (torch.tensor([10.7]), r"integers in 0\.\.199"),
        ("fifty", r"integers in 0\.\.199"),
        ([], "at least one timestep"),
    ],
)
def test_slider_rejects_timesteps_that_are_not_integers(images, schedules, shown, message):
    with pytest.raises(ValueError, match=message):
        timestep_slider(images, schedules, timesteps_to_show=shown)


@pytest.mark.parametrize(
    ("schedules_argument", "message"),
    [
        ("linear", r"NoiseSchedule or a dict \{name: NoiseSchedule\}; got str"),
        ([NoiseSchedule.from_name("linear", 20)], "NoiseSchedule or a dict .*; got list"),
    ],
)
def test_slider_rejects_what_is_not_a_schedule(images, schedules_argument, message):
    with pytest.raises(TypeError, match=message):
        timestep_slider(images, schedules_argument)


@pytest.mark.parametrize("dpi", [0, -72])
def test_slider_rejects_a_dpi_that_is_not_positive(images, schedules, dpi):
    with pytest.raises(ValueError, match=r"dpi must lie in \(0\.0, inf\)"):
        timestep_slider(images, schedules, dpi=dpi)


def test_slider_needs_at_least_one_image(images, schedules):
    with pytest.raises(ValueError, match="timestep_slider needs at least one image"):
        timestep_slider(images[:0], schedules)
