"""Figures: each draws what it says, labelled, and the timestep slider shows q(x_t | x_0)."""

from __future__ import annotations

import base64
import io
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lib import GaussianMixture, NoiseSchedule, Trajectory
from diffusion_lib.plotting import (
    pixel_histogram,
    plot_loss,
    plot_paths,
    plot_points,
    plot_schedules,
    plot_score_field,
    plot_trajectory,
    show_grid,
    slider_timesteps,
    timestep_slider,
)

FRAME_PATTERN = re.compile(r'frames\[(\d+)\] = "data:image/png;base64,([^"]*)"')


@pytest.fixture(autouse=True)
def _agg_and_close():
    plt.switch_backend("Agg")
    yield
    plt.close("all")


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


# ---------------------------------------------------------------------------- static figures
def test_show_grid_tiles_images_with_make_grid_layout(images):
    many = torch.cat([images] * 5)  # 20 images
    figure = show_grid(many, nrow=8, title="squares")
    (ax,) = figure.axes
    (artist,) = ax.images
    drawn = np.asarray(artist.get_array())
    # 3 rows and 8 columns of 12-pixel tiles with 2-pixel padding around each.
    assert drawn.shape == (3 * 12 + 4 * 2, 8 * 12 + 9 * 2, 3)
    np.testing.assert_allclose(drawn[2:14, 2:14, 0], (many[0, 0].numpy() + 1) / 2)
    np.testing.assert_allclose(drawn[16:28, 2:14, 0], (many[8, 0].numpy() + 1) / 2)
    assert ax.get_title() == "squares"


def test_show_grid_draws_on_given_axes_and_rejects_bad_shapes(images):
    figure, (left, right) = plt.subplots(1, 2)
    assert show_grid(images, ax=right) is figure
    assert len(right.images) == 1 and not left.images
    assert right.get_title() == "4 images"
    with pytest.raises(ValueError, match="N, C, H, W"):
        show_grid(images[0])


def test_plot_schedules_draws_three_labelled_panels(schedules):
    figure = plot_schedules(schedules)
    assert len(figure.axes) == 3
    for ax in figure.axes:
        assert ax.get_xlabel() == "timestep t"
        assert ax.get_ylabel() and ax.get_title()
        assert len(ax.get_lines()) == len(schedules)
    beta_ax, alpha_ax, snr_ax = figure.axes
    assert beta_ax.get_yscale() == "log" and snr_ax.get_yscale() == "log"
    for line, schedule in zip(alpha_ax.get_lines(), schedules.values(), strict=True):
        np.testing.assert_allclose(line.get_ydata(), _alpha_bar(schedule), rtol=1e-12)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(200))
    alpha_bar = _alpha_bar(schedules["cosine"])
    np.testing.assert_allclose(snr_ax.get_lines()[2].get_ydata(), alpha_bar / (1 - alpha_bar))
    labels = [text.get_text() for text in beta_ax.get_legend().get_texts()]
    assert labels == list(schedules)


def test_plot_loss_draws_raw_values_and_moving_average():
    losses = np.exp(-np.linspace(0, 3, 500)) + 0.1 * np.random.default_rng(0).random(500)
    figure = plot_loss(list(losses), smoothing=50)
    (ax,) = figure.axes
    raw, smooth = ax.get_lines()
    np.testing.assert_allclose(raw.get_ydata(), losses)
    np.testing.assert_allclose(smooth.get_ydata(), np.convolve(losses, np.ones(50) / 50, "valid"))
    np.testing.assert_array_equal(smooth.get_xdata(), np.arange(50, 501))
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "loss"


def test_plot_loss_reads_histories_and_shares_axes():
    figure, ax = plt.subplots()
    history = {"step": [10, 20, 30, 40, 50], "loss": [1.0, 0.5, 0.4, 0.3, 0.2]}
    assert plot_loss(history, ax=ax, label="run A") is figure
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), history["step"])
    plot_loss(torch.tensor([2.0, 1.0, 0.5, 0.2, 0.1]), ax=ax, label="run B")
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["run A", "run B"]
    with pytest.raises(ValueError, match="'loss'"):
        plot_loss({"accuracy": [1.0]})


def test_plot_trajectory_titles_frames_by_timestep():
    states = torch.randn(11, 2, 1, 6, 6)
    trajectory = Trajectory(states, torch.tensor([*range(90, -1, -10), -1]))
    figure = plot_trajectory(trajectory, num_frames=5, sample_index=1)
    assert len(figure.axes) == 5
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["t = 90", "t = 70", "t = 40", "t = 10", "sample"]
    for ax, index in zip(figure.axes, [0, 2, 5, 8, 10], strict=True):
        np.testing.assert_array_equal(ax.images[0].get_array(), states[index, 1, 0].numpy())
    assert figure.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="sample_index"):
        plot_trajectory(trajectory, sample_index=2)


