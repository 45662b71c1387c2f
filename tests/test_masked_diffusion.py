"""Masked (absorbing-state) diffusion against exact enumeration of a toy distribution.

The toy: D = 3 binary symbols, tokens of shape (B, 1, 1, 3), with a correlated joint table.
Its oracle denoiser returns the exact p(x_0^i | visible symbols), so the ELBO must be tight
(-log p(x_0) for every x_0, whatever the schedule) and the sampler must reproduce the table.
Monte Carlo checks allow 5 standard errors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib import FCUNet
from diffusion_lib.masked_diffusion import (
    MaskedDiffusion,
    TokenDenoiser,
    _most_confident,
    images_from_tokens,
    masked_diffusion_loss,
    masked_nll_bound,
    masked_sample,
    tokens_from_images,
)
from diffusion_lib.training import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks

SCHEDULES = ("linear", "cosine")
MC_SIGMAS = 5.0  # Monte Carlo tolerance in standard errors

# The toy distribution: row c of CONFIGS is the configuration (x^0, x^1, x^2), the binary digits
# of c. Correlated: the marginals p(x^i = 0) are 0.45, 0.48 and 0.54, whose product 0.117 is far
# from p(0, 0, 0) = 0.30.
CONFIGS = torch.tensor(list(itertools.product((0, 1), repeat=3)))
TABLE = torch.tensor([0.30, 0.05, 0.02, 0.08, 0.10, 0.03, 0.12, 0.30], dtype=torch.float64)
D = 3
MASK = 2  # the mask symbol of MaskedDiffusion(num_classes=2)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_alpha(schedule: str, t: float) -> float:
    return 1.0 - t if schedule == "linear" else 1.0 - math.cos(0.5 * math.pi * (1.0 - t))


def tokens_of(configs: Tensor) -> Tensor:
    """Configurations (B, 3) as tokens (B, 1, 1, 3)."""
    return configs.reshape(-1, 1, 1, D)


class Oracle(nn.Module):
    """The exact denoiser of ``table``: logits log p(x_0^i | visible symbols of x_t), found by
    summing the table over the configurations that agree with the visible symbols. There are
    only 3^3 inputs, so they are all worked out once and looked up. (A visible position gets
    log 1 for its own symbol and log 0 for the other.)"""

    def __init__(self, table: Tensor = TABLE) -> None:
        super().__init__()
        inputs = torch.tensor(list(itertools.product((0, 1, MASK), repeat=D)))  # (27, D)
        agrees = (CONFIGS[None] == inputs[:, None]) | (inputs[:, None] == MASK)  # (27, 8, D)
        weights = table * agrees.all(dim=2)  # (27, 8): p(x_0 = c, visible symbols)
        joint = torch.einsum("bc,cik->bki", weights, F.one_hot(CONFIGS, 2).double())
        self.logits = joint.log() - weights.sum(dim=1).log()[:, None, None]

    def forward(self, x_t: Tensor) -> Tensor:
        index = (x_t.reshape(-1, D) * torch.tensor([9, 3, 1])).sum(dim=1)
        return self.logits[index].view(-1, 2, 1, 1, D)


class Recorder(nn.Module):
    """Passes its inputs on to ``model`` and keeps them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x_t: Tensor) -> Tensor:
        self.inputs.append(x_t)
        return self.model(x_t)


class FixedLogits(nn.Module):
    """A context-free model: the same logits (K, C, H, W) whatever it is shown."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x_t: Tensor) -> Tensor:
        return self.logits.expand(x_t.shape[0], *self.logits.shape)


class TimeIgnoringNet(nn.Module):
    """A 1x1 convolution with the ``forward(x, t)`` of the image networks; it keeps its inputs."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.seen: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.conv(x)
        self.seen = (x, t, out)
        return out


def conditional(table: Tensor, i: int, value: int, known: dict[int, int]) -> float:
    """p(x^i = value | x^j = known[j]) by summing the table with plain floats."""

    def matches(config: list[int], fixed: dict[int, int]) -> bool:
        return all(config[j] == v for j, v in fixed.items())

    rows = list(zip(CONFIGS.tolist(), table.tolist(), strict=True))
    numerator = sum(p for c, p in rows if matches(c, {**known, i: value}))
    return numerator / sum(p for c, p in rows if matches(c, known))


def marginal_product(table: Tensor) -> Tensor:
    return torch.tensor(
        [math.prod(conditional(table, i, c[i], {}) for i in range(D)) for c in CONFIGS.tolist()],
        dtype=torch.float64,
    )


