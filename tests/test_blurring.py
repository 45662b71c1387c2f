"""Tests for diffusion_lib.blurring: the DCT against an FFT, the blur against a Gaussian kernel,
the reverse step against Gaussian conditioning, and the sampler against Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lib.blurring import (
    BlurringDiffusion,
    FrequencySkip,
    blurring_loss,
    blurring_sample,
    dct2,
    dct_matrix,
    heat_frequencies,
    idct2,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def dct_by_fft(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal DCT-II of the last dimension through the FFT of the mirrored signal: with
    V = FFT([x, reversed x]), sum_n x_n cos(pi k (2n + 1) / 2N) = Re(exp(-i pi k / 2N) V_k) / 2."""
    n = x.shape[-1]
    spectrum = torch.fft.fft(torch.cat([x, x.flip(-1)], dim=-1).double())[..., :n]
    k = torch.arange(n, dtype=torch.float64)
    plain = (torch.exp(-1j * math.pi * k / (2 * n)) * spectrum).real / 2
    scale = torch.full((n,), math.sqrt(2 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1 / n)
    return plain * scale


def test_the_dct_is_orthonormal_and_agrees_with_the_fft() -> None:
    matrix = dct_matrix(7, torch.float64)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(7, dtype=torch.float64))
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    by_fft = dct_by_fft(dct_by_fft(x).transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(dct2(x), by_fft)
    torch.testing.assert_close(idct2(dct2(x)), x)


def test_the_heat_blur_of_a_gaussian_bump_is_the_bump_convolved_with_a_gaussian() -> None:
    """tau = s^2 / 2 blurs like a Gaussian kernel of s pixels: a bump of width w becomes one of
    width sqrt(w^2 + s^2), w^2 / (w^2 + s^2) as high (away from the borders)."""
    size, width, blur = 48, 2.5, 2.0
    process = BlurringDiffusion(image_size=size, blur_sigma_max=blur, min_scale=0.0)
    centre = (size - 1) / 2
    grid = (torch.arange(size, dtype=torch.float32) - centre) ** 2
    radius2 = grid[:, None] + grid[None, :]

    def bump(w2: float) -> torch.Tensor:
        return torch.exp(-radius2 / (2 * w2))[None, None]

    blurred = process.blur(bump(width**2), torch.ones(1))  # s_t = s_max at t = 1
    expected = width**2 / (width**2 + blur**2) * bump(width**2 + blur**2)
    torch.testing.assert_close(blurred, expected, atol=1e-4, rtol=0)


def test_the_schedule_runs_between_its_log_snr_ends_and_preserves_variance() -> None:
    process = BlurringDiffusion(logsnr_range=(-8.0, 6.0))
    t = torch.linspace(0, 1, 101)
    logsnr = process.logsnr(t)
    torch.testing.assert_close(logsnr[[0, -1]], torch.tensor([6.0, -8.0]))
    assert (logsnr.diff() < 0).all()
    alpha, sigma = process.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(101))
    torch.testing.assert_close(alpha**2 / sigma**2, logsnr.exp(), rtol=1e-4, atol=0)
    d = process.blur_scale(t)
    torch.testing.assert_close(d[0], torch.ones(28, 28))  # no blur at t = 0
    assert (d.diff(dim=0) <= 1e-7).all() and d[-1].min() >= process.min_scale


def test_without_blur_it_is_gaussian_diffusion_with_the_same_noise_levels() -> None:
    process = BlurringDiffusion(blur_sigma_max=0.0)
    x0, noise, t = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.rand(4)
    alpha, sigma = process.alpha_sigma(t)
    expected = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * noise
    torch.testing.assert_close(process.q_sample(x0, t, noise), expected, atol=1e-5, rtol=0)


