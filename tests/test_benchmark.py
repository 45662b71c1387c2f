"""The GPU benchmark's parts, at tiny sizes on the CPU: loops, FLOP counts, targets, the report."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchmark  # noqa: E402
import contenders  # noqa: E402
import fc_recipes  # noqa: E402

from diffusion_lib.data import DataNotFoundError, load_images  # noqa: E402
from diffusion_lib.metrics import QualityScore  # noqa: E402
from diffusion_lib.models import FCUNet  # noqa: E402
from diffusion_lib.schedules import NoiseSchedule  # noqa: E402

CPU = torch.device("cpu")
TINY_FC = {"widths": (32, 16)}


def tiny_settings(**changes: object) -> contenders.RunSettings:
    options = {
        "device": CPU,
        "batch_size": 8,
        "warmup_steps": 1,
        "timed_steps": 2,
        "num_workers": 0,
        "allow_compile": False,
    }
    return contenders.RunSettings(**{**options, **changes})


def random_data(count: int = 32) -> contenders.TrainingData:
    images = torch.rand(count, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (count,))
    return contenders.TrainingData(images=images, loader_dataset=TensorDataset(images, labels))


def test_tutorial_noising_matches_q_sample() -> None:
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    alphas_cumprod = contenders.linear_alphas_cumprod(CPU)
    expected = NoiseSchedule.from_name("linear", 1000).q_sample(x0, t, noise)
    got = contenders.noisy_images(x0, t, noise, alphas_cumprod)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_plain_loop_first_loss_is_the_noise_variance() -> None:
    # FCUNet's output layer starts at zero, so the first loss is mean(eps^2): 1 up to
    # sampling error (standard deviation sqrt(2 / (8 * 784)) = 0.018).
    contender = contenders.PlainLoopContender("fc_unet", **TINY_FC)
    state = contender.start(random_data(), tiny_settings())
    before = [p.detach().clone() for p in state.noise_predictor.parameters()]
    first = state.step()
    assert abs(float(first) - 1.0) < 0.09
    second = state.step()
    assert math.isfinite(float(second))
    after = list(state.noise_predictor.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_plain_loop_runs_past_an_epoch() -> None:
    contender = contenders.PlainLoopContender("fc_unet", **TINY_FC)
    state = contender.start(random_data(count=16), tiny_settings())
    losses = [float(state.step()) for _ in range(5)]  # 2 batches per epoch
    assert all(math.isfinite(loss) for loss in losses)


def test_engine_contender_measures_and_trains() -> None:
    contender = contenders.EngineContender("fc_unet", compile=False, **TINY_FC)
    assert contender.key == "engine-fc"
    speed = contender.images_per_second(random_data(), tiny_settings())
    assert math.isfinite(speed) and speed > 0
    trained = contender.train_for(0.001, random_data(), tiny_settings())
    assert trained.steps == 1  # on a CPU the clock is read after every step
    x_t = torch.randn(3, 1, 28, 28)
    eps = trained.noise_predictor(x_t, torch.tensor([0, 10, 999]))
    assert eps.shape == x_t.shape and torch.isfinite(eps).all()


@pytest.fixture
def train_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of every call the contenders make to ``train``."""
    calls: list[dict] = []
    real_train = contenders.train

    def recording_train(*args: object, **options: object):
        calls.append(options)
        return real_train(*args, **options)

    monkeypatch.setattr(contenders, "train", recording_train)
    return calls


@pytest.mark.parametrize(("compile", "key"), [(False, "engine-fc"), ("auto", "engine-fc-auto")])
def test_engine_trains_for_its_budget_in_one_time_limited_call(
    compile, key, train_calls: list[dict]
) -> None:
    contender = contenders.EngineContender("fc_unet", compile=compile, **TINY_FC)
    trained = contender.train_for(0.3, random_data(), tiny_settings())
    [options] = train_calls
    assert contender.key == key and options["compile"] == compile
    assert options["time_limit"] == 0.3 and options["steps"] == contenders.UNBOUNDED_STEPS
    # Everything counts: the seconds are those of the whole call, which ran past the limit.
    assert 0.3 <= trained.seconds < 10.0 and 1 <= trained.steps < contenders.UNBOUNDED_STEPS