def ordered_partitions(items: frozenset[int]) -> Iterator[list[tuple[int, ...]]]:
    """Every way to reveal ``items`` in a sequence of nonempty groups."""
    if not items:
        yield []
        return
    for size in range(1, len(items) + 1):
        for first in itertools.combinations(sorted(items), size):
            for rest in ordered_partitions(items - set(first)):
                yield [first, *rest]


def sampler_law(table: Tensor, schedule: str, steps: int) -> Tensor:
    """The exact law of ``masked_sample`` with the oracle. Each symbol is revealed at step j
    (from t_j = 1 - j / steps to t_{j+1}) with probability w_j = alpha(t_{j+1}) - alpha(t_j),
    independently; the symbols revealed at one step are drawn independently of each other
    from their conditionals given the symbols revealed before."""
    alphas = [hand_alpha(schedule, 1.0 - j / steps) for j in range(steps + 1)]
    w = torch.tensor([b - a for a, b in itertools.pairwise(alphas)], dtype=torch.float64)
    law, total = torch.zeros(8, dtype=torch.float64), 0.0
    for groups in ordered_partitions(frozenset(range(D))):
        at_step = w ** len(groups[0])  # P(group 1 revealed together at step j)
        for group in groups[1:]:  # the next group at a later step
            at_step = w ** len(group) * (at_step.cumsum(0) - at_step)
        chance = at_step.sum().item()
        total += chance
        for c, config in enumerate(CONFIGS.tolist()):
            known = {}
            p = 1.0
            for group in groups:
                p *= math.prod(conditional(table, i, config[i], known) for i in group)
                known |= {i: config[i] for i in group}
            law[c] += chance * p
    assert math.isclose(total, 1.0, rel_tol=1e-9)
    return law


def frequencies(samples: Tensor) -> Tensor:
    """Empirical law over the 8 configurations of samples (B, 1, 1, 3)."""
    index = (samples.reshape(-1, D) * torch.tensor([4, 2, 1])).sum(dim=1)
    return torch.bincount(index, minlength=8).double() / samples.shape[0]


def assert_law(empirical: Tensor, law: Tensor, n: int) -> None:
    """Every cell within MC_SIGMAS binomial standard errors."""
    tolerance = MC_SIGMAS * (law * (1 - law) / n).sqrt()
    assert bool(((empirical - law).abs() <= tolerance).all()), (empirical, law)