def test_q_sample_has_the_mean_and_white_noise_of_eq_8_by_monte_carlo() -> None:
    process = BlurringDiffusion(image_size=6, blur_sigma_max=3.0)
    x0 = torch.randn(1, 1, 6, 6).expand(40_000, 1, 6, 6)
    t = torch.full((40_000,), 0.6)
    u_t = dct2(process.q_sample(x0, t, torch.randn(40_000, 1, 6, 6)))
    _, sigma = process.alpha_sigma(t[:1])
    mean = process.signal_scale(t[:1]) * dct2(x0[:1])
    torch.testing.assert_close(u_t.mean(0, keepdim=True), mean, atol=5 * sigma.item() / 200, rtol=0)
    flat = (u_t - mean).reshape(40_000, 36)
    covariance = flat.T @ flat / 40_000
    torch.testing.assert_close(covariance, sigma.item() ** 2 * torch.eye(36), atol=0.02, rtol=0)


def test_the_clipped_step_conditions_on_the_clipped_estimate_of_x0() -> None:
    """Inside the pixel range clipping changes nothing, so both forms of the mean agree; outside
    it, the step is the conditioning on the clipped x_0."""
    process = BlurringDiffusion(image_size=8, blur_sigma_max=4.0)
    x0 = torch.rand(2, 1, 8, 8) * 1.6 - 0.8
    noise = torch.randn(2, 1, 8, 8)
    t, s = torch.tensor([0.3, 0.15]), torch.tensor([0.25, 0.1])
    x_t = process.q_sample(x0, t, noise)
    clipped, variance = process.posterior_step(x_t, t, s, noise, clip_x0=(-1.0, 1.0))
    plain, same_variance = process.posterior_step(x_t, t, s, noise, clip_x0=None)
    torch.testing.assert_close(clipped, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(variance, same_variance)
    narrow, _ = process.posterior_step(x_t, t, s, noise, clip_x0=(-0.5, 0.5))
    a_t, a_s = process.signal_scale(t), process.signal_scale(s)
    (_, sigma_t), (_, sigma_s) = process.alpha_sigma(t), process.alpha_sigma(s)
    sigma_t, sigma_s = sigma_t[:, None, None, None], sigma_s[:, None, None, None]
    alpha_ts = a_t / a_s
    variance_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    # Bayes' rule in precision form, with the clipped x_0 as the known u_0: prior
    # N(a_s u_0, sigma_s^2), likelihood u_t | u_s ~ N(alpha_ts u_s, sigma_ts^2).
    u0 = dct2(x0.clamp(-0.5, 0.5))
    precision_variance = 1 / (1 / sigma_s**2 + alpha_ts**2 / variance_ts)
    expected = precision_variance * (a_s * u0 / sigma_s**2 + alpha_ts * dct2(x_t) / variance_ts)
    torch.testing.assert_close(dct2(narrow), expected, atol=1e-4, rtol=0)
    assert (x0.abs() > 0.5).any()  # the clip changed x_0


def test_the_reverse_step_is_gaussian_conditioning_given_x0() -> None:
    """With eps the exact noise of a known x_0, the step is q(u_s | u_t, u_0): u_s = a_s u_0 +
    sigma_s z and u_t = alpha_ts u_s + sigma_ts z', conditioned on u_t."""
    process = BlurringDiffusion(image_size=8, blur_sigma_max=4.0)
    x0, noise = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8)
    t, s = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.45, 0.0])
    x_t = process.q_sample(x0.float(), t, noise)
    mean, variance = process.posterior_step(x_t, t, s, noise, clip_x0=None)
    a_t, a_s = process.signal_scale(t).double(), process.signal_scale(s).double()
    (_, sigma_t), (_, sigma_s) = process.alpha_sigma(t), process.alpha_sigma(s)
    sigma_t, sigma_s = (v.double()[:, None, None, None] for v in (sigma_t, sigma_s))
    alpha_ts = a_t / a_s
    variance_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    u0, u_t = dct2(x0), dct2(x_t.double())
    expected = a_s * u0 + sigma_s**2 * alpha_ts / sigma_t**2 * (u_t - a_t * u0)
    torch.testing.assert_close(dct2(mean.double()), expected, atol=2e-4, rtol=0)
    torch.testing.assert_close(variance.double(), sigma_s**2 * variance_ts / sigma_t**2)
    # The same step by Bayes' rule in precision form: prior N(a_s u_0, sigma_s^2), likelihood
    # u_t | u_s ~ N(alpha_ts u_s, sigma_ts^2); precisions add, and the mean weighs by them.
    precision_variance = 1 / (1 / sigma_s**2 + alpha_ts**2 / variance_ts)
    precision_mean = precision_variance * (a_s * u0 / sigma_s**2 + alpha_ts * u_t / variance_ts)
    torch.testing.assert_close(variance.double(), precision_variance, rtol=1e-5, atol=0)
    torch.testing.assert_close(dct2(mean.double()), precision_mean, atol=2e-4, rtol=0)
    # At t = 0.2 little is blurred away, so dividing by a_t in float32 loses nothing.
    estimate = process.x0_estimate(x_t, t, noise).double()
    torch.testing.assert_close(estimate[2], x0[2], atol=1e-3, rtol=0)


