"""The command line: help, argument errors, and train -> sample -> evaluate end to end in smoke
mode."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from diffusion_lib import (
    cli_sample,
    learned_variance,
    losses,
    masked_diffusion,
    metrics,
    predictions,
    reverse_process,
)
from diffusion_lib.__main__ import CommandError, main
from diffusion_lib.checkpoints import load_checkpoint, save_checkpoint
from diffusion_lib.data import DATA_VARIABLE, data_root, load_images, to_unit_interval
from diffusion_lib.edm import preconditioning
from diffusion_lib.feature_metrics import kernel_distance, manifold_scores
from diffusion_lib.likelihood import ode_bits_per_dim
from diffusion_lib.losses import diffusion_loss, elbo_bits_per_dim, hybrid_loss
from diffusion_lib.masked_diffusion import (
    MaskedDiffusion,
    TokenDenoiser,
    images_from_tokens,
    masked_nll_bound,
    masked_sample,
    tokens_from_images,
)
from diffusion_lib.models import build_model
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import SMOKE_VARIABLE
from diffusion_lib.solvers import ode_timesteps

DATA_FOLDER = data_root()
needs_mnist = pytest.mark.skipif(
    not (DATA_FOLDER / "MNIST" / "raw").is_dir(), reason=f"MNIST not found under {DATA_FOLDER}"
)
TINY_FC_UNET = ["--model", "fc_unet", "--model-arg", "widths=[32,16]"]
TINY_ATTENTION_UNET = [
    "--model", "attention_unet", "--model-arg", "base_channels=8",
    "--model-arg", "channel_multipliers=[1,2]", "--model-arg", "num_res_blocks=1",
]  # fmt: skip
TIMESTEPS = 40
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ, SMOKE_VARIABLE: "1", DATA_VARIABLE: str(DATA_FOLDER), "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "diffusion_lib", *arguments],
        capture_output=True, text=True, env=environment, timeout=120,
    )  # fmt: skip


def train_arguments(output: Path, model: list[str], *extra: str) -> list[str]:
    return [
        "train", *model, "--dataset", "mnist", "--timesteps", str(TIMESTEPS), "--steps", "3",
        "--batch-size", "8", "--output", str(output), "--no-progress", *extra,
    ]  # fmt: skip


def masked_train_arguments(output: Path, model: list[str], *extra: str) -> list[str]:
    """train_arguments for --objective masked, which takes no --timesteps."""
    return [
        "train", *model, "--dataset", "mnist", "--objective", "masked", "--steps", "3",
        "--batch-size", "8", "--output", str(output), "--no-progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "command", [[], ["train"], ["sample"], ["evaluate"], ["distill"], ["restore"]]
)
def test_help_exits_cleanly_and_shows_examples(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "choices"),
    [
        (["--model", "resnet", "--dataset", "mnist"], "attention_unet"),
        (["--model", "fc_unet", "--dataset", "cifar10"], "fashion_mnist"),
        (["--model", "fc_unet", "--dataset", "mnist", "--schedule", "sigmoid"], "cosine"),
    ],
)
def test_unknown_names_list_the_valid_choices(arguments, choices, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *arguments, "--steps", "1", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert choices in capsys.readouterr().err


@needs_mnist
def test_train_then_sample_end_to_end_in_smoke_mode(tmp_path) -> None:
    trained = run_cli(*train_arguments(tmp_path / "run", TINY_FC_UNET))
    assert trained.returncode == 0, trained.stderr
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert checkpoint.is_file()
    assert "trainable parameters" in trained.stdout and str(checkpoint) in trained.stdout
    config = load_checkpoint(checkpoint)["config"]
    assert config["model"] == {
        "name": "fc_unet",
        "kwargs": {"image_size": 28, "channels": 1, "timesteps": TIMESTEPS, "widths": [32, 16]},
    }
    assert config["schedule"] == {"name": "linear", "timesteps": TIMESTEPS}
    assert config["dataset"] == "mnist" and config["value_range"] == [-1.0, 1.0]
    # Sampling runs in-process: one interpreter start-up per test is slow enough on a small CPU.
    grid = tmp_path / "grid.png"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        status = main([
            "sample", "--checkpoint", str(checkpoint), "--sampler", "ddpm", "--steps", "5",
            "--num", "5", "--output", str(grid),
        ])  # fmt: skip
    assert status == 0
    with Image.open(grid) as image:
        # 5 images of 28x28 make 3 columns and 2 rows, each image with a 2-pixel border.
        assert image.size == (3 * 30 + 2, 2 * 30 + 2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Noise checkpoints (unconditional and conditional), a flow one and a conditional hybrid one
    (noise and learned variance), trained in-process in smoke mode."""
    if not (DATA_FOLDER / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {DATA_FOLDER}")
    folder = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        patch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
        assert main(train_arguments(folder / "plain", TINY_FC_UNET)) == 0
        conditional = train_arguments(folder / "labels", TINY_ATTENTION_UNET, "--conditional")
        assert main(conditional) == 0
        assert main(train_arguments(folder / "flow", TINY_FC_UNET, "--objective", "flow")) == 0
        hybrid = ["--objective", "hybrid", "--conditional"]
        assert main(train_arguments(folder / "hybrid", TINY_ATTENTION_UNET, *hybrid)) == 0
        zero_snr = ["--prediction", "x0", "--zero-terminal-snr"]
        assert main(train_arguments(folder / "zero_snr", TINY_FC_UNET, *zero_snr)) == 0
    return {
        "plain": folder / "plain" / "checkpoint.pt",
        "labels": folder / "labels" / "checkpoint.pt",
        "flow": folder / "flow" / "checkpoint.pt",
        "hybrid": folder / "hybrid" / "checkpoint.pt",
        "zero_snr": folder / "zero_snr" / "checkpoint.pt",
    }


@pytest.mark.parametrize(
    ("which", "arguments", "message"),
    [
        ("plain", ["--label", "1"], "needs a conditional checkpoint"),
        ("plain", ["--steps", str(TIMESTEPS + 1)], f"1..{TIMESTEPS}"),
        ("plain", ["--steps", "0"], f"1..{TIMESTEPS}"),
        ("plain", ["--guidance", "2"], "--guidance needs --label"),
        ("plain", ["--sampler", "ddpm", "--eta", "0.5"], "ddim only"),
        ("plain", ["--eta", "inf"], r"--eta must lie in \[0, 1\]"),
        ("plain", ["--eta", "nan"], r"--eta must lie in \[0, 1\]"),
        ("plain", ["--eta", "-1"], r"--eta must lie in \[0, 1\]"),
        ("plain", ["--eta", "1.5"], r"--eta must lie in \[0, 1\]"),
        ("labels", ["--label", "10"], r"0 \(0\), 1 \(1\)"),
        ("labels", ["--label", "-1"], "--label must be one of"),
        ("labels", ["--label", "2", "--guidance", "-1"], "guidance must be >= 0"),
        (
            "plain",
            ["--sampler", "euler"],
            "trained with --objective noise; choose ddpm, ddim, dpm-solver or heun",
        ),
        ("flow", ["--sampler", "ddim"], "trained with --objective flow; choose euler or heun"),
        ("flow", ["--steps", "0"], "--steps must be >= 1"),
        (
            "hybrid",
            ["--sampler", "euler"],
            "trained with --objective hybrid; choose ddpm, ddim, dpm-solver or heun",
        ),
        ("hybrid", ["--steps", str(TIMESTEPS + 1)], f"1..{TIMESTEPS}"),
        ("zero_snr", ["--spacing", "leading"], "never visits T - 1"),
        (
            "plain",
            ["--sampler", "ddpm", "--spacing", "trailing"],
            "--spacing applies to --sampler ddim",
        ),
    ],
)
def test_sampling_errors_are_clear(
    checkpoints, which, arguments, message, tmp_path, capsys
) -> None:
    output = tmp_path / "never.png"
    status = main(
        ["sample", "--checkpoint", str(checkpoints[which]), "--output", str(output), *arguments]
    )
    assert status == 1
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()


def test_missing_checkpoint_is_reported(tmp_path, capsys) -> None:
    status = main(
        [
            "sample",
            "--checkpoint",
            str(tmp_path / "nothing.pt"),
            "--output",
            str(tmp_path / "x.png"),
        ]
    )
    assert status == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_conditional_needs_a_model_that_takes_labels(tmp_path, capsys) -> None:
    status = main(train_arguments(tmp_path, TINY_FC_UNET, "--conditional"))
    assert status == 1
    assert "attention_unet" in capsys.readouterr().err


def test_guided_sampling_of_a_class_writes_the_grid(checkpoints, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    output = tmp_path / "sevens.png"
    status = main([
        "sample", "--checkpoint", str(checkpoints["labels"]), "--label", "7",
        "--guidance", "2", "--steps", "4", "--num", "4", "--eta", "1", "--output", str(output),
    ])  # fmt: skip
    assert status == 0
    with Image.open(output) as image:
        assert image.size == (2 * 30 + 2, 2 * 30 + 2)


def record_network_times(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The list that will hold the time argument of every FCUNet call from now on."""
    seen: list[torch.Tensor] = []
    original = torch.nn.Module.__call__

    def counting(module, *args, **kwargs):
        if type(module).__name__ == "FCUNet":
            seen.append(args[1])
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", counting)
    return seen


@pytest.mark.parametrize(("sampler", "calls"), [(None, 4), ("heun", 8)])
def test_a_flow_checkpoint_samples_with_an_ode_solver(
    checkpoints, sampler, calls, tmp_path, monkeypatch, capsys
) -> None:
    """--objective flow trains a velocity model; sample picks Euler for it unless told Heun, and
    calls the network once per Euler step and twice per Heun step."""
    config = load_checkpoint(checkpoints["flow"])["config"]
    assert config["objective"] == "flow"
    assert load_checkpoint(checkpoints["plain"])["config"]["objective"] == "noise"
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    seen = record_network_times(monkeypatch)
    output = tmp_path / "flow.png"
    options = [] if sampler is None else ["--sampler", sampler]
    status = main([
        "sample", "--checkpoint", str(checkpoints["flow"]), "--steps", "4", "--num", "4",
        "--output", str(output), *options,
    ])  # fmt: skip
    assert status == 0 and output.is_file()
    assert f"({sampler or 'euler'}, 4 steps)" in capsys.readouterr().out
    assert len(seen) == calls
    assert all(t.dtype.is_floating_point for t in seen)
    assert float(seen[0][0]) == TIMESTEPS  # t = 1 is the model's time T


@pytest.mark.parametrize(("sampler", "calls"), [("dpm-solver", 4), ("heun", 7)])
def test_a_noise_checkpoint_samples_with_a_higher_order_solver(
    checkpoints, sampler, calls, tmp_path, monkeypatch, capsys
) -> None:
    """--sampler dpm-solver calls the network once per step, heun twice but for the last step."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    seen = record_network_times(monkeypatch)
    output = tmp_path / f"{sampler}.png"
    status = main([
        "sample", "--checkpoint", str(checkpoints["plain"]), "--sampler", sampler,
        "--steps", "4", "--num", "4", "--output", str(output),
    ])  # fmt: skip
    assert status == 0 and output.is_file()
    assert f"({sampler}, 4 steps)" in capsys.readouterr().out
    assert len(seen) == calls
    assert int(seen[0][0]) == TIMESTEPS - 1  # the solvers start at the last timestep


def test_distill_halves_the_steps_round_by_round_and_sample_follows(
    checkpoints, tmp_path, monkeypatch, capsys
) -> None:
    """distill trains a student from a flow checkpoint; its checkpoint remembers N, sample uses
    N steps by default, and the next round must halve N again."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))

    def distill(teacher: Path, student_steps: int, output: Path) -> int:
        return main([
            "distill", "--checkpoint", str(teacher), "--student-steps", str(student_steps),
            "--steps", "2", "--batch-size", "4", "--output", str(output), "--no-progress",
        ])  # fmt: skip

    assert distill(checkpoints["flow"], 2, tmp_path / "two") == 0
    assert distill(tmp_path / "two" / "checkpoint.pt", 1, tmp_path / "one") == 0
    assert "the student samples in 1 steps" in capsys.readouterr().out
    student = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert student["config"]["distilled_steps"] == 2
    assert student["config"]["model"] == load_checkpoint(checkpoints["flow"])["config"]["model"]

    seen = record_network_times(monkeypatch)
    status = main([
        "sample", "--checkpoint", str(tmp_path / "two"), "--num", "4",
        "--output", str(tmp_path / "two.png"),
    ])  # fmt: skip
    assert status == 0 and "(euler, 2 steps)" in capsys.readouterr().out
    assert [float(t[0]) for t in seen] == [TIMESTEPS, TIMESTEPS / 2]

    assert distill(tmp_path / "two" / "checkpoint.pt", 2, tmp_path / "never") == 1
    assert "choose --student-steps 1" in capsys.readouterr().err
    assert distill(tmp_path / "one" / "checkpoint.pt", 1, tmp_path / "never") == 1
    assert "cannot be halved" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("which", "student_steps", "message"),
    [("plain", 2, "--objective flow"), ("flow", 0, "--student-steps must be >= 1")],
)
def test_distill_errors_are_clear(checkpoints, which, student_steps, message, tmp_path, capsys):
    status = main([
        "distill", "--checkpoint", str(checkpoints[which]), "--student-steps", str(student_steps),
        "--steps", "2", "--output", str(tmp_path / "never"),
    ])  # fmt: skip
    assert status == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@needs_mnist
def test_train_seed_fixes_the_initial_weights_too(tmp_path) -> None:
    """Two runs with the same --seed end with the same weights, whatever the random state of
    the process before; another seed starts elsewhere. The zero-initialised output layer makes
    the first loss independent of the other weights, so the weights are compared, not it."""

    def final_weights(name: str, seed: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(len(name))  # a different random state before each run
        arguments = train_arguments(tmp_path / name, TINY_FC_UNET, "--seed", seed)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(SMOKE_VARIABLE, "1")
            patch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
            assert main(arguments) == 0
        return load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]

    first, again, other = final_weights("a", "7"), final_weights("bb", "7"), final_weights("c", "8")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_train_help_explains_the_prediction_targets_and_min_snr(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "--prediction {epsilon,x0,v}" in text and "--snr-gamma G" in text
    for phrase in ("epsilon, the noise", "x0, the clean image", "v, the velocity"):
        assert phrase in text
    assert "Min-SNR-gamma weighting (Hang et al. 2023)" in text and "5 is typical" in text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--prediction", "v", "--objective", "flow"], "apply to --objective noise only"),
        (["--snr-gamma", "5", "--objective", "flow"], "apply to --objective noise only"),
        (["--snr-gamma", "0"], "--snr-gamma must be a number > 0"),
        (["--snr-gamma", "-1", "--prediction", "x0"], "--snr-gamma must be a number > 0"),
        (["--snr-gamma", "nan"], "--snr-gamma must be a number > 0"),
    ],
)
def test_prediction_and_snr_gamma_errors_are_clear(arguments, message, tmp_path, capsys) -> None:
    status = main(train_arguments(tmp_path / "never", TINY_FC_UNET, *arguments))
    assert status == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--objective", "flow", "--schedule", "cosine"],
         "--schedule applies to --objective noise or hybrid only; --objective flow"),
        (["--objective", "edm", "--timesteps", "1000", "--schedule", "cosine"],
         "--schedule applies to --objective noise or hybrid only"),
        (["--sigma-data", "0.3"], "--sigma-data applies to --objective edm only"),
        (["--objective", "flow", "--sigma-data", "0.3"], "--sigma-data applies to --objective edm"),
        (["--label-dropout", "0.5"], "--label-dropout applies to --conditional only"),
        (["--label-dropout", "2"], "--label-dropout applies to --conditional only"),
        (["--conditional", "--label-dropout", "2"], "--label-dropout must lie in [0, 1)"),
        (["--conditional", "--label-dropout", "-0.1"], "--label-dropout must lie in [0, 1)"),
        (["--model-arg", "timesteps=50"],
         "--model-arg timesteps=50 conflicts with --timesteps (T = 40); use --timesteps"),
        (["--model-arg", "image_size=32"], "--model-arg image_size=32 conflicts with the dataset"),
        (["--model-arg", "channels=3"], "--model-arg channels=3 conflicts with the dataset"),
        (["--model-arg", "num_classes=10"], "--model-arg num_classes=10 makes a class-conditional"),
    ],
)  # fmt: skip
def test_options_that_do_not_apply_or_conflict_are_refused(
    arguments, message, tmp_path, capsys
) -> None:
    status = main(train_arguments(tmp_path / "never", TINY_FC_UNET, *arguments))
    assert status == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_model_arg_that_conflicts_with_conditional_is_refused(tmp_path, capsys) -> None:
    arguments = ["--conditional", "--model-arg", "num_classes=5"]
    assert main(train_arguments(tmp_path / "never", TINY_ATTENTION_UNET, *arguments)) == 1
    assert "conflicts with --conditional, which gives the model the 10 classes of mnist" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("name", ["checkpoint.pt", "notes.txt"])
def test_train_output_must_be_a_folder(name, tmp_path, capsys) -> None:
    """sample --checkpoint takes the file; train --output the folder that holds it."""
    (tmp_path / name).write_text("kept")
    assert main(train_arguments(tmp_path / name, TINY_FC_UNET)) == 1
    error = capsys.readouterr().err
    assert (
        f"--output {tmp_path / name} is a file; pass the folder that holds checkpoint.pt" in error
    )
    assert (f"e.g. {tmp_path}" in error) == (name == "checkpoint.pt")
    assert (tmp_path / name).read_text() == "kept"
    assert main(train_arguments(tmp_path / name / "run", TINY_FC_UNET)) == 1
    assert f"{tmp_path / name} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--output", "{tmp}"],
         "--output must name an image file such as samples.png; got {tmp} (a folder)"),
        (["--output", "{tmp}/out"],
         "--output must name an image file such as samples.png; got {tmp}/out (no extension"),
        (["--output", "{tmp}/out.txt"], ".txt is not an image format"),
        (["--output", "{tmp}/file/x.png"],
         "--output {tmp}/file/x.png cannot be written: {tmp}/file is a file"),
        (["--nearest", "{tmp}/n.txt"], "--nearest must name an image file such as nearest.png"),
        (["--nearest", "{tmp}"],
         "--nearest must name an image file such as nearest.png; got {tmp} (a folder)"),
        (["--nearest", "samples.png"], "--nearest and --output both name samples.png"),
    ],
)  # fmt: skip
def test_sample_checks_its_outputs_before_sampling(arguments, message, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    # No checkpoint exists: the outputs are checked before it is read, let alone sampled.
    status = main(["sample", "--checkpoint", str(tmp_path / "absent.pt"), *arguments])
    assert status == 1
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("{tmp}", "--json must name a file such as scores.json; got {tmp} (a folder)"),
        ("{tmp}/file/x.json", "--json {tmp}/file/x.json cannot be written: {tmp}/file is a file"),
    ],
)
def test_evaluate_checks_its_json_path_before_evaluating(path, message, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    path = path.format(tmp=tmp_path)
    status = main(["evaluate", "--checkpoint", str(tmp_path / "absent.pt"), "--json", path])
    assert status == 1
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "status", "line"),
    [
        (PermissionError(13, "Permission denied", "runs/x.png"), 1,
         "error: Permission denied: runs/x.png\n"),
        (OSError(28, "No space left on device"), 1,
         "error: [Errno 28] No space left on device\n"),
        (KeyboardInterrupt("training interrupted after step 6, saved to runs/x"), 130,
         "training interrupted after step 6, saved to runs/x\n"),
        (KeyboardInterrupt(), 130, "interrupted\n"),
    ],
)  # fmt: skip
def test_file_errors_and_ctrl_c_end_in_one_line(error, status, line, monkeypatch, capsys) -> None:
    def fail(args) -> None:
        raise error

    monkeypatch.setitem(main.__globals__["COMMANDS"], "sample", fail)
    assert main(["sample", "--checkpoint", "runs/x/checkpoint.pt"]) == status
    assert capsys.readouterr().err == line


def arguments_given_to_train(
    tmp_path, monkeypatch, *arguments: str, model: list[str] = TINY_FC_UNET
) -> dict:
    """The keyword arguments that ``train`` receives from the train command (smoke mode)."""
    calls: list[dict] = []

    def stop(*_, **kwargs):
        calls.append(kwargs)
        raise CommandError("stopped before training")

    monkeypatch.setattr("diffusion_lib.cli_train.train", stop)
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    assert main(train_arguments(tmp_path, model, *arguments)) == 1
    [kwargs] = calls
    return kwargs


@needs_mnist
@pytest.mark.parametrize(
    ("arguments", "loss"),
    [([], None), (["--snr-gamma", "5"], {"prediction": "epsilon", "snr_gamma": 5.0})],
)
def test_only_a_non_default_objective_replaces_the_engines_loss(
    arguments, loss, tmp_path, monkeypatch
) -> None:
    """The default run passes loss=None and writes the config it always wrote; --snr-gamma alone
    weighs the noise loss and records both keys."""
    kwargs = arguments_given_to_train(tmp_path, monkeypatch, *arguments)
    config = kwargs["config"]
    if loss is None:
        assert kwargs["loss"] is None
        assert "prediction" not in config and "snr_gamma" not in config
    else:
        assert kwargs["loss"].func is diffusion_loss and kwargs["loss"].keywords == loss
        assert {key: config[key] for key in loss} == loss


@needs_mnist
@pytest.mark.parametrize(
    ("arguments", "label_dropout"),
    [
        (["--conditional"], 0.1),
        (["--conditional", "--label-dropout", "0.25"], 0.25),
        (["--conditional", "--label-dropout", "0"], 0.0),
        ([], 0.0),
    ],
)
def test_label_dropout_reaches_the_engine_for_a_conditional_model(
    arguments, label_dropout, tmp_path, monkeypatch
) -> None:
    agreeing = ["--model-arg", "timesteps=40", "--model-arg", "image_size=28"]
    kwargs = arguments_given_to_train(
        tmp_path, monkeypatch, *agreeing, *arguments, model=TINY_ATTENTION_UNET
    )
    assert kwargs["label_dropout"] == label_dropout


@needs_mnist
@pytest.mark.parametrize(
    ("arguments", "compile"),
    [([], "auto"), (["--compile"], True), (["--compile", "off"], False), (["--compile=on"], True)],
)
def test_compile_is_auto_unless_switched_on_or_off(
    arguments, compile, tmp_path, monkeypatch
) -> None:
    assert arguments_given_to_train(tmp_path, monkeypatch, *arguments)["compile"] == compile


@needs_mnist
def test_a_time_limit_reaches_the_engine_and_a_stop_says_how_to_go_on(
    tmp_path, monkeypatch, capsys
) -> None:
    assert arguments_given_to_train(tmp_path, monkeypatch)["time_limit"] is None
    limited = arguments_given_to_train(tmp_path, monkeypatch, "--time-limit", "90")
    assert limited["time_limit"] == 90.0
    monkeypatch.undo()
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    arguments = train_arguments(tmp_path / "run", TINY_FC_UNET, "--time-limit", "1e-9")
    assert main(arguments) == 0
    output = capsys.readouterr().out
    assert "trained 1 step in" in output and "stopped at the time limit" in output
    assert main(arguments[:-2]) == 0  # the same run without a limit finishes its 3 steps
    output = capsys.readouterr().out
    assert "resumed at step 1, trained 2 steps in" in output and "(now at step 3)" in output
    assert "time limit" not in output
    assert main(arguments) == 0  # finished: a limit changes nothing, and it says so
    output = capsys.readouterr().out
    assert "nothing to do:" in output and "already at step 3" in output
    assert "time limit" not in output


def record_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[tuple]:
    """The list that will hold the positional arguments of every call of ``module.name`` from now
    on; the module's own functions find the spy, since they look the name up at each call."""
    calls: list[tuple] = []
    original = getattr(module, name)

    def recording(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(module, name, recording)
    return calls


def record_conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The list that will hold the target of every NoiseFromPrediction that a sampler asks for
    its noise and x0 estimates from now on."""
    conversions: list[str] = []
    convert = predictions.NoiseFromPrediction.noise_and_x0

    def spying(self, *args, **kwargs):
        conversions.append(self.prediction)
        return convert(self, *args, **kwargs)

    monkeypatch.setattr(predictions.NoiseFromPrediction, "noise_and_x0", spying)
    return conversions


@needs_mnist
@pytest.mark.parametrize(
    ("model", "training", "sampling", "recorded"),
    [
        (TINY_FC_UNET, ["--prediction", "v", "--snr-gamma", "5"], [], ("v", 5.0)),
        (
            TINY_ATTENTION_UNET,
            ["--prediction", "x0", "--conditional"],
            ["--sampler", "dpm-solver", "--label", "3", "--guidance", "2"],
            ("x0", None),
        ),
    ],
)
def test_an_x0_or_v_checkpoint_trains_and_samples_through_the_noise_it_implies(
    model, training, sampling, recorded, tmp_path, monkeypatch
) -> None:
    """train fits the chosen target (spied in the loss) and records it; sample wraps the network
    in NoiseFromPrediction, which every noise sampler and guidance (null_label) go through."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    targets = record_calls(monkeypatch, losses, "prediction_target")
    weights = record_calls(monkeypatch, losses, "_min_snr_weight")
    assert main(train_arguments(tmp_path / "run", model, *training)) == 0
    prediction, snr_gamma = recorded
    assert targets and {call[-1] for call in targets} == {prediction}
    assert {call[-2:] for call in weights} == (set() if snr_gamma is None else {recorded})
    config = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]
    assert (config["prediction"], config["snr_gamma"]) == recorded

    conversions = record_conversions(monkeypatch)
    output = tmp_path / "grid.png"
    status = main([
        "sample", "--checkpoint", str(tmp_path / "run"), "--steps", "3", "--num", "4",
        "--output", str(output), *sampling,
    ])  # fmt: skip
    assert status == 0
    with Image.open(output) as image:
        assert image.size == (2 * 30 + 2, 2 * 30 + 2)
    # Guidance evaluates the labelled and the unlabelled halves in one call per step.
    assert conversions == [prediction] * 3


def test_an_old_config_without_prediction_samples_the_noise_directly(
    checkpoints, tmp_path, monkeypatch
) -> None:
    """Checkpoints written before --prediction existed have no such key and predict the noise."""
    state = load_checkpoint(checkpoints["plain"])
    state["config"].pop("prediction", None)
    state["config"].pop("snr_gamma", None)
    old = save_checkpoint(tmp_path / "old" / "checkpoint.pt", state)
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    conversions = record_conversions(monkeypatch)
    output = tmp_path / "old.png"
    status = main([
        "sample", "--checkpoint", str(old), "--steps", "3", "--num", "4", "--output", str(output),
    ])  # fmt: skip
    assert status == 0 and output.is_file()
    assert conversions == []


@needs_mnist
@pytest.mark.parametrize(("sampler", "calls"), [(None, 5), ("euler", 3)])
def test_an_edm_checkpoint_holds_a_preconditioned_denoiser_sampled_on_its_levels(
    sampler, calls, tmp_path, monkeypatch, capsys
) -> None:
    """--objective edm trains F inside EDM's preconditioning; sample rebuilds the wrapper, picks
    Heun (2N - 1 calls) unless told Euler (N), and starts F at the c_noise of sigma_max = 80."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    edm = ["--objective", "edm", "--timesteps", "1000", "--sigma-data", "0.6"]
    assert main(train_arguments(tmp_path / "edm", TINY_FC_UNET, *edm)) == 0
    checkpoint = tmp_path / "edm" / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    assert state["config"]["objective"] == "edm" and state["config"]["sigma_data"] == 0.6
    assert state["ema"] and all(key.startswith("network.") for key in state["ema"])
    seen = record_network_times(monkeypatch)
    options = [] if sampler is None else ["--sampler", sampler]
    status = main([
        "sample", "--checkpoint", str(checkpoint), "--steps", "3", "--num", "4",
        "--output", str(tmp_path / "edm.png"), *options,
    ])  # fmt: skip
    assert status == 0 and (tmp_path / "edm.png").is_file()
    assert f"({sampler or 'heun'}, 3 steps)" in capsys.readouterr().out
    assert len(seen) == calls
    first = preconditioning(torch.tensor([80.0]), sigma_data=0.6).c_noise
    torch.testing.assert_close(seen[0].float(), first.float().expand(4))


@needs_mnist
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--timesteps", "40"], "leave --timesteps at 1000"),
        (["--timesteps", "1000", "--prediction", "v"], "apply to --objective noise only"),
        (["--timesteps", "1000", "--sigma-data", "0"], "sigma_data"),
    ],
)
def test_edm_training_errors_are_clear(arguments, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    command = train_arguments(tmp_path / "never", TINY_FC_UNET, "--objective", "edm", *arguments)
    assert main(command) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@needs_mnist
def test_a_diffusion_transformer_trains_and_samples_from_the_command_line(
    tmp_path, monkeypatch, capsys
) -> None:
    """--model dit comes from the model registry; a conditional one draws a guided class."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    tiny_dit = ["--model", "dit", "--model-arg", "hidden_size=16", "--model-arg", "depth=1",
                "--model-arg", "num_heads=2"]  # fmt: skip
    assert main(train_arguments(tmp_path / "dit", tiny_dit, "--conditional")) == 0
    checkpoint = tmp_path / "dit" / "checkpoint.pt"
    assert load_checkpoint(checkpoint)["config"]["model"]["name"] == "dit"
    status = main([
        "sample", "--checkpoint", str(checkpoint), "--steps", "3", "--num", "4",
        "--label", "7", "--guidance", "2", "--output", str(tmp_path / "dit.png"),
    ])  # fmt: skip
    assert status == 0 and (tmp_path / "dit.png").is_file()
    assert "saved 4 samples (ddim, 3 steps)" in capsys.readouterr().out


@needs_mnist
def test_a_hybrid_run_trains_2c_output_channels_with_l_hybrid(tmp_path, monkeypatch) -> None:
    """--objective hybrid gives the network a variance channel per image channel, hands the
    engine hybrid_loss on the chosen schedule, and records the objective but no prediction."""
    kwargs = arguments_given_to_train(tmp_path, monkeypatch, "--objective", "hybrid")
    assert kwargs["loss"] is hybrid_loss
    config = kwargs["config"]
    assert config["objective"] == "hybrid"
    assert config["model"]["kwargs"]["out_channels"] == 2
    assert "prediction" not in config and "snr_gamma" not in config
    assert config["vlb_weight"] == 0.001


def test_vlb_weight_sets_lambda_of_l_hybrid(tmp_path, monkeypatch) -> None:
    kwargs = arguments_given_to_train(tmp_path, monkeypatch, "--objective", "hybrid",
                                      "--vlb-weight", "0.01")  # fmt: skip
    assert kwargs["loss"].func is hybrid_loss and kwargs["loss"].keywords == {"vlb_weight": 0.01}
    assert kwargs["config"]["vlb_weight"] == 0.01


def test_a_hybrid_checkpoint_rebuilds_its_variance_channels(checkpoints) -> None:
    state = load_checkpoint(checkpoints["hybrid"])
    assert state["config"]["objective"] == "hybrid"
    assert state["config"]["model"]["kwargs"]["out_channels"] == 2
    assert state["ema"]["output.2.weight"].shape[0] == 2  # the last convolution: eps, then v


@pytest.mark.parametrize(
    ("sampler", "guidance"),
    [(None, []), ("ddpm", ["--guidance", "2"]), ("ddim", ["--guidance", "2"])],
)
def test_a_hybrid_checkpoint_samples_ddpm_with_its_learned_variance_and_ddim_with_its_noise(
    checkpoints, sampler, guidance, tmp_path, monkeypatch, capsys
) -> None:
    """ddpm, the default, sets every step's variance from the network's v channels; ddim reads
    the noise channels alone through NoiseOnly, with guidance as for a noise model."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    variances = record_calls(monkeypatch, reverse_process, "learned_log_variance")
    noise_only = record_calls(monkeypatch, learned_variance, "split_eps_and_v")
    output = tmp_path / "hybrid.png"
    options = [] if sampler is None else ["--sampler", sampler]
    status = main([
        "sample", "--checkpoint", str(checkpoints["hybrid"]), "--steps", "4", "--num", "4",
        "--label", "3", "--output", str(output), *options, *guidance,
    ])  # fmt: skip
    assert status == 0
    with Image.open(output) as image:
        assert image.size == (2 * 30 + 2, 2 * 30 + 2)
    if sampler == "ddim":
        assert "(ddim, 4 steps)" in capsys.readouterr().out
        assert variances == [] and len(noise_only) == 4
        assert all(call[0].shape[1] == 2 for call in noise_only)
    else:
        assert "(ddpm, learned variance, 4 steps)" in capsys.readouterr().out
        assert len(variances) == 4 and noise_only == []


@needs_mnist
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--objective", "hybrid", "--prediction", "v"], "apply to --objective noise only"),
        (["--objective", "hybrid", "--model-arg", "out_channels=1"], "needs out_channels=2"),
        (["--model-arg", "out_channels=2"], "--objective hybrid trains 2C"),
        (["--objective", "hybrid", "--vlb-weight", "-1"], "--vlb-weight must be a number >= 0"),
        (["--vlb-weight", "0.01"], "--vlb-weight applies to --objective hybrid only"),
    ],
)
def test_hybrid_training_errors_are_clear(
    arguments, message, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    assert main(train_arguments(tmp_path / "never", TINY_FC_UNET, *arguments)) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def evaluate(checkpoint: Path, *arguments: str) -> int:
    """``evaluate`` in-process, in smoke mode, on tiny numbers unless ``arguments`` say otherwise."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        patch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
        return main(["evaluate", "--checkpoint", str(checkpoint), "--steps", "3", *arguments])


def test_evaluate_scores_samples_beside_as_many_real_test_images(
    checkpoints, classifier_cache, tmp_path, capsys
) -> None:
    """The table has a row for the samples and one for the first N test images; the JSON holds
    the same numbers, and the reference row is score_samples of those test images."""
    path = tmp_path / "scores" / "plain.json"
    assert evaluate(checkpoints["plain"], "--num", "6", "--seed", "3", "--json", str(path)) == 0
    output = capsys.readouterr().out
    assert "6 samples of mnist (ddim, 3 steps, seed 3)" in output
    assert re.search(r"^samples +6 ", output, re.MULTILINE)
    assert re.search(r"^real test images +6 ", output, re.MULTILINE)
    assert "variational bound" not in output and f"scores written to {path}" in output
    assert list(path.parent.iterdir()) == [path]  # the temporary file was renamed
    record = json.loads(path.read_text())
    assert record.keys() >= {"checkpoint", "sampler", "steps", "seed", "classifier_version"}
    assert [record[key] for key in ("sampler", "steps", "seed", "bound")] == ["ddim", 3, 3, None]
    for row in ("samples", "real_test_images"):
        scores = record[row]
        assert scores["n"] == 6 and sum(scores["class_counts"]) == 6
        for key in ("frechet_distance", "confident_share", "class_entropy"):
            assert math.isfinite(scores[key]) and scores[key] >= 0
    real_images, _ = load_images("mnist", train=False, limit=6)
    reference = metrics.score_samples(real_images, classifier=metrics.get_classifier("mnist"))
    assert record["real_test_images"]["frechet_distance"] == pytest.approx(
        reference.frechet_distance
    )
    assert record["real_test_images"]["class_counts"] == list(reference.class_counts)


def test_evaluate_compares_both_rows_with_as_many_training_images(
    checkpoints, classifier_cache, tmp_path, capsys
) -> None:
    """The set scores of the real test row are kernel_distance and manifold_scores of the first
    N test images' features against the first N training images'; the samples get the same."""
    path = tmp_path / "plain.json"
    assert evaluate(checkpoints["plain"], "--num", "8", "--seed", "2", "--json", str(path)) == 0
    output = capsys.readouterr().out
    assert (
        "each row against the first 8 training images; ball radii to the k-th nearest neighbour, k = 5"
        in output
    )
    assert re.search(r"^samples +-?\d+\.\d+ ± \d+\.\d+ +[01]\.\d{3} ", output, re.MULTILINE)
    record = json.loads(path.read_text())
    assert record["set_score_reference"] == "the first 8 training images"
    classifier = metrics.get_classifier("mnist")
    train_features, _ = classifier.embed(load_images("mnist", limit=8)[0])
    test_features, _ = classifier.embed(load_images("mnist", train=False, limit=8)[0])
    kernel = kernel_distance(
        test_features, train_features, num_subsets=4, generator=torch.Generator().manual_seed(2)
    )
    manifold = manifold_scores(train_features, test_features, k=5)
    real = record["real_test_images"]
    assert real["kernel_distance"] == pytest.approx(kernel.mean)
    assert real["kernel_distance_standard_error"] == pytest.approx(kernel.standard_error)
    for key in ("precision", "recall", "density", "coverage"):
        assert real[key] == pytest.approx(getattr(manifold, key))
        assert 0 <= record["samples"][key] <= (5 if key == "density" else 1)
    assert math.isfinite(record["samples"]["kernel_distance"]) and record["samples"]["k"] == 5


def test_evaluate_set_scores_work_down_to_two_samples(
    checkpoints, classifier_cache, capsys
) -> None:
    """With N = 2 the balls reach the only other point and one subset has no standard error."""
    assert evaluate(checkpoints["plain"], "--num", "2") == 0
    output = capsys.readouterr().out
    assert "k-th nearest neighbour, k = 1)" in output
    assert re.search(r"^real test images +-?\d+\.\d{3} +[01]\.\d{3} ", output, re.MULTILINE)


def ratios_by_sorting(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Nearest over second-nearest distance, from every pairwise distance sorted."""
    distances = torch.cdist(queries.flatten(1).double(), references.flatten(1).double())
    nearest = distances.sort(dim=1).values
    return nearest[:, 0] / nearest[:, 1]


def test_evaluate_checks_both_rows_for_copies_of_every_training_image(
    checkpoints, classifier_cache, tmp_path, capsys
) -> None:
    """Without --limit the copy check compares with the whole training set (512 images in smoke
    mode): the real test row's median ratio is that of the first N test images against it."""
    path = tmp_path / "plain.json"
    assert evaluate(checkpoints["plain"], "--num", "8", "--json", str(path)) == 0
    output = capsys.readouterr().out
    record = json.loads(path.read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        training, _ = load_images("mnist")
    ratios = ratios_by_sorting(load_images("mnist", train=False, limit=8)[0], training)
    real = record["real_test_images"]
    assert real["median_nearest_ratio"] == pytest.approx(float(ratios.median()))
    assert real["copied_share"] == pytest.approx(float((ratios < 1 / 3).double().mean()))
    assert record["copy_reference"] == "the 512 images the checkpoint was trained on"
    assert "copies of the 512 training images" in output
    assert re.search(r"samples \d+\.\d% \(median ratio 0\.\d{3}\)", output)
    assert 0 < record["samples"]["median_nearest_ratio"] <= 1


@needs_mnist
def test_evaluate_tells_copies_of_the_limited_training_set_from_blends(
    tmp_path, classifier_cache, monkeypatch, capsys
) -> None:
    """train --limit 12 records the limit, and evaluate compares with those 12 images: samples
    that are 8 of them with faint noise are copies, the 8 midpoints of two of them are not."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    assert main(train_arguments(tmp_path / "few", TINY_FC_UNET, "--limit", "12")) == 0
    checkpoint = tmp_path / "few" / "checkpoint.pt"
    assert load_checkpoint(checkpoint)["config"]["limit"] == 12
    trained_on, _ = load_images("mnist", limit=12)
    noise = 0.01 * torch.randn((8, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    # evaluate clamps samples to [-1, 1], as pictures are saved
    samples = torch.cat(
        [(trained_on[:8] + noise).clamp(-1, 1), (trained_on[:8] + trained_on[1:9]) / 2]
    )
    monkeypatch.setattr(
        "diffusion_lib.cli_evaluate.draw_samples", lambda plan, args: (samples, None)
    )
    path = tmp_path / "few.json"
    assert evaluate(checkpoint, "--num", "16", "--json", str(path)) == 0
    assert "copies of the 12 training images" in capsys.readouterr().out
    record = json.loads(path.read_text())
    assert record["copy_reference"] == "the 12 images the checkpoint was trained on"
    assert record["samples"]["copied_share"] == 0.5
    expected = ratios_by_sorting(samples, trained_on)
    assert record["samples"]["median_nearest_ratio"] == pytest.approx(float(expected.median()))
    assert expected[:8].max() < 0.1 and expected[8:].min() > 0.9


@needs_mnist
def test_evaluate_does_not_check_copies_of_a_single_training_image(
    tmp_path, classifier_cache, monkeypatch, capsys
) -> None:
    """With one training image there is no second nearest: no ratio, and the output says why."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    assert main(train_arguments(tmp_path / "one", TINY_FC_UNET, "--limit", "1")) == 0
    path = tmp_path / "one.json"
    assert evaluate(tmp_path / "one" / "checkpoint.pt", "--num", "4", "--json", str(path)) == 0
    assert "copies: not checked (the checkpoint was trained on fewer than 2 images)" in (
        capsys.readouterr().out
    )
    record = json.loads(path.read_text())
    assert record["copy_reference"] == "the 1 image the checkpoint was trained on"
    for row in ("samples", "real_test_images"):
        assert record[row]["copied_share"] is None and record[row]["median_nearest_ratio"] is None


@needs_mnist
def test_sample_nearest_draws_the_nearest_training_image_of_each_sample(
    tmp_path, monkeypatch, capsys
) -> None:
    """--nearest writes, at each sample's place in the grid, the nearest of the 12 training images
    that train --limit 12 used, and counts the copies: 5 noisy training images, not the 4 blends
    of two (ratio 2/3)."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    assert main(train_arguments(tmp_path / "few", TINY_FC_UNET, "--limit", "12")) == 0
    trained_on, _ = load_images("mnist", limit=12)
    noise = 0.05 * torch.randn((5, 1, 28, 28), generator=torch.Generator().manual_seed(1))
    samples = torch.cat([(trained_on[[7, 2, 9, 2, 0]] + noise).clamp(-1, 1),
                         0.6 * trained_on[3:7] + 0.4 * trained_on[4:8]])  # fmt: skip
    monkeypatch.setattr(cli_sample, "draw_samples", lambda plan, args: (samples, None))
    nearest_path = tmp_path / "grids" / "nearest.png"
    status = main([
        "sample", "--checkpoint", str(tmp_path / "few"), "--num", "9",
        "--output", str(tmp_path / "samples.png"), "--nearest", str(nearest_path),
    ])  # fmt: skip
    assert status == 0
    output = capsys.readouterr().out
    assert f"saved the nearest of the 12 training images to {nearest_path}: 5 of 9 samples" in (
        output
    )
    distances = torch.cdist(samples.flatten(1).double(), trained_on.flatten(1).double())
    expected = trained_on[distances.argmin(dim=1)]
    pixels = (to_unit_interval(expected) * 255 + 0.5).clamp(0, 255).to(torch.uint8)[:, 0]
    torch.testing.assert_close(grid_pictures(nearest_path, 9), pixels, atol=1, rtol=0)
    assert distances.argmin(dim=1).tolist() == [7, 2, 9, 2, 0, 3, 4, 5, 6]


@needs_mnist
def test_sample_nearest_needs_two_training_images(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    assert main(train_arguments(tmp_path / "one", TINY_FC_UNET, "--limit", "1")) == 0
    status = main([
        "sample", "--checkpoint", str(tmp_path / "one"), "--num", "4",
        "--output", str(tmp_path / "samples.png"), "--nearest", str(tmp_path / "nearest.png"),
    ])  # fmt: skip
    assert status == 1
    assert "--nearest needs a checkpoint trained on at least 2 images" in capsys.readouterr().err
    assert not (tmp_path / "samples.png").exists() and not (tmp_path / "nearest.png").exists()


@pytest.mark.parametrize(("which", "variance"), [("hybrid", "learned"), ("plain", "small")])
def test_evaluate_bound_is_the_elbo_of_the_first_test_images(
    checkpoints, classifier_cache, which, variance, tmp_path, capsys
) -> None:
    """--bound-images M reports elbo_bits_per_dim of the first M test images, computed here from
    the checkpoint's EMA weights with the same seed: with the learned variance for a hybrid
    model, which moves the bound away from the one with the posterior variance."""
    path = tmp_path / "bound.json"
    arguments = ["--num", "2", "--bound-images", "2", "--seed", "5", "--json", str(path)]
    assert evaluate(checkpoints[which], *arguments) == 0
    state = load_checkpoint(checkpoints[which])
    config = state["config"]
    network = build_model(config["model"]["name"], **config["model"]["kwargs"])
    network.load_state_dict(state["ema"])
    schedule = NoiseSchedule.from_name(config["schedule"]["name"], TIMESTEPS)
    x0, _ = load_images("mnist", train=False, limit=2)

    def bound(variance: str) -> float:
        generator = torch.Generator().manual_seed(5)
        # The posterior variance needs only the noise channels of a hybrid model.
        hybrid_on_small = config["objective"] == "hybrid" and variance == "small"
        model = learned_variance.NoiseOnly(network) if hybrid_on_small else network
        terms = elbo_bits_per_dim(model, schedule, x0, variance=variance, generator=generator)
        return float(terms.total.mean())

    expected = bound(variance)
    printed = re.search(
        rf"variational bound: ([0-9.]+) bits/dim on 2 test images \({variance} variance\)",
        capsys.readouterr().out,
    )
    assert printed and float(printed.group(1)) == pytest.approx(expected, abs=1e-4)
    record = json.loads(path.read_text())["bound"]
    assert record == {"bits_per_dim": pytest.approx(expected, rel=1e-4), "images": 2,
                      "variance": variance}  # fmt: skip
    if which == "hybrid":
        assert abs(expected - bound("small")) > 1e-2


@pytest.mark.parametrize("which", ["plain", "hybrid"])
def test_evaluate_ode_bound_is_ode_bits_per_dim_of_the_same_test_images(
    checkpoints, classifier_cache, which, tmp_path, capsys
) -> None:
    """--ode-steps N adds ode_bits_per_dim of the --bound-images test images, computed here from
    the EMA weights with the same seed: a hybrid model through its noise channels."""
    path = tmp_path / "ode.json"
    arguments = ["--num", "2", "--bound-images", "2", "--ode-steps", "4", "--seed", "6"]
    assert evaluate(checkpoints[which], *arguments, "--json", str(path)) == 0
    state = load_checkpoint(checkpoints[which])
    config = state["config"]
    network = build_model(config["model"]["name"], **config["model"]["kwargs"])
    network.load_state_dict(state["ema"])
    network.eval()
    model = learned_variance.NoiseOnly(network) if which == "hybrid" else network
    schedule = NoiseSchedule.from_name(config["schedule"]["name"], TIMESTEPS)
    x0, _ = load_images("mnist", train=False, limit=2)
    expected = ode_bits_per_dim(model, schedule, x0, steps=4,
                                generator=torch.Generator().manual_seed(6)).mean().item()  # fmt: skip
    printed = re.search(
        r"probability-flow ODE bound: ([0-9.]+) bits/dim on 2 test images \(4 timesteps",
        capsys.readouterr().out,
    )
    assert printed and float(printed.group(1)) == pytest.approx(expected, abs=1e-4)
    record = json.loads(path.read_text())["bound"]["ode"]
    assert record == {"bits_per_dim": pytest.approx(expected, rel=1e-4), "images": 2, "steps": 4,
                      "divergence": "hutchinson"}  # fmt: skip


def checkpoint_on_zero_one(checkpoints, folder: Path) -> Path:
    """The plain checkpoint, its config saying it was trained on images in [0, 1]."""
    state = load_checkpoint(checkpoints["plain"])
    state["config"]["value_range"] = [0.0, 1.0]
    return save_checkpoint(folder / "zero_one" / "checkpoint.pt", state)


@pytest.mark.parametrize(
    ("which", "arguments", "message"),
    [
        ("flow", ["--bound-images", "2"],
         "--bound-images needs a checkpoint trained with --objective noise, --objective hybrid "
         "or --objective masked"),
        ("zero_one", ["--bound-images", "2"], "trained on images in [-1, 1]"),
        ("plain", ["--num", "0"], "--num must lie in 2..10000"),
        ("plain", ["--num", "1"], "the Fréchet distance fits a covariance"),
        ("plain", ["--bound-images", "-1"], "--bound-images must lie in 0..10000"),
        ("plain", ["--ode-steps", "10"], "it needs --bound-images M > 0"),
        ("plain", ["--bound-images", "2", "--ode-steps", "1"], "--ode-steps must be 0"),
        ("plain", ["--bound-images", "2", "--ode-steps", "41"], "at most the schedule's T = 40"),
        ("zero_snr", ["--bound-images", "2", "--ode-steps", "10"],
         "cannot bound a zero-terminal-SNR checkpoint"),
        ("plain", ["--sampler", "euler"], "choose ddpm, ddim, dpm-solver or heun"),
        ("plain", ["--guidance", "2"], "--guidance needs --label"),
        ("missing", [], "no checkpoint at"),
    ],
)  # fmt: skip
def test_evaluate_errors_are_clear(
    checkpoints, which, arguments, message, tmp_path, capsys
) -> None:
    paths = {
        **checkpoints,
        "zero_one": checkpoint_on_zero_one(checkpoints, tmp_path),
        "missing": tmp_path / "nothing.pt",
    }
    output = tmp_path / "never.json"
    assert evaluate(paths[which], *arguments, "--json", str(output)) == 1
    assert message in capsys.readouterr().err
    assert not output.exists()


@pytest.fixture(scope="module")
def masked_checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Masked checkpoints by K: black and white with a fully connected U-net, and four grey
    levels with an attention U-net, trained in-process in smoke mode."""
    if not (DATA_FOLDER / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {DATA_FOLDER}")
    folder = tmp_path_factory.mktemp("masked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        patch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
        assert main(masked_train_arguments(folder / "two", TINY_FC_UNET)) == 0
        four = masked_train_arguments(folder / "four", TINY_ATTENTION_UNET, "--classes", "4")
        assert main(four) == 0
    return {2: folder / "two" / "checkpoint.pt", 4: folder / "four" / "checkpoint.pt"}


def rebuilt_token_denoiser(checkpoint: Path) -> TokenDenoiser:
    """The EMA weights of a masked checkpoint in a TokenDenoiser built here from its config."""
    state = load_checkpoint(checkpoint)
    config = state["config"]
    network = build_model(config["model"]["name"], **config["model"]["kwargs"])
    model = TokenDenoiser(network, config["classes"])
    model.load_state_dict(state["ema"])
    return model.eval()


def grid_pictures(path: Path, count: int) -> torch.Tensor:
    """The ``count`` pictures (N, 28, 28) uint8 of a grid saved by sample, without its borders."""
    with Image.open(path) as image:
        grid = pil_to_tensor(image.convert("L"))[0]
    columns = math.ceil(math.sqrt(count))
    return torch.stack([
        grid[2 + 30 * (k // columns):][:28, 2 + 30 * (k % columns):][:, :28] for k in range(count)
    ])  # fmt: skip


@needs_mnist
def test_a_masked_run_trains_a_token_denoiser_on_the_order_agnostic_bound(
    tmp_path, monkeypatch
) -> None:
    """--objective masked wraps the network in TokenDenoiser, with K + 1 input channels and K
    output channels, and trains it with masked_diffusion_loss, which bounds the images quantised
    to K levels; the checkpoint records the objective and K, and no noise schedule."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    bounds: list[tuple] = []
    original = masked_diffusion.masked_nll_bound

    def recording(*args, **kwargs):
        bounds.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(masked_diffusion, "masked_nll_bound", recording)
    assert main(masked_train_arguments(tmp_path / "run", TINY_FC_UNET, "--classes", "3")) == 0
    assert len(bounds) == 3
    model, process, x0 = bounds[0]
    assert isinstance(model, TokenDenoiser) and model.num_classes == 3
    assert isinstance(process, MaskedDiffusion) and process.num_classes == 3
    assert x0.dtype == torch.int64 and set(x0.unique().tolist()) <= {0, 1, 2}
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    config = state["config"]
    assert config["objective"] == "masked" and config["classes"] == 3
    assert config["model"]["kwargs"]["channels"] == 4
    assert config["model"]["kwargs"]["out_channels"] == 3
    assert "schedule" not in config and config["value_range"] == [-1.0, 1.0]
    assert all(key.startswith("network.") for key in state["ema"])


@pytest.mark.parametrize(
    ("options", "method"),
    [
        ([], "masked, cosine schedule, random order, 4 steps"),
        (
            ["--sampler", "masked", "--masking-schedule", "linear", "--order", "confidence"],
            "masked, linear schedule, confidence order, 4 steps",
        ),
    ],
)
def test_a_masked_checkpoint_samples_black_and_white_images_by_revealing_pixels(
    masked_checkpoints, options, method, tmp_path, monkeypatch, capsys
) -> None:
    """The grid shows images_from_tokens of masked_sample with the same seed, schedule and order:
    black and white pixels only, no mask grey; the network is called at t = 0, at most once a
    step."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    seen = record_network_times(monkeypatch)
    output = tmp_path / "masked.png"
    status = main([
        "sample", "--checkpoint", str(masked_checkpoints[2]), "--steps", "4", "--num", "5",
        "--seed", "3", "--output", str(output), *options,
    ])  # fmt: skip
    assert status == 0
    assert f"saved 5 samples ({method})" in capsys.readouterr().out
    assert 1 <= len(seen) <= 4 and all(int(t.abs().max()) == 0 for t in seen)
    pictures = grid_pictures(output, 5)
    assert set(pictures.unique().tolist()) == {0, 255}
    monkeypatch.undo()
    schedule, order = ("linear", "confidence") if options else ("cosine", "random")
    tokens = masked_sample(
        rebuilt_token_denoiser(masked_checkpoints[2]), MaskedDiffusion(2, schedule),
        (5, 1, 28, 28), 4, generator=torch.Generator().manual_seed(3), order=order,
    )  # fmt: skip
    expected = to_unit_interval(images_from_tokens(tokens, 2))[:, 0].mul(255).round()
    torch.testing.assert_close(pictures.float(), expected, rtol=0, atol=0)


def test_a_masked_checkpoint_of_four_levels_samples_and_bounds_them(
    masked_checkpoints, classifier_cache, tmp_path, monkeypatch, capsys
) -> None:
    """--classes 4 round trip: the samples show exactly the 4 levels, and the bound is taken on
    the test images quantised to 4 levels."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    output = tmp_path / "four.png"
    status = main([
        "sample", "--checkpoint", str(masked_checkpoints[4]), "--steps", "3", "--num", "4",
        "--output", str(output),
    ])  # fmt: skip
    assert status == 0
    assert set(grid_pictures(output, 4).unique().tolist()) == {0, 85, 170, 255}
    path = tmp_path / "four.json"
    assert (
        evaluate(masked_checkpoints[4], "--num", "2", "--bound-images", "2", "--json", str(path))
        == 0
    )
    record = json.loads(path.read_text())
    assert record["classes"] == 4 and record["bound"]["classes"] == 4
    bound = record["bound"]
    assert bound["bits_per_dim"] == pytest.approx(bound["nats_per_image"] / (784 * math.log(2)))


def test_evaluate_refuses_an_ode_bound_for_a_masked_checkpoint(masked_checkpoints, capsys) -> None:
    arguments = ["--num", "2", "--bound-images", "2", "--ode-steps", "10"]
    assert evaluate(masked_checkpoints[2], *arguments) == 1
    assert "a masked checkpoint has no probability-flow ODE" in capsys.readouterr().err


def test_evaluate_scores_a_masked_checkpoint_beside_quantised_test_images_and_its_bound(
    masked_checkpoints, classifier_cache, tmp_path, capsys
) -> None:
    """The reference row is the first N test images in black and white, and says so; the bound
    is the mean of 4 draws of masked_nll_bound per test image, computed here with the same seed,
    in nats per image and in bits per dimension."""
    path = tmp_path / "masked.json"
    arguments = ["--num", "3", "--bound-images", "2", "--seed", "5", "--json", str(path)]
    assert evaluate(masked_checkpoints[2], *arguments) == 0
    output = capsys.readouterr().out
    assert "3 samples of mnist (masked, cosine schedule, random order, 3 steps, seed 5)" in output
    assert re.search(r"^quantised test images +3 ", output, re.MULTILINE)
    assert "real test images" not in output
    model = rebuilt_token_denoiser(masked_checkpoints[2])
    x0 = tokens_from_images(load_images("mnist", train=False, limit=2)[0])
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        draws = [masked_nll_bound(model, MaskedDiffusion(2), x0, generator=generator)
                 for _ in range(4)]  # fmt: skip
    nats = float(torch.stack(draws).mean())
    bits = nats / (784 * math.log(2))
    printed = re.search(
        r"variational bound: ([0-9.]+) bits/dim, ([0-9.]+) nats per image, on 2 test images at "
        r"2 grey levels \(each the mean of 4 draws\)",
        output,
    )
    assert printed
    assert float(printed.group(1)) == pytest.approx(bits, abs=1e-4)
    assert float(printed.group(2)) == pytest.approx(nats, abs=1e-2)
    record = json.loads(path.read_text())
    assert record["bound"] == {
        "bits_per_dim": pytest.approx(bits, rel=1e-4), "nats_per_image": pytest.approx(nats, rel=1e-4),
        "images": 2, "classes": 2, "draws": 4,
    }  # fmt: skip
    assert [record[key] for key in ("sampler", "masking_schedule", "order", "steps")] == [
        "masked", "cosine", "random", 3,
    ]  # fmt: skip
    assert "real_test_images" not in record
    quantised = images_from_tokens(
        tokens_from_images(load_images("mnist", train=False, limit=3)[0])
    )
    reference = metrics.score_samples(quantised, classifier=metrics.get_classifier("mnist"))
    assert record["quantised_test_images"]["frechet_distance"] == pytest.approx(
        reference.frechet_distance
    )
    assert record["samples"]["n"] == 3


@needs_mnist
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--schedule", "cosine"], "--schedule does not apply to --objective masked"),
        (["--timesteps", "40"], "--timesteps does not apply to --objective masked"),
        (["--prediction", "v"], "--prediction does not apply to --objective masked"),
        (["--snr-gamma", "5"], "--snr-gamma does not apply to --objective masked"),
        (["--vlb-weight", "0.01"], "--vlb-weight does not apply to --objective masked"),
        (["--sigma-data", "0.6"], "--sigma-data does not apply to --objective masked"),
        (["--conditional"], "--conditional does not apply to --objective masked"),
        (["--zero-terminal-snr"], "--zero-terminal-snr does not apply to --objective masked"),
        (["--value-range", "0", "1"], "leave --value-range at -1 1"),
        (["--classes", "1"], "--classes must lie in 2..256"),
        (["--classes", "257"], "--classes must lie in 2..256"),
        (["--model-arg", "out_channels=1"], "needs out_channels=2"),
        (["--classes", "4", "--model-arg", "channels=3"], "needs channels=5"),
    ],
)
def test_masked_training_errors_are_clear(
    arguments, message, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    assert main(masked_train_arguments(tmp_path / "never", TINY_FC_UNET, *arguments)) == 1
    error = capsys.readouterr().err
    assert message in error
    if "does not apply" in message:
        assert "a masked run takes --classes" in error
    assert not (tmp_path / "never").exists()


def test_classes_applies_to_masked_only(tmp_path, capsys) -> None:
    assert main(train_arguments(tmp_path / "never", TINY_FC_UNET, "--classes", "4")) == 1
    assert "--classes applies to --objective masked only" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("which", "arguments", "message"),
    [
        ("masked", ["--sampler", "ddim"], "trained with --objective masked; choose masked$"),
        ("masked", ["--steps", "0"], "--steps must be >= 1"),
        ("masked", ["--num", "0"], "--num must be >= 1"),
        ("masked", ["--label", "1"], "--label does not apply to a masked checkpoint"),
        ("masked", ["--guidance", "2"], "--guidance does not apply to a masked checkpoint"),
        ("masked", ["--eta", "0.5"], "--eta does not apply to a masked checkpoint"),
        ("plain", ["--sampler", "masked"], "choose ddpm, ddim, dpm-solver or heun"),
        ("plain", ["--masking-schedule", "linear"], "--masking-schedule applies to a masked"),
        ("flow", ["--order", "confidence"], r"--order applies to a masked checkpoint .* only"),
    ],
)
def test_masked_sampling_errors_are_clear(
    checkpoints, masked_checkpoints, which, arguments, message, tmp_path, capsys
) -> None:
    paths = {**checkpoints, "masked": masked_checkpoints[2]}
    output = tmp_path / "never.png"
    status = main(
        ["sample", "--checkpoint", str(paths[which]), "--output", str(output), *arguments]
    )
    assert status == 1
    assert re.search(message, capsys.readouterr().err.strip())
    assert not output.exists()


def test_a_masked_checkpoint_is_not_a_distillation_teacher(
    masked_checkpoints, tmp_path, capsys
) -> None:
    status = main([
        "distill", "--checkpoint", str(masked_checkpoints[2]), "--student-steps", "2",
        "--steps", "2", "--output", str(tmp_path / "never"),
    ])  # fmt: skip
    assert status == 1
    assert "trained with --objective masked" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_the_help_explains_the_masked_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--objective {noise,flow,edm,hybrid,masked}" in text and "--classes K" in text
    assert "--objective masked" in text  # the example
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--masking-schedule {linear,cosine}" in text and "--order {random,confidence}" in text
    assert "(default: cosine)" in text and "(default: random)" in text


@needs_mnist
def test_a_zero_terminal_snr_checkpoint_records_its_schedule_and_samples_from_t_T(
    tmp_path, monkeypatch
) -> None:
    """train rescales (and shifts) the schedule and records both; sample rebuilds the same
    schedule and starts ddim at T - 1 unless told otherwise; ddpm, dpm-solver and heun work too,
    the solvers on a grid from T - 1 evenly spaced in time, heun's first step from there DDIM's."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    options = ["--prediction", "v", "--zero-terminal-snr", "--snr-scale", "2"]
    assert main(train_arguments(tmp_path / "run", TINY_FC_UNET, *options)) == 0
    config = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]
    assert config["schedule"] == {
        "name": "linear", "timesteps": TIMESTEPS, "snr_scale": 2.0, "zero_terminal_snr": True,
    }  # fmt: skip
    expected = NoiseSchedule.from_name("linear", TIMESTEPS, snr_scale=2.0, zero_terminal_snr=True)
    calls = []
    real_ddim = cli_sample.NOISE_SAMPLERS["ddim"]

    def spying(model, schedule, shape, **kwargs):
        calls.append((schedule, kwargs.get("spacing")))
        return real_ddim(model, schedule, shape, **kwargs)

    monkeypatch.setitem(cli_sample.NOISE_SAMPLERS, "ddim", spying)
    for spacing in ([], ["--spacing", "linspace"]):
        status = main([
            "sample", "--checkpoint", str(tmp_path / "run"), "--steps", "4", "--num", "4",
            "--output", str(tmp_path / "grid.png"), *spacing,
        ])  # fmt: skip
        assert status == 0
    assert [spacing for _, spacing in calls] == ["trailing", "linspace"]
    torch.testing.assert_close(calls[0][0].betas, expected.betas, rtol=0, atol=0)
    status = main([
        "sample", "--checkpoint", str(tmp_path / "run"), "--sampler", "ddpm", "--steps", "4",
        "--num", "4", "--output", str(tmp_path / "ddpm.png"),
    ])  # fmt: skip
    assert status == 0
    seen = record_network_times(monkeypatch)
    status = main([
        "sample", "--checkpoint", str(tmp_path / "run"), "--sampler", "dpm-solver",
        "--steps", "4", "--num", "4", "--output", str(tmp_path / "dpm.png"),
    ])  # fmt: skip
    assert status == 0 and (tmp_path / "dpm.png").is_file()
    grid = ode_timesteps(expected, 4, "time").flip(0).tolist()
    assert [int(t[0]) for t in seen] == grid
    seen.clear()
    status = main([
        "sample", "--checkpoint", str(tmp_path / "run"), "--sampler", "heun",
        "--steps", "4", "--num", "4", "--output", str(tmp_path / "heun.png"),
    ])  # fmt: skip
    assert status == 0 and (tmp_path / "heun.png").is_file()
    # one call at T - 1 (DDIM's step), then a call and a predictor call per trapezoid, and one
    # call for the last, Euler step
    assert [int(t[0]) for t in seen] == [grid[0], grid[1], grid[2], grid[2], grid[3], grid[3]]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--zero-terminal-snr"], "needs --objective noise with --prediction v or x0"),
        (["--objective", "hybrid", "--zero-terminal-snr"], "needs --objective noise"),
        (["--objective", "flow", "--snr-scale", "2"], "--objective flow has its own noise levels"),
        (["--objective", "edm", "--zero-terminal-snr"], "--objective edm has its own"),
        (["--snr-scale", "0"], "--snr-scale must be a number > 0"),
        (["--snr-scale", "inf"], "--snr-scale must be a number > 0"),
    ],
)
def test_schedule_option_errors_are_clear(arguments, message, tmp_path, capsys) -> None:
    status = main(train_arguments(tmp_path / "run", TINY_FC_UNET, *arguments))
    assert status == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_sample_clips_x0_to_the_checkpoints_value_range(tmp_path, monkeypatch) -> None:
    # A checkpoint trained on pixels in [0, 1]: the sampler's default clip to [-1, 1] would let
    # half of every x0 estimate leave the data's range.
    with monkeypatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        patch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
        arguments = train_arguments(tmp_path / "unit", TINY_FC_UNET, "--value-range", "0", "1")
        assert main(arguments) == 0
    clips = record_calls(monkeypatch, reverse_process, "_clip")
    checkpoint = str(tmp_path / "unit" / "checkpoint.pt")
    output = str(tmp_path / "grid.png")
    assert main(["sample", "--checkpoint", checkpoint, "--steps", "3", "--output", output]) == 0
    assert clips and {tuple(call[1]) for call in clips} == {(0.0, 1.0)}