def total_variation(p: Tensor, q: Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def assert_mean(draws: Tensor, expected: float) -> None:
    """The mean of i.i.d. draws within MC_SIGMAS standard errors of ``expected``."""
    error = draws.std().item() / math.sqrt(draws.numel())
    assert abs(draws.mean().item() - expected) <= MC_SIGMAS * error + 1e-9, (
        draws.mean().item(),
        expected,
        error,
    )


# ----------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_runs_from_one_to_zero_and_decreases(schedule: str) -> None:
    process = MaskedDiffusion(schedule=schedule)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha = process.alpha(t)
    torch.testing.assert_close(
        alpha, torch.tensor([hand_alpha(schedule, x) for x in t.tolist()]).double()
    )
    assert math.isclose(alpha[0].item(), 1.0, rel_tol=1e-15) and alpha[-1].item() == 0.0
    assert bool((alpha.diff() < 0).all())


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_is_exactly_one_at_zero_in_float64(schedule: str) -> None:
    process = MaskedDiffusion(schedule=schedule)
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert process.alpha(zero).item() == 1.0
    assert process.loss_weight(zero).item() == math.inf


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_derivative_is_the_derivative_of_alpha(schedule: str) -> None:
    process = MaskedDiffusion(schedule=schedule)
    t = torch.tensor([0.01, 0.3, 0.5, 0.77, 0.999], dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(process.alpha(t).sum(), t)
    torch.testing.assert_close(process.alpha_derivative(t.detach()), gradient)
    h = 1e-7  # at the ends, one-sided difference quotients (error about h |alpha''| / 2)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    quotients = (
        process.alpha(ends + torch.tensor([h, 0.0])) - process.alpha(ends - torch.tensor([0.0, h]))
    ) / h
    torch.testing.assert_close(process.alpha_derivative(ends), quotients, rtol=0, atol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_loss_weight_by_hand(schedule: str) -> None:
    times = [0.001, 0.1, 0.5, 0.9, 1.0]
    got = MaskedDiffusion(schedule=schedule).loss_weight(torch.tensor(times, dtype=torch.float64))
    if schedule == "linear":
        expected = [1.0 / t for t in times]
    else:  # alpha' = -pi/2 sin(pi/2 (1 - t)), 1 - alpha = cos(pi/2 (1 - t))
        expected = [
            0.5 * math.pi * math.sin(0.5 * math.pi * (1 - t)) / math.cos(0.5 * math.pi * (1 - t))
            for t in times
        ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


# ----------------------------------------------------------------------------- forward process
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_q_sample_masks_a_fraction_one_minus_alpha_independently(schedule: str) -> None:
    process = MaskedDiffusion(num_classes=3, schedule=schedule)
    times, rows, width = [0.1, 0.4, 0.7, 0.95], 2000, 40
    t = torch.tensor(times, dtype=torch.float64).repeat_interleave(rows)
    x0 = torch.randint(0, 3, (t.shape[0], 1, 4, width // 4), generator=generator(1))
    x_t = process.q_sample(x0, t, generator=generator(2))
    hidden = x_t == process.mask_id
    assert torch.equal(x_t[~hidden], x0[~hidden])  # visible symbols are unchanged
    for k, time in enumerate(times):
        rows_k = slice(k * rows, (k + 1) * rows)
        p = 1.0 - hand_alpha(schedule, time)
        for value in range(3):  # the same fraction whatever the symbol
            masked = hidden[rows_k][x0[rows_k] == value].double()
            assert abs(masked.mean().item() - p) <= MC_SIGMAS * math.sqrt(
                p * (1 - p) / masked.numel()
            )
        # two positions are masked together with probability (1 - alpha)^2
        pairs = (hidden[rows_k, 0, 0, 0] & hidden[rows_k, 0, 3, 4]).double()
        assert abs(pairs.mean().item() - p**2) <= MC_SIGMAS * math.sqrt(p**2 * (1 - p**2) / rows)


def test_q_sample_at_the_ends_keeps_everything_or_nothing() -> None:
    process = MaskedDiffusion()
    x0 = torch.randint(0, 2, (5, 1, 3, 3))
    assert torch.equal(process.q_sample(x0, torch.zeros(5)), x0)
    assert bool((process.q_sample(x0, torch.ones(5)) == MASK).all())


def test_q_sample_takes_one_time_for_the_whole_batch() -> None:
    process = MaskedDiffusion(schedule="cosine")
    x0 = torch.randint(0, 2, (4, 1, 6, 6))
    one_time = process.q_sample(x0, 0.4, generator=generator(3))
    per_sample = process.q_sample(x0, torch.full((4,), 0.4), generator=generator(3))
    assert torch.equal(one_time, per_sample)
    with pytest.raises(ValueError, match="one time or have shape"):
        process.q_sample(x0, torch.full((3,), 0.4))


# ----------------------------------------------------------------------------- the posterior
def absorbing_matrix(keep: float, k: int) -> Tensor:
    """(K + 1) x (K + 1) transition matrix: a symbol stays with probability ``keep``, else it
    becomes the mask K, which stays."""
    matrix = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    matrix[:k, :k] = keep * torch.eye(k, dtype=torch.float64)
    matrix[:k, k] = 1.0 - keep
    matrix[k, k] = 1.0
    return matrix


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("k", [2, 3])
def test_unmasking_probability_is_bayes_rule(schedule: str, k: int) -> None:
    process = MaskedDiffusion(num_classes=k, schedule=schedule)
    for s, t in [(0.0, 0.5), (0.2, 0.3), (0.5, 1.0), (0.0, 1.0), (0.9, 0.95), (0.3, 0.3001)]:
        alpha_s, alpha_t = hand_alpha(schedule, s), hand_alpha(schedule, t)
        q_s, q_t = absorbing_matrix(alpha_s, k), absorbing_matrix(alpha_t, k)
        q_ts = absorbing_matrix(alpha_t / alpha_s, k)  # q(x_t | x_s)
        torch.testing.assert_close(q_s @ q_ts, q_t)  # the matrices compose
        for x0 in range(k):
            posterior = q_ts[:, k] * q_s[x0] / q_t[x0, k]  # q(x_s | x_t = mask, x_0)
            assert math.isclose(posterior.sum().item(), 1.0, rel_tol=1e-12)
            times = torch.tensor([s, t], dtype=torch.float64)
            got = process.unmasking_probability(times[0], times[1]).item()
            assert math.isclose(got, posterior[x0].item(), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("schedule", "dtype"),
    [
        ("linear", torch.float32),
        ("linear", torch.float64),
        ("cosine", torch.float32),
        ("cosine", torch.float64),
    ],
)
def test_unmasking_probability_needs_s_before_t_and_t_positive(
    schedule: str, dtype: torch.dtype
) -> None:
    process = MaskedDiffusion(schedule=schedule)
    with pytest.raises(ValueError, match="s < t"):
        process.unmasking_probability(
            torch.tensor(0.6, dtype=dtype), torch.tensor(0.5, dtype=dtype)
        )
    with pytest.raises(ValueError, match="s < t"):
        process.unmasking_probability(
            torch.tensor(0.0, dtype=dtype), torch.tensor(0.0, dtype=dtype)
        )


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_last_sampling_step_reveals_every_masked_symbol(schedule: str) -> None:
    """masked_sample steps through float64 times; from t = 1 / steps to 0 the reveal chance
    must be exactly 1, or a mask symbol can (rarely) survive into the output."""
    process = MaskedDiffusion(schedule=schedule)
    for steps in (1, 10, 1000):
        s, t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[-2:].flip(0)
        assert process.unmasking_probability(s, t).item() == 1.0


# ----------------------------------------------------------------------------- the oracle's ELBO
def test_the_bound_masks_n_uniform_symbols_at_uniform_positions() -> None:
    """P(M) = 1 / (D C(D, |M|)) for each nonempty set M of masked positions."""
    recorder, n = Recorder(Oracle()), 30000
    x0 = tokens_of(CONFIGS[[5]].expand(n, D))
    masked_nll_bound(recorder, MaskedDiffusion(), x0, generator=generator(3))
    masks = (recorder.inputs[0].reshape(-1, D) == MASK).long()
    counts = torch.bincount((masks * torch.tensor([4, 2, 1])).sum(dim=1), minlength=8).double() / n
    law = torch.tensor([0.0] + [1 / (D * math.comb(D, bin(m).count("1"))) for m in range(1, 8)])
    assert counts[0].item() == 0.0
    assert_law(counts[1:], law[1:].double(), n)


def test_the_oracle_bound_is_tight_for_every_configuration() -> None:
    n = 20000
    x0 = tokens_of(CONFIGS.repeat_interleave(n, dim=0))
    bound = masked_nll_bound(Oracle(), MaskedDiffusion(), x0, generator=generator(4)).view(8, n)
    for c in range(8):
        assert_mean(bound[c], -math.log(TABLE[c].item()))


def oracle_masked_cross_entropy(config: Tensor, mask: tuple[int, ...]) -> float:
    """sum_{i in M} -log p_oracle(x_0^i | x_0 outside M)."""
    x_t = config.clone()
    x_t[list(mask)] = MASK
    log_p = Oracle()(tokens_of(x_t)).log_softmax(dim=1)[0, :, 0, 0]  # (2, D)
    return -sum(log_p[config[i], i].item() for i in mask)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_continuous_time_bound_is_tight_whatever_the_schedule(schedule: str) -> None:
    """int_0^1 w(t) sum_M P(M | t) CE(M) dt = -log p(x_0), by the midpoint rule (the integrand
    is smooth and finite at t = 0, so 20,000 points leave an error far below 1e-6)."""
    process = MaskedDiffusion(schedule=schedule)
    points = 20000
    t = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    alpha, weight = process.alpha(t), process.loss_weight(t)
    for c, config in enumerate(CONFIGS):
        integrand = torch.zeros_like(t)
        for size in range(1, D + 1):
            for mask in itertools.combinations(range(D), size):
                chance = (1 - alpha) ** size * alpha ** (D - size)
                integrand += chance * oracle_masked_cross_entropy(config, mask)
        integral = (weight * integrand).mean().item()
        assert math.isclose(integral, -math.log(TABLE[c].item()), rel_tol=1e-6)


# ----------------------------------------------------------------------------- context-free models
def test_a_context_free_model_costs_the_sum_of_its_cross_entropies() -> None:
    k, n = 3, 20000
    logits = torch.tensor(
        [
            [0.5, -1.0, 2.0, 0.0, 1.0, -0.3],
            [0.0, 0.7, -2.0, 0.1, 0.0, 0.0],
            [1.5, 0.2, 0.0, -0.4, 3.0, 0.9],
        ]
    )  # (K, 6)
    cross_entropy = [  # -log softmax by hand, (K, 6)
        [
            math.log(sum(math.exp(logits[j, i].item()) for j in range(k))) - logits[v, i].item()
            for i in range(6)
        ]
        for v in range(k)
    ]
    x0 = torch.randint(0, k, (n, 1, 2, 3), generator=generator(5))
    expected = torch.tensor(cross_entropy).gather(0, x0.reshape(n, 6)).sum(dim=1)
    model = FixedLogits(logits.view(k, 1, 2, 3))
    bound = masked_nll_bound(model, MaskedDiffusion(num_classes=k), x0, generator=generator(6))
    assert_mean((bound - expected).detach(), 0.0)
    assert bound.std().item() > 0.1  # a real Monte Carlo check: single draws vary


@pytest.mark.parametrize("k", [2, 3])
def test_zero_logits_cost_d_log_k_on_every_draw(k: int) -> None:
    zeros = lambda x_t: torch.zeros(x_t.shape[0], k, *x_t.shape[1:])  # noqa: E731
    x0 = torch.randint(0, k, (500, 2, 2, 3))
    bound = masked_nll_bound(zeros, MaskedDiffusion(num_classes=k), x0, generator=generator(7))
    torch.testing.assert_close(bound, torch.full((500,), 12 * math.log(k)))


# ----------------------------------------------------------------------------- the training loss
@pytest.mark.parametrize(("k", "channels"), [(2, 1), (3, 2)])
def test_the_loss_is_the_bound_per_symbol_on_quantised_images(k: int, channels: int) -> None:
    process = MaskedDiffusion(num_classes=k)
    model = TokenDenoiser(TimeIgnoringNet(channels * (k + 1), channels * k), num_classes=k)
    images = torch.rand(64, channels, 4, 4) * 2 - 1  # off the grey levels
    loss = masked_diffusion_loss(model, process, images, generator=generator(8))
    tokens = tokens_from_images(images, k)
    bound = masked_nll_bound(model, process, tokens, generator=generator(8))
    torch.testing.assert_close(loss, bound.mean() / (channels * 16))
    assert (
        loss.item() != masked_diffusion_loss(model, process, images, generator=generator(9)).item()
    )


def test_the_loss_takes_no_noise_or_labels() -> None:
    model, images = Oracle(), torch.zeros(4, 1, 1, 3)
    with pytest.raises(ValueError, match="noise"):
        masked_diffusion_loss(model, MaskedDiffusion(), images, noise=torch.zeros_like(images))
    with pytest.raises(ValueError, match="labels"):
        masked_diffusion_loss(
            model, MaskedDiffusion(), images, labels=torch.zeros(4, dtype=torch.long)
        )


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_many_steps_sample_the_table(schedule: str) -> None:
    """With 200 steps two symbols are rarely revealed together: the exact law of the sampler
    (enumerated) is within 0.005 of the table, and 20,000 samples follow it."""
    n, steps = 20000, 200
    samples = masked_sample(
        Oracle(), MaskedDiffusion(schedule=schedule), (n, 1, 1, D), steps, generator=generator(10)
    )
    assert samples.dtype == torch.long and bool(((samples == 0) | (samples == 1)).all())
    law = sampler_law(TABLE, schedule, steps)
    assert total_variation(law, TABLE) < 0.005
    assert_law(frequencies(samples), law, n)
    # the sampling error of the total variation is about 0.5 sum sqrt(2 p (1 - p) / (pi n)) = 0.007
    assert total_variation(frequencies(samples), TABLE) < 0.025


def test_one_step_samples_the_product_of_the_marginals() -> None:
    n = 20000
    samples = masked_sample(Oracle(), MaskedDiffusion(), (n, 1, 1, D), 1, generator=generator(11))
    product = marginal_product(TABLE)
    torch.testing.assert_close(sampler_law(TABLE, "linear", 1), product)
    assert total_variation(product, TABLE) > 0.2
    assert_law(frequencies(samples), product, n)
    assert total_variation(frequencies(samples), TABLE) > 0.15


@pytest.mark.parametrize("steps", [2, 5])
def test_few_steps_follow_the_enumerated_law(steps: int) -> None:
    n = 20000
    samples = masked_sample(
        Oracle(), MaskedDiffusion(schedule="cosine"), (n, 1, 1, D), steps, generator=generator(12)
    )
    assert_law(frequencies(samples), sampler_law(TABLE, "cosine", steps), n)


@pytest.mark.parametrize("k", [3, 5])
def test_a_context_free_model_samples_each_symbol_from_its_softmax(k: int) -> None:
    """A model that ignores its input gives every symbol, whenever it is revealed, the law
    softmax(logits) at its position, independently: the class frequencies of 20,000 samples
    must match it within 5 binomial standard errors. With K > 2 classes this checks the
    inverse-CDF draw over more than one threshold (with K = 2 there is only one)."""
    n = 20000
    logits = torch.randn(k, 1, 2, 2, generator=generator(24))
    samples = masked_sample(
        FixedLogits(logits), MaskedDiffusion(num_classes=k), (n, 1, 2, 2), 5,
        generator=generator(25),
    )  # fmt: skip
    law = logits.double().softmax(dim=0).reshape(k, 4)  # (K, positions)
    counts = F.one_hot(samples.reshape(n, 4), k).double().mean(dim=0).T  # (K, positions)
    tolerance = MC_SIGMAS * (law * (1 - law) / n).sqrt()
    assert bool(((counts - law).abs() <= tolerance).all()), (counts, law)


def test_the_same_seed_gives_the_same_samples() -> None:
    def draw(seed: int) -> Tensor:
        return masked_sample(
            Oracle(), MaskedDiffusion(), (50, 1, 1, D), 20, generator=generator(seed)
        )

    assert torch.equal(draw(13), draw(13))
    assert not torch.equal(draw(13), draw(14))


@pytest.mark.parametrize("batch", [1, 2])
def test_logits_are_recomputed_only_after_a_reveal(batch: int) -> None:
    """At most B D network calls however many steps: one at the start, then one after each step
    that revealed something (a step that changed the trajectory) while masks remain, so exactly
    as many calls as steps that changed the trajectory."""
    for seed in range(10):
        model = Recorder(Oracle())
        shape, steps = (batch, 1, 1, D), 1000
        trajectory = masked_sample(
            model,
            MaskedDiffusion(),
            shape,
            steps,
            generator=generator(seed),
            return_trajectory=True,
        )
        changed = (trajectory.states.diff(dim=0) != 0).flatten(1).any(dim=1)
        calls = len(model.inputs)
        assert calls <= batch * D
        assert calls == int(changed.sum())


def test_the_most_confident_masked_symbols_are_revealed() -> None:
    """_most_confident against sorting each row by hand."""
    rows, dims = 200, 12
    rng = generator(20)
    masked = torch.rand(rows, 1, 3, 4, generator=rng) < 0.6
    confidence = torch.rand(rows, 1, 3, 4, generator=rng)
    for still_masked in (0, 3, 7, 12):
        reveal = _most_confident(masked, confidence, still_masked)
        assert not bool((reveal & ~masked).any())
        for row in range(rows):
            scores = confidence[row].flatten()[masked[row].flatten()].tolist()
            count = max(len(scores) - still_masked, 0)
            expected = sorted(scores, reverse=True)[:count]
            got = confidence[row].flatten()[reveal[row].flatten()].tolist()
            assert sorted(got, reverse=True) == expected
    assert dims == masked[0].numel()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_confidence_order_leaves_the_scheduled_number_masked(schedule: str) -> None:
    """After the step to time s, D (1 - alpha_s) symbols of every sample are masked, rounded."""
    process, steps, shape = MaskedDiffusion(schedule=schedule), 7, (5, 1, 4, 4)
    model = FixedLogits(torch.randn(2, 1, 4, 4, generator=generator(21)))
    trajectory = masked_sample(
        model, process, shape, steps, order="confidence", generator=generator(22),
        return_trajectory=True,
    )  # fmt: skip
    masked_counts = (trajectory.states == 0.0).flatten(2).sum(dim=2)  # (steps + 1, B)
    for i, s in enumerate(trajectory.timesteps.double().tolist()):
        alpha_s = process.alpha(torch.tensor(s, dtype=torch.float64)).item()
        assert bool((masked_counts[i] == round(16 * (1 - alpha_s))).all())
    assert bool(((trajectory.states[-1] == -1.0) | (trajectory.states[-1] == 1.0)).all())


def confidence_law(table: Tensor) -> Tensor:
    """The exact law of the confidence-order sampler with the oracle and one reveal per step,
    by enumerating the candidates drawn at each step: every masked position draws a candidate
    from p(x^i | revealed), the most probable candidate (the first on ties) is revealed, and the
    other candidates are thrown away."""
    law = torch.zeros(8, dtype=torch.float64)

    def step(known: dict[int, int], weight: float) -> None:
        masked = [i for i in range(D) if i not in known]
        if not masked:
            law[sum(v << (D - 1 - i) for i, v in known.items())] += weight
            return
        for candidate in itertools.product((0, 1), repeat=len(masked)):
            chances = [
                conditional(table, i, c, known) for i, c in zip(masked, candidate, strict=True)
            ]
            chosen = max(range(len(masked)), key=lambda j: (chances[j], -j))
            step({**known, masked[chosen]: candidate[chosen]}, weight * math.prod(chances))

    step({}, 1.0)
    return law


def test_confidence_order_follows_its_enumerated_law() -> None:
    """One reveal per step (3 steps for 3 symbols): the samples follow the enumerated law,
    which is not the table: choosing the surest candidate favours each symbol's likelier value."""
    n = 20000
    samples = masked_sample(
        Oracle(), MaskedDiffusion(), (n, 1, 1, D), D, order="confidence", generator=generator(23)
    )
    law = confidence_law(TABLE)
    assert math.isclose(law.sum().item(), 1.0, rel_tol=1e-12)
    assert total_variation(law, TABLE) > 0.02
    assert_law(frequencies(samples), law, n)
    with pytest.raises(ValueError, match="random, confidence"):
        masked_sample(Oracle(), MaskedDiffusion(), (2, 1, 1, D), 3, order="greedy")


def test_the_trajectory_goes_from_grey_to_the_sample() -> None:
    steps, shape = 20, (4, 1, 1, D)
    process = MaskedDiffusion()
    tokens = masked_sample(Oracle(), process, shape, steps, generator=generator(15))
    trajectory = masked_sample(
        Oracle(), process, shape, steps, generator=generator(15), return_trajectory=True
    )
    states = trajectory.states
    assert states.shape == (steps + 1, *shape)
    assert bool((states[0] == 0.0).all())
    torch.testing.assert_close(states[-1], images_from_tokens(tokens))
    visible = states[:-1] != 0.0
    assert torch.equal(states[1:][visible], states[:-1][visible])  # revealed pixels stay
    torch.testing.assert_close(trajectory.timesteps, torch.linspace(1.0, 0.0, steps + 1))
    assert trajectory.timesteps[0].item() == 1.0 and trajectory.timesteps[-1].item() == 0.0


# ----------------------------------------------------------------------------- images and tokens
@pytest.mark.parametrize("k", [2, 4])
def test_grey_levels_survive_a_round_trip(k: int) -> None:
    levels = torch.tensor([-1.0 + 2.0 * j / (k - 1) for j in range(k)])
    tokens = torch.randint(0, k, (6, 2, 3, 3))
    images = levels[tokens]
    assert torch.equal(tokens_from_images(images, k), tokens)
    torch.testing.assert_close(images_from_tokens(tokens, k), images)


def test_two_classes_split_at_zero_and_masks_are_grey() -> None:
    images = torch.tensor([-1.0, -0.4, -0.01, 0.0, 0.01, 0.3, 1.0]).view(1, 1, 1, 7)
    assert tokens_from_images(images).flatten().tolist() == [0, 0, 0, 1, 1, 1, 1]
    for outside in (2.5, -7.0, 255.0):
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            tokens_from_images(torch.full((1, 1, 2, 2), outside))
    for classes in (1, True):
        with pytest.raises(ValueError, match="num_classes"):
            tokens_from_images(images, classes)
        with pytest.raises(ValueError, match="num_classes"):
            images_from_tokens(torch.zeros(1, 1, 2, 2, dtype=torch.long), classes)
    tokens = torch.tensor([0, 1, 2]).view(1, 1, 1, 3)
    assert images_from_tokens(tokens).flatten().tolist() == [-1.0, 1.0, 0.0]
    assert images_from_tokens(torch.tensor([0, 3, 4]).view(1, 1, 1, 3), 4).flatten().tolist() == [
        -1.0,
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="floating point"):
        tokens_from_images(torch.zeros(1, 1, 2, 2, dtype=torch.long))


# ----------------------------------------------------------------------------- TokenDenoiser
@pytest.mark.parametrize(("k", "channels"), [(2, 1), (2, 2), (3, 2)])
def test_token_denoiser_feeds_one_hot_tokens_and_reads_c_k_logits(k: int, channels: int) -> None:
    network = TimeIgnoringNet(channels * (k + 1), channels * k)
    x_t = torch.randint(0, k + 1, (5, channels, 3, 4))
    logits = TokenDenoiser(network, num_classes=k)(x_t)
    assert logits.shape == (5, k, channels, 3, 4)
    inputs, time, outputs = network.seen
    assert inputs.dtype == torch.float32 and torch.equal(time, torch.zeros(5, dtype=torch.long))
    for c in range(channels):
        for j in range(k + 1):
            assert torch.equal(inputs[:, c * (k + 1) + j], (x_t[:, c] == j).float())
        for j in range(k):
            assert torch.equal(logits[:, j, c], outputs[:, c * k + j])


def test_token_denoiser_names_the_channels_it_needs() -> None:
    with pytest.raises(ValueError, match="must return 4 channels"):
        TokenDenoiser(TimeIgnoringNet(6, 3))(torch.zeros(2, 2, 3, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "x_t",
    [torch.zeros(2, 1, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 1, 3, 3) > 0],
)
def test_token_denoiser_refuses_images_in_place_of_tokens(x_t: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"x_t must be tokens, an integer tensor \(B, C, H, W\)"):
        TokenDenoiser(TimeIgnoringNet(3, 2))(x_t)


# ----------------------------------------------------------------------------- errors
def test_bad_arguments_are_refused() -> None:
    for classes in (1, True, 2.0):
        with pytest.raises(ValueError, match="num_classes"):
            MaskedDiffusion(num_classes=classes)
    with pytest.raises(ValueError, match="linear, cosine"):
        MaskedDiffusion(schedule="geometric")
    process = MaskedDiffusion()
    for t in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            process.alpha(torch.tensor([0.5, t]))
    t = torch.full((2,), 0.5)
    for tokens in (
        torch.zeros(2, 1, 1, 3),
        torch.full((2, 1, 1, 3), 2),
        torch.full((2, 1, 1, 3), -1),
    ):
        with pytest.raises(ValueError, match="tokens"):
            process.q_sample(tokens, t)
        with pytest.raises(ValueError, match="tokens"):
            masked_nll_bound(Oracle(), process, tokens)
    with pytest.raises(ValueError, match="shape"):
        process.q_sample(torch.zeros(2, 1, 1, 3, dtype=torch.long), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="steps"):
        masked_sample(Oracle(), process, (2, 1, 1, D), 0)
    for shape in ((4,), (2, 0, 1, 3), (2, 1.0, 1, 3)):
        with pytest.raises(ValueError, match="shape"):
            masked_sample(Oracle(), process, shape, 5)


# ----------------------------------------------------------------------------- training
def test_training_learns_half_white_images() -> None:
    """Each 8x8 image is white on its left or its right half: once one pixel is visible the
    rest is known, so the exact bound is log 2 nats against D log 2 for a blind model."""
    left = (torch.arange(8) < 4).float().mul(2).sub(1).expand(8, 8)
    images = torch.stack([left, left.flip(1)]).unsqueeze(1).repeat(64, 1, 1, 1)
    network = FCUNet(image_size=8, channels=3, out_channels=2, widths=(64, 32))
    denoiser, process = TokenDenoiser(network), MaskedDiffusion()
    tokens = tokens_from_images(images)

    def mean_bound() -> float:
        with torch.no_grad():
            return (
                masked_nll_bound(denoiser, process, tokens, generator=generator(16)).mean().item()
            )

    blind = 64 * math.log(2)
    assert math.isclose(mean_bound(), blind, rel_tol=1e-5)  # the output layer starts at zero
    train(
        denoiser,
        process,
        images,
        loss=masked_diffusion_loss,
        steps=150,
        batch_size=64,
        lr=3e-3,
        warmup_steps=10,
        progress=False,
        device="cpu",
        compile=False,
    )
    assert mean_bound() < 0.15 * blind


def test_images_from_tokens_refuses_tokens_of_more_classes() -> None:
    # Tokens of four grey levels read with the default two: token 2 would be drawn as the mask's
    # grey and token 3 as the pixel value 5.
    tokens = tokens_from_images(torch.linspace(-1, 1, 4).view(1, 1, 1, 4), num_classes=4)
    message = r"tokens must lie in 0..2 \(2 is the mask\) for num_classes=2, got values from 0 to 3"
    with pytest.raises(ValueError, match=message):
        images_from_tokens(tokens)
    expected = torch.linspace(-1, 1, 4).view(1, 1, 1, 4)
    torch.testing.assert_close(images_from_tokens(tokens, 4), expected)
    with pytest.raises(ValueError, match="must be an integer tensor"):
        images_from_tokens(torch.zeros(1, 1, 2, 2))