def test_engine_contender_with_the_clean_image_as_target(train_calls: list[dict]) -> None:
    """It trains on the x0 loss and hands the samplers a noise predictor made from the x0 one."""
    contender = contenders.EngineContender("fc_unet", compile="auto", prediction="x0", **TINY_FC)
    assert contender.key == "engine-fc-x0-auto" and contender.label.endswith("predicting x0")
    assert contender.key in contenders.all_contenders(fc_unet=TINY_FC)
    trained = contender.train_for(0.001, random_data(), tiny_settings())
    [options] = train_calls
    assert options["loss"].func is contenders.diffusion_loss
    assert options["loss"].keywords == {"prediction": "x0"}
    x_t, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999])
    with torch.no_grad():
        x0_hat = trained.noise_predictor.model(x_t, t)
        alpha_bar = contender.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        by_hand = (x_t - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()
        torch.testing.assert_close(trained.noise_predictor(x_t, t), by_hand, rtol=1e-4, atol=1e-4)


def test_engine_contender_with_a_recipe_of_its_own(train_calls: list[dict]) -> None:
    """Its batch and learning rate replace the run's shared batch and train()'s default."""
    contender = contenders.EngineContender(
        "fc_unet", compile="auto", prediction="x0", batch_size=16, lr=1e-3, **TINY_FC
    )
    assert contender.key == "engine-fc-x0-b16-auto"
    assert contender.label.endswith("predicting x0, batch 16, lr 0.001")
    assert contender.batch_size(tiny_settings()) == 16
    contender.train_for(0.001, random_data(), tiny_settings())
    [options] = train_calls
    assert options["batch_size"] == 16 and options["lr"] == 1e-3
    plain = contenders.EngineContender("fc_unet", compile="auto", **TINY_FC)
    assert plain.batch_size(tiny_settings()) == 8
    catalogue = contenders.all_contenders(fc_unet=TINY_FC)
    assert "engine-fc-x0-b1024-auto" in catalogue
    best_per_image = catalogue["engine-fc-x0-sinln-b1024-auto"]
    assert "batch 1024, lr 0.001" in best_per_image.label
    assert best_per_image.label.endswith("time_embedding sinusoidal, layer_norm True")
    network = best_per_image.build()
    assert network.time_embedding == "sinusoidal"
    assert any(isinstance(layer, nn.LayerNorm) for layer in network.modules())
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        contenders.EngineContender("fc_unet", compile="auto", batch_size=0)


def test_engine_contender_rejects_an_unknown_target() -> None:
    with pytest.raises(
        ValueError, match="unknown prediction .noise.; choose one of epsilon, x0, v"
    ):
        contenders.EngineContender("fc_unet", compile=False, prediction="noise", **TINY_FC)


def test_compiled_engine_is_skipped_when_compilation_is_off() -> None:
    contender = contenders.EngineContender("fc_unet", compile=True, **TINY_FC)
    with pytest.raises(contenders.ContenderUnavailable, match="skipped"):
        contender.images_per_second(random_data(), tiny_settings(allow_compile=False))


def test_loop_contender_trains_for_a_budget() -> None:
    contender = contenders.PlainLoopContender("fc_unet", **TINY_FC)
    trained = contender.train_for(0.05, random_data(), tiny_settings())
    assert trained.steps >= 1 and trained.seconds >= 0.05
    assert not trained.noise_predictor.training


def test_closest_width_picks_the_nearest_parameter_count() -> None:
    def build(width: int) -> nn.Module:
        return nn.Linear(width, width)  # width^2 + width parameters

    target = 1000
    widths = range(1, 60)
    expected = min(widths, key=lambda w: abs(w * w + w - target))
    assert contenders.closest_width(build, target, widths) == (expected, expected**2 + expected)


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_flop_count_matches_a_hand_count_for_linear(input_requires_grad: bool) -> None:
    batch, n_in, n_out = 4, 5, 3
    layer = nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in, requires_grad=input_requires_grad)
    # Forward and the weight gradient are one (B x in) by (in x out) product each, 2 FLOPs per
    # multiply-add; the input gradient is a third when the input needs one.
    products = 3 if input_requires_grad else 2
    assert benchmark.count_flops(lambda: layer(x).sum()) == products * 2 * batch * n_in * n_out


