"""Checkpoints: atomic writes, safe loading, and clear errors that never cost the good file."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
from torch import Tensor, nn

from diffusion_lib.checkpoints import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from diffusion_lib.edm import PreconditionedDenoiser
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.training import TrainingResult, train


class SmallDenoiser(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(17, hidden), nn.SiLU(), nn.Linear(hidden, 16))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        features = torch.cat([x_t.flatten(1), t[:, None].float() / 20], dim=1)
        return self.net(features).reshape(x_t.shape)


class Opaque:
    """An arbitrary Python object: ``weights_only`` loading must refuse to rebuild it."""


def run(
    folder, model: nn.Module | None = None, steps: int = 6, images: int = 32, **kwargs
) -> TrainingResult:
    torch.manual_seed(0)
    data = torch.randn(images, 1, 4, 4)
    schedule = NoiseSchedule.from_name("linear", 20)
    options = {"batch_size": 8, "checkpoint_every": 3, "progress": False, "device": "cpu", **kwargs}
    return train(
        model if model is not None else SmallDenoiser(), schedule, data,
        steps=steps, checkpoint_dir=folder, **options,
    )  # fmt: skip


def trained_config() -> dict:
    return {"model": {"name": "small", "kwargs": {"hidden": 16}}, "value_range": (-1, 1)}


@pytest.fixture
def trained(tmp_path) -> TrainingResult:
    return run(
        tmp_path,
        config=trained_config(),
    )


def test_checkpoint_holds_the_run_and_loads_into_a_fresh_model(trained: TrainingResult) -> None:
    path = trained.checkpoint_path
    assert path.name == CHECKPOINT_NAME
    state = load_checkpoint(path)
    assert state["step"] == 6 and state["history"]["loss"] == trained.history.loss
    assert state["config"] == {
        "model": {"name": "small", "kwargs": {"hidden": 16}},
        "value_range": [-1, 1],
    }
    assert {"optimizer", "lr_scheduler", "rng", "data_order"} <= set(state)
    for weights, reference in (("ema", trained.ema_model), ("model", trained.model)):
        fresh = SmallDenoiser()
        load_checkpoint(path, fresh, weights=weights)
        for name, tensor in reference.state_dict().items():
            assert torch.equal(fresh.state_dict()[name], tensor), (weights, name)
    # EMA and raw weights really differ after a few steps.
    assert not torch.equal(trained.ema_model.net[0].weight, trained.model.net[0].weight)
    assert [entry.name for entry in path.parent.iterdir()] == [CHECKPOINT_NAME]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(trained) -> None:
    path = trained.checkpoint_path
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, {"step": lambda: 0})
    assert path.read_bytes() == before
    assert [entry.name for entry in path.parent.iterdir()] == [CHECKPOINT_NAME]


def corrupt(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(2048))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign object":
        torch.save({"step": Opaque()}, path)
    elif how == "not a dict":
        torch.save([1, 2, 3], path)
    elif how == "missing entries":
        torch.save({"format_version": 1, "step": 3}, path)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "truncated, corrupt"),
        ("garbage", "truncated, corrupt"),
        ("empty", "truncated, corrupt"),
        ("foreign object", "truncated, corrupt"),
        ("not a dict", "holds a list"),
        ("missing entries", "lacks the entries"),
    ],
)
def test_a_bad_file_raises_a_clear_error_and_is_not_overwritten(
    tmp_path, trained, how, message
) -> None:
    path = trained.checkpoint_path
    corrupt(path, how)
    damaged = path.read_bytes()
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)
    with pytest.raises(CheckpointError, match=message):
        run(tmp_path, steps=9)  # resume=True must refuse rather than start over
    assert path.read_bytes() == damaged


def test_a_different_architecture_is_named_and_the_good_checkpoint_kept(tmp_path, trained) -> None:
    path = trained.checkpoint_path
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"different architecture.*net\.0\.weight") as caught:
        run(tmp_path, SmallDenoiser(hidden=24), steps=9)
    assert str(path) in str(caught.value) and "--no-resume" in str(caught.value)
    assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="different architecture"):
        load_checkpoint(path, nn.Linear(3, 3))


def test_a_different_config_is_refused_on_resume_naming_what_differs(tmp_path, trained) -> None:
    with pytest.raises(CheckpointError) as caught:
        run(tmp_path, steps=9, config={"model": {"name": "other"}, "value_range": [-1, 1]})
    message = str(caught.value)
    assert 'model: {"name": "small", "kwargs": {"hidden": 16}} in the checkpoint' in message
    assert '{"name": "other"} now' in message and "value_range" not in message
    assert "resume=False (--no-resume on the command line)" in message


@pytest.mark.parametrize(
    ("change", "now"),
    [
        ({"seed": 5}, "seed 5 and batch_size 8 on 32 images"),
        ({"batch_size": 16}, "seed 0 and batch_size 16 on 32 images"),
        ({"images": 24}, "seed 0 and batch_size 8 on 24 images"),
    ],
)
def test_another_data_order_is_refused_on_resume_naming_it(tmp_path, trained, change, now):
    """A resumed run repeats the uninterrupted one only with its batches: the same seed, batch
    size and number of images."""
    before = trained.checkpoint_path.read_bytes()
    with pytest.raises(CheckpointError) as caught:
        run(tmp_path, steps=9, config=trained_config(), **change)
    message = str(caught.value)
    assert "was trained with seed 0 and batch_size 8 on 32 images" in message
    assert f"this call has {now}" in message and "--no-resume" in message
    assert trained.checkpoint_path.read_bytes() == before
    assert run(tmp_path, steps=4, config=trained_config(), resume=False, **change).steps == 4


def test_a_resumed_run_takes_this_calls_learning_rate_and_says_so(tmp_path, trained) -> None:
    """The optimiser state in the checkpoint holds lr 2e-4; resuming with 1e-3 warns and goes on
    with 1e-3, still inside the warm-up of 100 steps: at step 9 the rate is 1e-3 * 10 / 100."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings resume without a word
        run(tmp_path, steps=7, config=trained_config())
    with pytest.warns(UserWarning, match=r"with lr=0.001 .* trained with lr=0.0002"):
        run(tmp_path, steps=9, lr=1e-3, weight_decay=0.01, config=trained_config())
    [group] = torch.load(trained.checkpoint_path, weights_only=True)["optimizer"]["param_groups"]
    assert group["initial_lr"] == 1e-3 and group["weight_decay"] == 0.01
    assert group["lr"] == pytest.approx(1e-3 * 10 / 100)