class GaussianDataNoise(torch.nn.Module):
    """The exact noise estimate for data with independent DCT coefficients u_0 ~ N(m, v):
    u_t ~ N(a m, a^2 v + sigma^2), so E[eps_u | u_t] = sigma (u_t - a m) / (a^2 v + sigma^2)."""

    def __init__(self, process: BlurringDiffusion, mean: torch.Tensor, var: torch.Tensor) -> None:
        super().__init__()
        self.process, self.mean, self.var = process, mean, var

    def forward(self, x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        t = time / self.process.time_scale
        a = self.process.signal_scale(t)
        sigma = self.process.alpha_sigma(t)[1][:, None, None, None]
        u_t = dct2(x_t)
        return idct2(sigma * (u_t - a * self.mean) / (a**2 * self.var + sigma**2))


def test_the_sampler_with_exact_noise_estimates_draws_the_data_distribution() -> None:
    torch.manual_seed(0)
    process = BlurringDiffusion(image_size=4, blur_sigma_max=3.0)
    mean = torch.randn(1, 1, 4, 4)
    var = 0.05 + torch.rand(1, 1, 4, 4)
    model = GaussianDataNoise(process, mean, var)
    generator = torch.Generator().manual_seed(1)
    samples = blurring_sample(
        model, process, (20_000, 1, 4, 4), steps=1000, generator=generator, clip_x0=None
    )
    u = dct2(samples)
    standard_error = (var / 20_000).sqrt()
    assert ((u.mean(0, keepdim=True) - mean).abs() < 5 * standard_error).all()
    # Finite steps with E[u_0 | u_t] in place of u_0 shrink the variance a little (about 20% at
    # 50 steps, 2% at 1000); the sampling error of a variance from 20,000 draws is 1%.
    torch.testing.assert_close(u.var(0, keepdim=True), var, rtol=0.05, atol=0)


def test_the_loss_is_zero_for_the_exact_noise_of_one_image_and_states_run_from_noise() -> None:
    process = BlurringDiffusion(image_size=8, blur_sigma_max=4.0)
    x0 = torch.randn(1, 1, 8, 8)
    model = GaussianDataNoise(process, dct2(x0), torch.zeros(1, 1, 8, 8))
    batch = x0.expand(16, 1, 8, 8)
    loss = blurring_loss(model, process, batch, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    x_1 = torch.randn(2, 1, 8, 8)
    samples, states = blurring_sample(
        model, process, (2, 1, 8, 8), steps=20, x_1=x_1, return_states=True, clip_x0=None
    )
    assert states.shape == (21, 2, 1, 8, 8)
    torch.testing.assert_close(states[0], x_1)
    torch.testing.assert_close(samples, batch[:2], atol=1e-3, rtol=0)


def test_heat_frequencies_are_zero_for_the_mean_and_grow_with_the_index() -> None:
    frequencies = heat_frequencies(4, 6)
    assert frequencies[0, 0] == 0 and frequencies.shape == (4, 6)
    torch.testing.assert_close(frequencies[1, 0], torch.tensor(math.pi**2 / 16))
    torch.testing.assert_close(frequencies[0, 3], torch.tensor(math.pi**2 / 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(blur_sigma_max=-1.0), "blur_sigma_max must lie in"),
        (dict(min_scale=1.5), "min_scale must lie in"),
        (dict(logsnr_range=(5.0, -5.0)), "low < high"),
        (dict(image_size=0), "image_size must be an integer >= 1"),
    ],
)
def test_bad_settings_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BlurringDiffusion(**kwargs)


class Constant(torch.nn.Module):
    """A stand-in network that returns the same image for every input."""

    def __init__(self, image: torch.Tensor) -> None:
        super().__init__()
        self.image = image

    def forward(self, x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return self.image.expand_as(x_t)


def test_the_frequency_skip_is_the_gaussian_estimate_plus_the_network_where_it_has_signal() -> None:
    process = BlurringDiffusion(image_size=8, blur_sigma_max=4.0)
    images = torch.randn(500, 1, 8, 8) * torch.linspace(0.2, 1.0, 8) + 0.3
    u = dct2(images)
    skip = FrequencySkip(Constant(torch.zeros(1, 1, 8, 8)), process, images)
    torch.testing.assert_close(skip.mean, u.mean(0))
    torch.testing.assert_close(skip.variance, u.var(0))
    gaussian = GaussianDataNoise(process, u.mean(0, keepdim=True), u.var(0, keepdim=True))
    x_t, time = torch.randn(3, 1, 8, 8), torch.tensor([100.0, 500.0, 900.0])
    torch.testing.assert_close(skip(x_t, time), gaussian(x_t, time), atol=1e-5, rtol=0)

    # A network's output reaches a frequency in proportion to 1 - w: not at all where the blur
    # and the noise have left no signal, fully where nothing is hidden.
    signal = FrequencySkip(Constant(torch.randn(1, 1, 8, 8)), process, images)
    change = dct2(signal(x_t, time) - skip(x_t, time))
    t = time / process.time_scale
    a, sigma = process.signal_scale(t), process.alpha_sigma(t)[1][:, None, None, None]
    weight = sigma**2 / (a**2 * skip.variance + sigma**2)
    network = dct2(signal.network.image).expand_as(change)
    torch.testing.assert_close(change, (1 - weight) * network, atol=1e-5, rtol=0)
    assert weight[2, 0, 7, 7] > 0.999 and weight[0, 0, 0, 0] < 0.1


def test_the_frequency_skip_wants_images_of_the_process_size() -> None:
    with pytest.raises(ValueError, match=r"images must be \(N, C, 8, 8\)"):
        FrequencySkip(
            Constant(torch.zeros(1)), BlurringDiffusion(image_size=8), torch.zeros(4, 28, 28)
        )


def test_the_cosine_schedule_turns_alpha_sigma_through_an_angle_linear_in_t() -> None:
    """alpha_t = cos(phi_t), sigma_t = sin(phi_t) with phi linear in t; the ends are fixed by
    tan(phi) = sigma / alpha = exp(-logsnr / 2): phi_0 = atan(e^-3), phi_1 = atan(e^4)."""
    process = BlurringDiffusion(logsnr_range=(-8.0, 6.0))
    t = torch.linspace(0, 1, 11)
    alpha, sigma = process.alpha_sigma(t)
    angle = torch.atan2(sigma.double(), alpha.double())
    first, last = math.atan(math.exp(-3.0)), math.atan(math.exp(4.0))
    torch.testing.assert_close(angle, first + t.double() * (last - first), atol=1e-6, rtol=0)
    symmetric = BlurringDiffusion(logsnr_range=(-10.0, 10.0))
    assert abs(symmetric.logsnr(torch.tensor([0.5])).item()) < 1e-6  # phi = pi / 4


@pytest.mark.parametrize("min_scale", [0.0, 0.1])
def test_midway_the_blur_is_a_gaussian_of_s_max_sin_squared_and_keeps_d_min(
    min_scale: float,
) -> None:
    """At t = 1/3, s_t = s_max sin^2(pi / 6) = s_max / 4 = 2 pixels (linear in t would give 8/3).
    d_t = (1 - d_min) exp(-lambda tau) + d_min, so in pixels blur = (1 - d_min) G_s * x + d_min x.
    A Gaussian bump of variance w^2 blurred by G_s is a bump of variance w^2 + s^2, scaled by
    w^2 / (w^2 + s^2) in two dimensions."""
    size, width = 48, 2.5
    process = BlurringDiffusion(image_size=size, blur_sigma_max=8.0, min_scale=min_scale)
    grid = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) ** 2
    radius2 = grid[:, None] + grid[None, :]

    def bump(w2: float) -> torch.Tensor:
        return torch.exp(-radius2 / (2 * w2))[None, None]

    blurred = process.blur(bump(width**2), torch.tensor([1 / 3]))
    gaussian = width**2 / (width**2 + 4.0) * bump(width**2 + 4.0)
    expected = (1 - min_scale) * gaussian + min_scale * bump(width**2)
    torch.testing.assert_close(blurred, expected, atol=1e-4, rtol=0)


def test_the_loss_of_a_constant_network_is_its_mean_squared_gap_to_the_noise() -> None:
    """eps_theta = c whatever x_t and t: the loss is mean (c - eps)^2, so the target is eps
    (the exact-model test alone would also pass for a loss that always returns 0)."""
    process = BlurringDiffusion(image_size=8, blur_sigma_max=4.0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=generator)
    noise = torch.randn(4, 1, 8, 8, generator=generator)
    t, image = torch.rand(4, generator=generator), torch.randn(1, 1, 8, 8, generator=generator)
    loss = blurring_loss(Constant(image), process, x0, t=t, noise=noise)
    torch.testing.assert_close(loss, (image - noise).pow(2).mean())


@pytest.mark.parametrize("transform", [dct2, idct2])
def test_the_dct_refuses_integer_tensors(transform) -> None:
    # The DCT matrix cast to an integer dtype is all zeros, and so was the transform.
    with pytest.raises(ValueError, match="needs a floating-point tensor .* got dtype torch.uint8"):
        transform(torch.full((1, 1, 4, 4), 200, dtype=torch.uint8))


@pytest.mark.parametrize("t", [[250, 999], [-0.5, 0.5], [0.5, 1.5]])
def test_q_sample_refuses_times_outside_the_unit_interval(t) -> None:
    # Integer timesteps, a DDPM habit, used to give NaN images without an error.
    process, x0 = BlurringDiffusion(image_size=8), torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"t must be a float tensor|times must lie in \[0, 1\]"):
        process.q_sample(x0, torch.tensor(t), torch.zeros_like(x0))


