"""The ``restore`` command: the measurements it makes, the restorations it saves and scores, and
its errors, in smoke mode on tiny checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from diffusion_lib import Downsampling, pigdm_sample
from diffusion_lib.__main__ import main
from diffusion_lib.checkpoints import load_checkpoint
from diffusion_lib.cli_restore import hidden_region
from diffusion_lib.cli_sample import rebuild
from diffusion_lib.data import DATA_VARIABLE, data_root, load_images, to_unit_interval
from diffusion_lib.smoke import SMOKE_VARIABLE

DATA_FOLDER = data_root()
TINY_FC_UNET = ["--model", "fc_unet", "--model-arg", "widths=[32,16]"]
TIMESTEPS = 40
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks


def in_smoke_mode(arguments: list[str]) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        patch.setenv(DATA_VARIABLE, str(DATA_FOLDER))
        return main(arguments)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A noise checkpoint, an x0 one on a zero-terminal-SNR schedule and a flow one."""
    if not (DATA_FOLDER / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {DATA_FOLDER}")
    folder = tmp_path_factory.mktemp("restore")
    runs = {
        "plain": [],
        "zero_snr": ["--prediction", "x0", "--zero-terminal-snr"],
        "flow": ["--objective", "flow"],
    }
    for name, extra in runs.items():
        train = ["train", *TINY_FC_UNET, "--dataset", "mnist", "--timesteps", str(TIMESTEPS),
                 "--steps", "3", "--batch-size", "8", "--no-progress",
                 "--output", str(folder / name), *extra]  # fmt: skip
        assert in_smoke_mode(train) == 0
    return {name: folder / name / "checkpoint.pt" for name in runs}


def restore(checkpoint: Path, tmp_path: Path, *arguments: str) -> int:
    return in_smoke_mode([
        "restore", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "restored.png"),
        "--json", str(tmp_path / "restored.json"), *arguments,
    ])  # fmt: skip


def picture_rows(path: Path, columns: int) -> torch.Tensor:
    """The three rows of the saved picture as (3, columns, 28, 28) uint8, without borders."""
    with Image.open(path) as image:
        grid = pil_to_tensor(image.convert("L"))[0]
    assert grid.shape == (2 + 3 * 30, 2 + columns * 30)
    return torch.stack([
        torch.stack([grid[2 + 30 * r:][:28, 2 + 30 * c:][:, :28] for c in range(columns)])
        for r in range(3)
    ])  # fmt: skip


def test_hidden_regions_hide_what_they_say() -> None:
    for region in ("bottom", "top", "left", "right"):
        assert int((hidden_region(region) == 0).sum()) == 28 * 14
    assert bool((hidden_region("bottom")[..., 14:, :] == 0).all())
    assert bool((hidden_region("left")[..., :, :14] == 0).all())
    center = hidden_region("center")
    assert int((center == 0).sum()) == 14 * 14 and bool((center[..., 7:21, 7:21] == 0).all())
    with pytest.raises(ValueError, match="bottom, top, left, right"):
        hidden_region("middle")


@pytest.mark.parametrize("eta", [None, 0.0], ids=["ancestral", "DDIM eta 0"])
def test_super_resolution_saves_and_scores_what_pigdm_draws(
    eta, checkpoints, classifier_cache, tmp_path, capsys
) -> None:
    arguments = ["--task", "super-resolution", "--noise", "0.05", "--num", "6", "--seed", "4"]
    arguments += [] if eta is None else ["--eta", "0"]
    assert restore(checkpoints["plain"], tmp_path, *arguments, "--data-std", "0.6") == 0
    output = capsys.readouterr().out
    assert "6 test images of mnist, super-resolution from 7x7 (factor 4)" in output
    steps = "DDIM eta 0, 10 steps" if eta is not None else "10 steps"
    assert f"pigdm, data std 0.6, {steps}, seed 4" in output  # T = 40, capped in smoke mode
    record = json.loads((tmp_path / "restored.json").read_text())
    assert record["steps"] == 10 and record["images"] == 6
    # A A+ y = y, so the pseudo-inverse explains the measurement exactly; the originals leave
    # the noise itself (294 draws of std 0.05: the RMS within 15%).
    assert record["pseudo_inverse"]["measurement_error"] < 1e-6
    assert abs(record["originals"]["measurement_error"] - 0.05) < 0.05 * 0.15
    assert record["originals"]["distance_to_original"] == 0.0

    # The third row is pigdm_sample's output for the same measurement and seed.
    path, state = checkpoints["plain"], load_checkpoint(checkpoints["plain"])
    model, schedule = rebuild(path, state, torch.device("cpu"))
    originals, _ = load_images("mnist", train=False, limit=6)
    generator = torch.Generator().manual_seed(4)
    y = Downsampling(4).measure(originals, 0.05, generator=generator)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SMOKE_VARIABLE, "1")
        expected = pigdm_sample(model, schedule, Downsampling(4), y, originals.shape,
                                noise_std=0.05, data_std=0.6, steps=TIMESTEPS, eta=eta,
                                generator=generator)  # fmt: skip
    rows = picture_rows(tmp_path / "restored.png", 6).float() / 255
    torch.testing.assert_close(rows[0], to_unit_interval(originals)[:, 0], atol=1 / 255, rtol=0)
    pseudo_inverse = to_unit_interval(Downsampling(4).pseudo_inverse(y))[:, 0]
    torch.testing.assert_close(rows[1], pseudo_inverse, atol=1 / 255, rtol=0)
    torch.testing.assert_close(rows[2], to_unit_interval(expected)[:, 0], atol=1 / 255, rtol=0)
    measured = float((Downsampling(4)(expected) - y).pow(2).mean().sqrt())
    assert record["restored"]["measurement_error"] == pytest.approx(measured, abs=1e-5)


