"""The guidance options of sample and evaluate: a negative label, autoguidance by a reference
checkpoint, an interval of noise levels in each objective's unit, and rescaling, each checked
against the library's Guided on the same noise."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import make_grid, save_image

from diffusion_lib import Guided
from diffusion_lib.__main__ import main
from diffusion_lib.checkpoints import load_checkpoint, save_checkpoint
from diffusion_lib.cli_sample import read_checkpoint, rebuild
from diffusion_lib.data import DATA_VARIABLE, data_root, load_images, to_unit_interval
from diffusion_lib.flow_matching import RectifiedFlow
from diffusion_lib.reference_classifier import get_classifier
from diffusion_lib.sampling import ddim_sample
from diffusion_lib.smoke import SMOKE_VARIABLE

DATA_FOLDER = data_root()
TIMESTEPS = 40
FC_UNET = ["--model", "fc_unet", "--model-arg", "widths=[32,16]"]
WEAK_FC_UNET = ["--model", "fc_unet", "--model-arg", "widths=[16,8]"]
ATTENTION_UNET = [
    "--model", "attention_unet", "--model-arg", "base_channels=8",
    "--model-arg", "channel_multipliers=[1,2]", "--model-arg", "num_res_blocks=1",
]  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks


def train(folder: Path, name: str, model: list[str], *extra: str) -> Path:
    timesteps = "1000" if "edm" in extra else str(TIMESTEPS)
    status = main([
        "train", *model, "--dataset", "mnist", "--timesteps", timesteps, "--steps", "3",
        "--batch-size", "8", "--output", str(folder / name), "--no-progress", *extra,
    ])  # fmt: skip
    assert status == 0
    return speak(folder / name / "checkpoint.pt")


def speak(checkpoint: Path) -> Path:
    """Add noise to the saved EMA weights: three steps leave the zero-initialised output layers
    near zero, and a network that says nothing cannot show what guidance does."""
    state = load_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(len(state["ema"]))
    for value in state["ema"].values():
        if value.is_floating_point():
            value.add_(0.1 * torch.randn(value.shape, generator=generator))
    save_checkpoint(checkpoint, state)
    return checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints trained in smoke mode: each objective with a smaller network beside it
    as the reference for autoguidance, and a conditional one."""
    if not (DATA_FOLDER / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {DATA_FOLDER}")
    folder = tmp_path_factory.mktemp("guidance")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        patch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
        found = {
            "labels": train(folder, "labels", ATTENTION_UNET, "--conditional"),
            "noise": train(folder, "noise", FC_UNET),
            "noise_weak": train(folder, "noise_weak", WEAK_FC_UNET),
            "x0_weak": train(folder, "x0_weak", WEAK_FC_UNET, "--prediction", "x0"),
        }
        for objective in ("flow", "edm"):
            options = ("--objective", objective)
            found[objective] = train(folder, objective, FC_UNET, *options)
            found[f"{objective}_weak"] = train(folder, f"{objective}_weak", WEAK_FC_UNET, *options)
    return found


def network_of(checkpoint: Path) -> torch.nn.Module:
    path, state = read_checkpoint(checkpoint)
    return rebuild(path, state, torch.device("cpu"))[0]


def sample(checkpoint: Path, output: Path, *options: str) -> torch.Tensor:
    """The grid ``sample`` saves for 4 images drawn with 4 ddim steps, as a uint8 tensor."""
    status = main([
        "sample", "--checkpoint", str(checkpoint), "--steps", "4", "--num", "4",
        "--output", str(output), *options,
    ])  # fmt: skip
    assert status == 0
    with Image.open(output) as image:
        return pil_to_tensor(image)


def library_grid(
    checkpoint: Path, output: Path, guided: Callable[[torch.nn.Module], torch.nn.Module], label
) -> torch.Tensor:
    """The same grid drawn by ddim_sample with the model ``guided`` makes of the network, from
    the noise of seed 0, saved and read back as sample does."""
    path, state = read_checkpoint(checkpoint)
    network, schedule = rebuild(path, state, torch.device("cpu"))
    samples = library_samples(guided(network), schedule, label, count=4, steps=4)
    save_image(make_grid(to_unit_interval(samples), nrow=2, padding=2), output)
    with Image.open(output) as image:
        return pil_to_tensor(image)


def library_samples(model, schedule, label, count: int, steps: int) -> torch.Tensor:
    """ddim_sample's images from the noise of seed 0, with one label, the classes in turn
    (``"all"``) or none."""
    if label == "all":
        labels = torch.arange(count) % 10
    else:
        labels = None if label is None else torch.full((count,), label)
    return ddim_sample(
        model, schedule, (count, 1, 28, 28), steps=steps, labels=labels,
        generator=torch.Generator().manual_seed(0), spacing="leading",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("which", "options", "guided", "label"),
    [
        (
            "noise",
            ["--guidance", "1.5", "--reference-checkpoint", "noise_weak"],
            lambda model, weak: Guided(model, 1.5, reference_model=weak),
            None,
        ),
        (
            "labels",
            ["--negative-label", "1", "--guidance", "2"],
            lambda model, _: Guided(model, 2.0, reference_label=1),
            "null",
        ),
        (
            "labels",
            ["--label", "3", "--negative-label", "5", "--guidance", "2"],
            lambda model, _: Guided(model, 2.0, reference_label=5),
            3,
        ),
        (
            "labels",
            ["--label", "3", "--guidance", "2", "--guidance-rescale", "0.7"],
            lambda model, _: Guided(model, 2.0, rescale=0.7),
            3,
        ),
        (
            "labels",
            ["--label", "3", "--guidance", "4", "--guidance-interval", "20", "39"],
            lambda model, _: Guided(model, 4.0, interval=(20, 39)),
            3,
        ),
        (
            "labels",
            ["--label", "all", "--guidance", "2"],
            lambda model, _: Guided(model, 2.0),
            "all",
        ),
    ],
    ids=["autoguidance", "negative-only", "label-and-negative", "rescale", "interval", "all"],
)
def test_sample_draws_what_guided_draws_from_the_same_noise(
    checkpoints, which, options, guided, label, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    options = [str(checkpoints.get(option, option)) for option in options]
    drawn = sample(checkpoints[which], tmp_path / "cli.png", *options)
    weak = network_of(checkpoints["noise_weak"])
    if label == "null":
        label = network_of(checkpoints[which]).null_label
    expected = library_grid(
        checkpoints[which], tmp_path / "library.png", lambda model: guided(model, weak), label
    )
    torch.testing.assert_close(drawn, expected, rtol=0, atol=1)  # one grey level of rounding
    unguided = library_grid(checkpoints[which], tmp_path / "plain.png", lambda m: m, label)
    assert (drawn.int() - unguided.int()).abs().max() > 8  # the options changed the images


def calls_by_width(monkeypatch: pytest.MonkeyPatch, kind: str) -> dict[int, list[torch.Tensor]]:
    """The time input of every call of a module of class ``kind`` from now on, by the module's
    parameter count (which tells a network from its smaller reference)."""
    seen: dict[int, list[torch.Tensor]] = {}
    original = torch.nn.Module.__call__

    def recording(module, *args, **kwargs):
        if type(module).__name__ == kind:
            size = sum(parameter.numel() for parameter in module.parameters())
            seen.setdefault(size, []).append(args[1].detach().flatten().float())
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", recording)
    return seen


def parameter_count(checkpoint: Path) -> int:
    return sum(parameter.numel() for parameter in network_of(checkpoint).parameters())


@pytest.mark.parametrize(
    ("objective", "interval", "kind", "to_model_time"),
    [
        ("noise", ("10", "29"), "FCUNet", lambda value: value),
        ("flow", ("0.25", "0.75"), "FCUNet", RectifiedFlow(TIMESTEPS).model_time),
        ("edm", ("0.5", "5"), "PreconditionedDenoiser", lambda value: value),
    ],
)
def test_the_reference_sees_only_the_interval_in_each_objectives_unit(
    checkpoints, objective, interval, kind, to_model_time, tmp_path, monkeypatch
) -> None:
    """Timesteps for a noise model, the flow's t in [0, 1], sigma for edm: the weaker network is
    called only inside the interval, the guided one inside and outside it."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    seen = calls_by_width(monkeypatch, kind)
    options = ["--guidance", "1", "--reference-checkpoint", str(checkpoints[f"{objective}_weak"])]
    status = main([
        "sample", "--checkpoint", str(checkpoints[objective]), "--steps", "8", "--num", "2",
        "--output", str(tmp_path / "out.png"), "--guidance-interval", *interval, *options,
    ])  # fmt: skip
    assert status == 0
    low, high = (to_model_time(torch.tensor(float(value))).item() for value in interval)
    reference_times = torch.cat(seen[parameter_count(checkpoints[f"{objective}_weak"])])
    model_times = torch.cat(seen[parameter_count(checkpoints[objective])])
    assert len(reference_times) > 0
    assert ((reference_times >= low - 1e-4) & (reference_times <= high + 1e-4)).all()
    inside = (model_times >= low - 1e-4) & (model_times <= high + 1e-4)
    assert inside.sum() == len(reference_times) and not inside.all()


def test_evaluate_prints_and_records_the_guidance(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    record = tmp_path / "scores.json"
    status = main([
        "evaluate", "--checkpoint", str(checkpoints["labels"]), "--steps", "2", "--num", "4",
        "--label", "3", "--negative-label", "5", "--guidance", "2", "--guidance-interval", "0",
        "19", "--guidance-rescale", "0.5", "--json", str(record),
    ])  # fmt: skip
    assert status == 0
    assert (
        "label 3, guidance 2 (away from 5, interval 0..19, rescale 0.5)" in capsys.readouterr().out
    )
    scores = json.loads(record.read_text())
    assert {key: scores[key] for key in ("label", "guidance", "negative_label")} == {
        "label": 3, "guidance": 2.0, "negative_label": 5,
    }  # fmt: skip
    assert scores["guidance_interval"] == [0, 19] and scores["guidance_rescale"] == 0.5
    assert scores["reference_checkpoint"] is None


def test_evaluate_with_every_label_reports_the_share_read_as_asked(
    checkpoints, tmp_path, monkeypatch, capsys
) -> None:
    """--label all draws the classes in turn; evaluate reports the share the classifier reads as
    the class asked for, and for the real test images as their own labels."""
    monkeypatch.setenv(SMOKE_VARIABLE, "1")
    monkeypatch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
    record = tmp_path / "scores.json"
    status = main([
        "evaluate", "--checkpoint", str(checkpoints["labels"]), "--steps", "3", "--num", "12",
        "--label", "all", "--guidance", "1", "--json", str(record),
    ])  # fmt: skip
    assert status == 0
    assert "read as the class asked for" in capsys.readouterr().out
    scores = json.loads(record.read_text())
    assert scores["label"] == "all"

    classifier = get_classifier("mnist")
    path, state = read_checkpoint(checkpoints["labels"])
    network, schedule = rebuild(path, state, torch.device("cpu"))
    samples = library_samples(Guided(network, 1.0), schedule, "all", count=12, steps=3)
    test_images, test_labels = load_images("mnist", train=False, limit=12)
    for key, images, labels in (
        ("samples", samples, torch.arange(12) % 10),
        ("real_test_images", test_images, test_labels),
    ):
        read = classifier.embed(images.clamp(-1, 1))[1].argmax(dim=1)
        expected = (read == labels).float().mean().item()
        assert scores[key]["read_as_label"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("which", "arguments", "message"),
    [
        (
            "noise",
            ["--guidance", "1"],
            "needs --label .* --negative-label .* --reference-checkpoint",
        ),
        ("noise", ["--negative-label", "1", "--guidance", "1"], "needs a conditional checkpoint"),
        ("labels", ["--negative-label", "1"], "--negative-label shapes guidance, so it needs"),
        ("labels", ["--negative-label", "12", "--guidance", "1"], "--negative-label must be one"),
        ("labels", ["--label", "4", "--negative-label", "4", "--guidance", "1"], "from itself"),
        ("labels", ["--label", "4", "--guidance", "1", "--guidance-rescale", "2"], r"\[0, 1\]"),
        ("labels", ["--label", "4", "--guidance", "1", "--guidance-interval", "30", "10"], "<="),
        ("labels", ["--label", "4", "--guidance", "1", "--guidance-interval", "0", "40"], "0 <= "),
        ("labels", ["--label", "4", "--guidance", "1", "--guidance-interval", "0.5", "9"], "whole"),
        (
            "flow",
            [
                "--guidance",
                "1",
                "--reference-checkpoint",
                "flow_weak",
                "--guidance-interval",
                "0",
                "2",
            ],
            "in the flow's time t",
        ),  # fmt: skip
        ("noise", ["--guidance", "1", "--reference-checkpoint", "flow_weak"], "in objective"),
        ("noise", ["--guidance", "1", "--reference-checkpoint", "x0_weak"], "in prediction"),
        (
            "labels",
            ["--label", "1", "--guidance", "1", "--reference-checkpoint", "noise_weak"],
            "conditional on the same 10 classes",
        ),  # fmt: skip
        ("noise", ["--guidance", "1", "--reference-checkpoint", "missing"], "no checkpoint at"),
        ("noise", ["--label", "all"], "--label needs a conditional checkpoint"),
        ("labels", ["--label", "all", "--negative-label", "2", "--guidance", "1"], "unguided"),
    ],
)
def test_guidance_errors_are_clear(checkpoints, which, arguments, message, tmp_path, capsys):
    arguments = [str(checkpoints.get(argument, argument)) for argument in arguments]
    output = tmp_path / "never.png"
    status = main(
        ["sample", "--checkpoint", str(checkpoints[which]), "--output", str(output), *arguments]
    )
    assert status == 1
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()


def test_a_label_is_a_class_number_or_all(checkpoints, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--checkpoint", str(checkpoints["labels"]), "--label", "seven"])
    assert exit_info.value.code == 2
    assert "a class number or 'all'" in capsys.readouterr().err