def test_the_sampler_clips_every_estimate_of_x0() -> None:
    """Two steps, t = 1 -> 0.5 -> 0, with a constant noise estimate c, whose estimate of x_0 at
    t = 1 (divided by a_1 < 0.007) lies far outside [-0.5, 0.5]. The first step is Gaussian
    conditioning on the clipped estimate u0 = DCT(clamp(IDCT((u_1 - sigma_1 c_u) / a_1))): by
    Bayes' rule in precision form (prior N(a_s u0, sigma_s^2), likelihood u_t | u_s ~
    N(alpha_ts u_s, sigma_ts^2)) the state's coefficients have mean v (a_s u0 / sigma_s^2 +
    alpha_ts u_t / sigma_ts^2) and variance v = 1 / (1 / sigma_s^2 + alpha_ts^2 / sigma_ts^2):
    checked on 4,000 draws from one x_1, the mean within 5 standard errors sqrt(v / 4000) and
    the variance within 12% (5 standard errors sqrt(2 / 4000) of a sample variance). The last
    step returns its estimate of x_0, clipped: clamp(IDCT((u - sigma_s c_u) / a_s))."""
    n, low, high = 4000, -0.5, 0.5
    process = BlurringDiffusion(image_size=4, blur_sigma_max=2.0)
    generator = torch.Generator().manual_seed(30)
    c = torch.randn(1, 1, 4, 4, generator=generator, dtype=torch.float64)
    x_1 = torch.randn(1, 1, 4, 4, generator=generator, dtype=torch.float64).expand(n, 1, 4, 4)
    samples, states = blurring_sample(
        Constant(c), process, (n, 1, 4, 4), steps=2, x_1=x_1, return_states=True,
        generator=generator, clip_x0=(low, high),
    )  # fmt: skip

    t, s = torch.ones(1), torch.full((1,), 0.5)
    a_t, a_s = process.signal_scale(t).double(), process.signal_scale(s).double()
    sigma_t, sigma_s = (process.alpha_sigma(time)[1].double().item() for time in (t, s))
    u_t, c_u = dct2(x_1[:1]), dct2(c)
    estimate = idct2((u_t - sigma_t * c_u) / a_t)
    assert (estimate.abs() > 10).all()  # every pixel is clipped
    u0 = dct2(estimate.clamp(low, high))
    alpha_ts = a_t / a_s
    variance_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    variance = 1 / (1 / sigma_s**2 + alpha_ts**2 / variance_ts)
    mean = variance * (a_s * u0 / sigma_s**2 + alpha_ts * u_t / variance_ts)
    deviation = dct2(states[1]) - mean
    assert (deviation.mean(0, keepdim=True).abs() < 5 * (variance / n).sqrt()).all()
    torch.testing.assert_close(deviation.var(0, keepdim=True), variance, rtol=0.12, atol=0)

    last = idct2((dct2(states[1]) - sigma_s * c_u) / a_s)
    assert ((last < low) | (last > high)).any()
    torch.testing.assert_close(samples, last.clamp(low, high))