@pytest.mark.parametrize("method", ["repaint", "dps", "pigdm"])
def test_inpainting_fills_the_hidden_part(
    method, checkpoints, classifier_cache, tmp_path, capsys
) -> None:
    assert restore(checkpoints["plain"], tmp_path, "--task", "inpainting", "--hide", "left",
                   "--method", method, "--num", "3") == 0  # fmt: skip
    assert "inpainting, left hidden" in capsys.readouterr().out
    record = json.loads((tmp_path / "restored.json").read_text())
    assert record["restored"].keys() >= {"label_kept", "distance_to_original", "frechet_distance"}
    rows = picture_rows(tmp_path / "restored.png", 3)
    hidden = hidden_region("left")[0, 0] == 0
    assert bool((rows[1][:, hidden] == 128).all())  # A+y shows the hidden half as 0: mid grey
    if method == "repaint":  # RePaint keeps the seen pixels exactly
        assert record["restored"]["measurement_error"] == 0.0
        assert torch.equal(rows[2][:, ~hidden], rows[0][:, ~hidden])


def test_a_zero_terminal_snr_checkpoint_restores_through_its_x0_prediction(
    checkpoints, classifier_cache, tmp_path
) -> None:
    arguments = ["--task", "inpainting", "--noise", "0.1", "--num", "2"]
    assert restore(checkpoints["zero_snr"], tmp_path, *arguments) == 0
    record = json.loads((tmp_path / "restored.json").read_text())
    assert all(
        torch.isfinite(torch.tensor(value)) for value in record["restored"].values()
    )  # no 0 / 0 at alpha_bar_T = 0


@pytest.mark.parametrize(
    ("which", "arguments", "message"),
    [
        ("flow", ["--task", "inpainting"], "trained with --objective flow"),
        ("plain", ["--task", "super-resolution", "--method", "repaint"], "needs --task inpainting"),
        ("plain", ["--task", "inpainting", "--factor", "2"], "--factor applies to --task super"),
        ("plain", ["--task", "super-resolution", "--hide", "top"], "--hide applies to --task inp"),
        ("plain", ["--task", "inpainting", "--step-size", "1"], "--step-size applies to --method dps"),
        ("plain", ["--task", "inpainting", "--method", "dps", "--data-std", "1"],
         "--data-std applies to --method pigdm"),
        ("plain", ["--task", "super-resolution", "--factor", "3"], r"one of \[2, 4, 7, 14, 28\]"),
        ("plain", ["--task", "inpainting", "--noise", "-1"], "--noise must be >= 0"),
        ("plain", ["--task", "inpainting", "--data-std", "0"], "--data-std must be > 0"),
        ("plain", ["--task", "inpainting", "--method", "dps", "--eta", "0"],
         "--eta applies to --method pigdm"),
        ("plain", ["--task", "inpainting", "--eta", "-1"], "--eta must be >= 0"),
        ("plain", ["--task", "inpainting", "--steps", str(TIMESTEPS + 1)], f"1..{TIMESTEPS}"),
        ("plain", ["--task", "inpainting", "--num", "0"], "--num must be >= 1"),
    ],
)  # fmt: skip
def test_restore_errors_are_clear(which, arguments, message, checkpoints, tmp_path, capsys) -> None:
    assert restore(checkpoints[which], tmp_path, *arguments) == 1
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert not (tmp_path / "restored.png").exists()


@pytest.mark.parametrize(
    ("option", "path", "message"),
    [
        ("--output", "{tmp}",
         "--output must name an image file such as restored.png; got {tmp} (a folder)"),
        ("--output", "{tmp}/restored", "got {tmp}/restored (no extension"),
        ("--json", "{tmp}", "--json must name a file such as restored.json; got {tmp} (a folder)"),
        ("--json", "{tmp}/file/x.json", "cannot be written: {tmp}/file is a file, not a folder"),
    ],
)  # fmt: skip
def test_restore_checks_its_outputs_before_restoring(option, path, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    path = path.format(tmp=tmp_path)
    # No checkpoint exists: the outputs are checked before it is read, let alone restored with.
    status = main(["restore", "--checkpoint", str(tmp_path / "absent.pt"), "--task", "inpainting",
                   option, path])  # fmt: skip
    assert status == 1
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