def test_a_checkpoint_without_random_state_is_refused_before_the_weights_change(
    tmp_path, trained
) -> None:
    state = torch.load(trained.checkpoint_path, weights_only=True)
    del state["rng"]
    torch.save(state, trained.checkpoint_path)
    model = SmallDenoiser()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="random state"):
        run(tmp_path, model, steps=9)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_missing_file_and_unknown_weights(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="choose one of ema, model"):
        load_checkpoint(tmp_path / "absent.pt", weights="best")
    assert issubclass(CheckpointError, ValueError)


def test_write_atomically_gives_the_permissions_of_a_plain_open(tmp_path) -> None:
    from diffusion_lib.checkpoints import write_atomically

    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    written = write_atomically(tmp_path / "atomic.bin", lambda file: file.write(b"y"))
    assert written.read_bytes() == b"y"
    assert (written.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["atomic.bin", "plain.bin"]


def test_a_folder_is_named_as_such(tmp_path) -> None:
    # The folder given to train(checkpoint_dir=...) used to be reported as "no checkpoint".
    message = f"is a folder; pass the checkpoint file inside it, .*{CHECKPOINT_NAME}"
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tmp_path)


class TimedDenoiser(SmallDenoiser):
    """SmallDenoiser with a number of timesteps T, which its weights do not depend on."""

    def __init__(self, timesteps: int = 1000) -> None:
        super().__init__()
        self.timesteps = timesteps


def write_weights(path, model: nn.Module, config: dict | None) -> None:
    """A checkpoint holding ``model``'s weights and ``config``, without training."""
    weights = model.state_dict()
    save_checkpoint(path, {
        "format_version": 1, "step": 0, "model": weights, "ema": weights, "optimizer": {},
        "lr_scheduler": {}, "history": {"loss": []}, "config": config,
    })  # fmt: skip


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_model_built_with_other_arguments_than_the_config_is_refused(tmp_path, wrapped) -> None:
    """The weights of a T = 100 network fit one with T = 1000, which reads every time input as
    another step; the config's model arguments tell them apart, also inside a wrapper."""

    def build(timesteps: int) -> nn.Module:
        network = TimedDenoiser(timesteps)
        return PreconditionedDenoiser(network, 0.5) if wrapped else network

    path = tmp_path / CHECKPOINT_NAME
    config = {"model": {"name": "timed", "kwargs": {"timesteps": 100, "widths": [8]}}}
    write_weights(path, build(100), config)
    model = build(1000)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="timesteps 100 in the checkpoint, 1000 in the model"):
        load_checkpoint(path, model)
    assert all(torch.equal(before[name], model.state_dict()[name]) for name in before)
    load_checkpoint(path, build(100))  # the arguments it was written with


@pytest.mark.parametrize(
    ("config", "hint"),
    [
        ({"objective": "flow"}, "flow_sample"),
        ({"objective": "edm"}, "edm_sample"),
        ({"objective": "hybrid"}, "NoiseOnly"),
        ({"objective": "masked"}, "masked_sample"),
        ({"objective": "noise", "prediction": "v"}, r"NoiseFromPrediction\(model, schedule, 'v'\)"),
    ],
)
def test_loading_a_network_that_does_not_predict_the_noise_warns(tmp_path, config, hint) -> None:
    path = tmp_path / CHECKPOINT_NAME
    write_weights(path, SmallDenoiser(), config)
    with pytest.warns(UserWarning, match=hint):
        load_checkpoint(path, SmallDenoiser())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path)  # the dict alone: the caller reads the config itself


@pytest.mark.parametrize("config", [None, {"objective": "noise"}, {"prediction": "epsilon"}, {}])
def test_loading_a_noise_predictor_is_silent(tmp_path, config) -> None:
    path = tmp_path / CHECKPOINT_NAME
    write_weights(path, SmallDenoiser(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path, SmallDenoiser())