def test_plot_trajectory_titles_flow_times():
    trajectory = Trajectory(torch.randn(5, 1, 1, 4, 4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    figure = plot_trajectory(trajectory, num_frames=5)
    assert [ax.get_title() for ax in figure.axes] == [
        "t = 1.00",
        "t = 0.75",
        "t = 0.50",
        "t = 0.25",
        "sample",
    ]
    plt.close("all")


def test_plot_paths_draws_each_path_from_noise_to_sample():
    states = torch.cumsum(torch.randn(6, 10, 2), dim=0)
    figure = plot_paths(Trajectory(states, torch.linspace(1, 0, 6)), count=4)
    ax = figure.axes[0]
    assert len(ax.lines) == 4
    for index, line in enumerate(ax.lines):
        np.testing.assert_allclose(line.get_xydata(), states[:, index].double().numpy())
    starts, ends = ax.collections
    np.testing.assert_allclose(starts.get_offsets(), states[0, :4].double().numpy())
    np.testing.assert_allclose(ends.get_offsets(), states[-1, :4].double().numpy())
    with pytest.raises(ValueError, match=r"shape \(S \+ 1, N, 2\)"):
        plot_paths(Trajectory(torch.zeros(3, 4, 1, 2, 2), torch.zeros(3)))
    plt.close("all")


def test_pixel_histogram_matches_numpy_and_the_normal_density():
    noise = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    figure = pixel_histogram({"t = 0": noise * 0.1, "t = T": noise}, bins=40)
    assert [ax.get_title() for ax in figure.axes] == ["t = 0", "t = T"]
    ax = figure.axes[1]
    assert ax.get_xlabel() == "pixel value" and ax.get_ylabel() == "density"
    (stairs,) = ax.patches
    counts, edges = np.histogram(noise.numpy(), bins=40, range=(-4, 4))
    np.testing.assert_allclose(stairs.get_data().values, counts / (noise.numel() * 0.2))
    # Standard normal samples: the bars follow the drawn N(0, 1) curve at the bin centres.
    centres = (edges[:-1] + edges[1:]) / 2
    normal = np.exp(-0.5 * centres**2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(stairs.get_data().values, normal, atol=0.02)


# ---------------------------------------------------------------------------- timestep slider
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


def test_plot_loss_reads_a_training_result() -> None:
    from diffusion_lib.training import TrainingHistory

    history = TrainingHistory(loss=[1.0, 0.5, 0.25, 0.2], images_per_second=100.0)

    class Result:
        pass

    result = Result()
    result.history = history
    for source in (history, result, {"loss": history.loss}):
        figure = plot_loss(source, smoothing=2)
        raw = figure.axes[0].get_lines()[0]
        np.testing.assert_allclose(raw.get_ydata(), history.loss)
        plt.close(figure)


def test_plot_points_draws_every_point_with_labelled_axes():
    points = torch.tensor([[0.0, 1.0], [-1.0, 0.5], [1.5, -1.5]])
    figure = plot_points(points, title="three", limits=(-3.0, 3.0))
    ax = figure.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), points.numpy())
    assert ax.get_xlim() == (-3.0, 3.0) and ax.get_xlabel() == "$x_1$" and ax.get_title() == "three"
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_points(torch.zeros(4, 3))
    plt.close("all")


def test_plot_score_field_scales_arrows_to_the_grid():
    field = lambda x: torch.stack([x[:, 0], 2 * x[:, 1]], dim=1)  # noqa: E731
    figure = plot_score_field(field, limits=(-1.0, 1.0), arrows=5)
    quiver = figure.axes[0].collections[-1]
    lengths = np.hypot(quiver.U, quiver.V)
    assert quiver.N == 25
    np.testing.assert_allclose(lengths.max(), 0.5)  # one grid cell of 2 / (5 - 1)
    np.testing.assert_allclose(quiver.U * 2 * quiver.Y, quiver.V * quiver.X, atol=1e-12)
    mixture = GaussianMixture(torch.zeros(1, 2), 0.5)
    figure = plot_score_field(
        mixture.score, log_density=mixture.log_prob, arrows=5, directions_only=True
    )
    quiver = figure.axes[0].collections[-1]
    np.testing.assert_allclose(np.hypot(quiver.U, quiver.V)[quiver.X**2 + quiver.Y**2 > 0], 0.8)
    assert len(figure.axes[0].collections) > 1, "the density is drawn under the arrows"
    plt.close("all")