class TimeRecorder(torch.nn.Module):
    """A zero noise estimate that keeps the time inputs it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        self.times.append(time)
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("time_scale", [1.0, 250.0])
def test_the_network_sees_time_scale_times_t_and_the_skip_reads_t_back(time_scale: float) -> None:
    """model_time is time_scale * t, what the loss and the sampler hand the network; the
    FrequencySkip divides it back, so that with a zero network it is the Gaussian estimate at t,
    sigma (u_t - a m) / (a^2 v + sigma^2), written out here at t itself."""
    process = BlurringDiffusion(image_size=8, blur_sigma_max=4.0, time_scale=time_scale)
    generator = torch.Generator().manual_seed(31)
    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(process.model_time(t), time_scale * t)
    recorder = TimeRecorder()
    x0, noise = torch.randn(2, 3, 1, 8, 8, generator=generator)
    blurring_loss(recorder, process, x0, t=t, noise=noise)
    torch.testing.assert_close(recorder.times[0], time_scale * t)
    blurring_sample(recorder, process, (1, 1, 8, 8), steps=2, generator=generator)
    torch.testing.assert_close(torch.cat(recorder.times[1:]), time_scale * torch.tensor([1.0, 0.5]))

    images = torch.randn(500, 1, 8, 8, generator=generator) * torch.linspace(0.2, 1.0, 8) + 0.3
    skip = FrequencySkip(Constant(torch.zeros(1, 1, 8, 8)), process, images)
    x_t = torch.randn(3, 1, 8, 8, generator=generator)
    a, sigma = process.signal_scale(t), process.alpha_sigma(t)[1][:, None, None, None]
    m, v = dct2(images).mean(0), dct2(images).var(0)
    expected = idct2(sigma * (dct2(x_t) - a * m) / (a**2 * v + sigma**2))
    torch.testing.assert_close(skip(x_t, time_scale * t), expected, atol=1e-5, rtol=0)