def test_training_step_flops_of_fc_unet_match_a_hand_count() -> None:
    batch = 4
    model = FCUNet(**TINY_FC)  # layers 785->32, 32->16, 16->32, 32->784
    layers = [(785, 32), (32, 16), (16, 32), (32, 784)]
    forward = sum(2 * batch * n_in * n_out for n_in, n_out in layers)
    # Backward: every weight gradient, and the input gradient of all but the first layer.
    backward = forward + sum(2 * batch * n_in * n_out for n_in, n_out in layers[1:])
    assert benchmark.training_step_flops(model, batch, CPU) == forward + backward


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_lookup(name: str, peak: float | None) -> None:
    assert benchmark.peak_bf16_tflops(name) == peak


def test_missing_libraries_become_not_installed_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("diffusers", "denoising_diffusion_pytorch"):
        monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    missing = [
        contenders.DiffusersContender(10_000, bf16=True),
        contenders.LucidrainsContender(10_000, bf16=False),
    ]
    rows: list[dict] = []
    benchmark.run_train_section(missing, random_data(), tiny_settings(), rows.append)
    assert [row["key"] for row in rows] == [
        "diffusers-bf16",
        "denoising-diffusion-pytorch-fp32",
    ]
    assert all(row["status"].startswith("not installed") for row in rows)
    for row in rows:
        row["run"] = 1
    config = benchmark.parse_args(["--quick", "--device", "cpu"])
    report = benchmark.render_report([_run(config)], rows)
    train_table = report.split("## 1. Training throughput")[1]
    assert train_table.count("not installed (pip install") == 2


def _run(config: benchmark.BenchmarkConfig) -> dict:
    run = benchmark.run_record(config, ["benchmarks/benchmark.py", "--quick", "--device", "cpu"])
    return {**run, "id": 1}


def test_report_starts_with_the_quick_warning_and_names_the_command() -> None:
    config = benchmark.parse_args(["--quick", "--device", "cpu"])
    report = benchmark.render_report([_run(config)], [])
    first_lines = report.splitlines()[:4]
    assert any("Quick functional run, not a measurement" in line for line in first_lines)
    assert "`python benchmarks/benchmark.py --quick --device cpu`" in report
    measured = benchmark.parse_args(["--device", "cpu"])
    assert "Quick functional run" not in benchmark.render_report([_run(measured)], [])


def test_quick_runs_write_to_a_temporary_file_by_default() -> None:
    quick = benchmark.parse_args(["--quick", "--device", "cpu"])
    assert quick.output != benchmark.DEFAULT_OUTPUT
    assert Path(tempfile.gettempdir()) in quick.output.parents
    assert benchmark.parse_args(["--device", "cpu"]).output == benchmark.DEFAULT_OUTPUT


def test_results_merge_and_quick_runs_never_overwrite_measurements(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    measured = benchmark.parse_args(["--device", "cpu", "--output", str(output)])
    first = benchmark.ResultsFile(output, benchmark.run_record(measured, ["x"]), fresh=False)
    first.record({"section": "train", "key": "plain-fc", "status": "measured"})
    first.record({"section": "train", "key": "engine-fc", "status": "measured"})
    second = benchmark.ResultsFile(output, benchmark.run_record(measured, ["y"]), fresh=False)
    second.record({"section": "train", "key": "engine-fc", "status": "not installed"})
    runs_of = {row["key"]: row["run"] for row in second.rows}
    assert runs_of == {"plain-fc": 1, "engine-fc": 2}
    assert "`python y`" in output.read_text() and output.with_suffix(".json").exists()
    quick = benchmark.parse_args(["--quick", "--device", "cpu", "--output", str(output)])
    with pytest.raises(SystemExit, match="will not overwrite"):
        benchmark.ResultsFile(output, benchmark.run_record(quick, ["z"]), fresh=False)
    quick_output = tmp_path / "quick" / "RESULTS.md"
    for command in ("q1", "q2"):
        results = benchmark.ResultsFile(
            quick_output, benchmark.run_record(quick, [command]), fresh=False
        )
        results.record({"section": "train", "key": command, "status": "measured"})
    assert [row["key"] for row in results.rows] == ["q2"]


def _train_row(key: str, model: str, speed: float) -> dict:
    return {"section": "train", "key": key, "model": model, "images_per_second": speed}


def test_targets_report_met_and_missed_with_margins() -> None:
    rows = [
        _train_row("engine-fc-compiled", "FCUNet", 60_000.0),
        _train_row("plain-fc", "FCUNet", 10_000.0),
        _train_row("engine-attention-compiled", "AttentionUNet", 16_000.0),
        _train_row("plain-attention", "AttentionUNet", 4_000.0),
        _train_row("diffusers-bf16", "UNet2DModel", 8_000.0),
        _train_row("denoising-diffusion-pytorch-bf16", "Unet", 20_000.0),
        {"section": "sampling", "key": "ddpm-1000", "images_per_second": 10.0},
        {"section": "sampling", "key": "ddim-50", "images_per_second": 210.0},
    ]
    rows[-2]["frechet_distance"], rows[-1]["frechet_distance"] = 2.0, 2.1
    rows.append(
        {
            "section": "quality",
            "key": "engine-fc-compiled@60",
            "contender_key": "engine-fc-compiled",
            "budget": 60.0,
            "seconds": 59.0,
            "frechet_distance": 12.0,
            "confident_share": 0.9,
            "class_entropy": 0.99,
            "classes_present": 10,
        }
    )
    for row in rows:
        row["status"] = "measured"
    results = {
        target: (status, detail) for target, status, detail in benchmark.evaluate_targets(rows)
    }
    statuses = [status for status, _ in results.values()]
    assert statuses == ["met", "met", "missed", "missed", "met"]
    fc_plain = results["Engine >= 5x the plain loop (FCUNet)"][1]
    assert "6.0x" in fc_plain and "+1.0x" in fc_plain
    attention_plain = results["Engine >= 5x the plain loop (AttentionUNet)"][1]
    assert "4.0x" in attention_plain and "-1.0x" in attention_plain
    libraries = results["Engine ahead of both libraries at equal parameter count"][1]
    assert "2.00x diffusers-bf16" in libraries and "0.80x denoising" in libraries
    assert "+5.0%" in results["DDIM-50 within 10% of DDPM-1000's score at 20x the speed"][1]


def test_targets_without_rows_are_not_measured() -> None:
    assert {status for _, status, _ in benchmark.evaluate_targets([])} == {"not measured"}


def test_score_fields_count_the_classes_present() -> None:
    score = QualityScore(
        frechet_distance=3.5,
        confident_share=0.75,
        class_entropy=0.5,
        class_counts=(4, 0, 0, 3, 0, 0, 0, 0, 0, 1),
        n=8,
        dataset="mnist",
    )
    fields = benchmark.score_fields(score)
    assert fields["classes_present"] == 3
    assert (fields["frechet_distance"], fields["confident_share"]) == (3.5, 0.75)


def test_fc_target_is_missed_when_one_condition_fails() -> None:
    row = {
        "section": "quality",
        "key": "engine-fc@60",
        "contender_key": "engine-fc",
        "status": "measured",
        "budget": 60.0,
        "seconds": 58.0,
        "frechet_distance": 12.0,
        "confident_share": 0.9,
        "class_entropy": 0.99,
        "classes_present": 9,
    }
    status, detail = benchmark.evaluate_targets([row])[0][1:]
    assert status == "missed" and "classes present 9 (>= 10, missed by 1)" in detail
    status, _ = benchmark.evaluate_targets([{**row, "classes_present": 10}])[0][1:]
    assert status == "met"


def test_generate_returns_the_requested_count() -> None:
    model = FCUNet(**TINY_FC)
    sampler = benchmark.SamplerSpec("ddim", 2)
    images, seconds = benchmark.generate(model, sampler, 5, 2, CPU, seed=0)
    assert images.shape == (5, 1, 28, 28) and torch.isfinite(images).all() and seconds > 0
    again, _ = benchmark.generate(model, sampler, 5, 2, CPU, seed=0)
    torch.testing.assert_close(images, again)


def test_sampler_names_parse() -> None:
    assert benchmark.parse_sampler("ddpm") == benchmark.SamplerSpec("ddpm", 1000)
    assert benchmark.parse_sampler("ddim-50").key == "ddim-50"
    assert benchmark.parse_sampler("DPM-10") == benchmark.SamplerSpec("dpm", 10)
    with pytest.raises(Exception, match="choose ddpm"):
        benchmark.parse_sampler("dpm")
    with pytest.raises(Exception, match="choose ddpm"):
        benchmark.parse_sampler("euler-10")


def test_loader_dataset_and_tensor_hold_the_same_images() -> None:
    try:
        data = benchmark.load_training_data(limit=8)
    except DataNotFoundError:
        pytest.skip("MNIST is not in DIFFUSION_LIB_DATA")
    assert data.images.shape == (8, 1, 28, 28) and len(data.loader_dataset) == 8
    image, _ = data.loader_dataset[5]
    torch.testing.assert_close(image, data.images[5], atol=1e-6, rtol=0)


def test_sections_produce_rows_at_tiny_sizes(tmp_path: Path) -> None:
    try:
        load_images("mnist", train=False, limit=4)
    except DataNotFoundError:
        pytest.skip("MNIST is not in DIFFUSION_LIB_DATA")
    arguments = ["--quick", "--device", "cpu", "--samples", "4", "--time-budgets", "0.05"]
    config = benchmark.parse_args([*arguments, "--output", str(tmp_path / "RESULTS.md")])
    config = dataclasses.replace(config, settings=tiny_settings())
    scored: list[int] = []

    def score(images: torch.Tensor) -> dict:
        scored.append(len(images))
        return {"frechet_distance": 1.0, "score_status": "scored"}

    rows: list[dict] = []
    tiny = [
        contenders.EngineContender("fc_unet", compile=False, **TINY_FC),
        contenders.PlainLoopContender("fc_unet", **TINY_FC),
    ]
    benchmark.run_quality_section(tiny, random_data(), config, score, rows.append)
    assert [row["key"] for row in rows] == [
        "reference-real",
        "reference-noise",
        "engine-fc@0.05",
        "plain-fc@0.05",
    ]
    assert all(row["status"] == "measured" for row in rows) and scored == [4, 4, 4, 4]
    trained = contenders.TrainedModel(FCUNet(**TINY_FC).eval(), seconds=1.0, steps=1)
    benchmark.run_sampling_section(trained, random_data(), config, score, rows.append)
    assert [row["key"] for row in rows[4:]] == ["ddpm-10", "ddim-2", "ddim-5", "dpm-2"]
    assert all(row["images_per_second"] > 0 for row in rows[4:])
    report = benchmark.render_report([{**_run(config), "id": 1}], [{**r, "run": 1} for r in rows])
    assert "## 2. Quality at equal GPU time" in report and "## 3. Sampling" in report


def test_an_fc_recipe_trains_samples_and_writes_one_json_line(tmp_path, monkeypatch) -> None:
    try:
        load_images("mnist", train=False, limit=4)
    except DataNotFoundError:
        pytest.skip("MNIST is not in DIFFUSION_LIB_DATA")
    scored: list[torch.Tensor] = []

    def score(images: torch.Tensor) -> QualityScore:
        scored.append(images)
        return QualityScore(12.0, 0.9, 0.95, class_counts=(4,), n=len(images), dataset="mnist")

    monkeypatch.setattr(fc_recipes, "score_samples", score)
    output = tmp_path / "recipes.jsonl"
    arguments = ["--prediction", "x0", "--batch-size", "16", "--lr", "3e-3", "--steps", "2"]
    arguments += ["--samples", "4", "--device", "cpu", "--output", str(output)]
    assert fc_recipes.main(arguments) == 0
    [line] = output.read_text().splitlines()
    row = json.loads(line)
    assert row["prediction"] == "x0" and row["lr"] == 3e-3 and row["images_seen"] == 32
    assert row["frechet_distance"] == 12.0 and math.isfinite(row["last_loss"])
    [samples] = scored
    assert samples.shape == (4, 1, 28, 28) and bool(samples.isfinite().all())
