"""What the samplers do before their first step: the model's mode and device, the starting noise
and the labels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_lib.sampler_inputs import (
    _check_labels,
    _evaluating,
    _model_device,
    _parameter_dtype,
    _randn,
    _start,
)


def test_evaluating_switches_off_training_and_gradients_and_restores_after_an_error() -> None:
    model = nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError, match="inside"), _evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
        raise RuntimeError("inside")
    assert model.training and torch.is_grad_enabled()
    model.eval()
    with _evaluating(model):
        pass
    assert not model.training  # a model in eval mode stays there


def test_seeded_noise_is_the_generators_draw_moved_to_the_device() -> None:
    # "meta" stands in for a GPU: the noise is drawn on the generator's device, then moved.
    expected = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    drawn = _randn((3, 4), torch.Generator().manual_seed(7), torch.device("cpu"))
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    moved = _randn((3, 4), torch.Generator().manual_seed(7), torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (3, 4)


def test_device_and_dtype_come_from_the_parameters() -> None:
    assert _model_device(lambda x, t: x) == torch.device("cpu")
    assert _model_device(nn.Linear(1, 1).to("meta")).type == "meta"
    model = nn.Module()  # an integer parameter first, then float64 weights
    model.steps = nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False)
    model.linear = nn.Linear(1, 1).double()
    assert next(model.parameters()).dtype == torch.long
    assert _parameter_dtype(model) == torch.float64
    assert _parameter_dtype(lambda x, t: x) is None


def test_labels_are_expanded_from_one_and_refused_in_the_wrong_number() -> None:
    cpu = torch.device("cpu")
    assert _check_labels(None, 4, cpu) is None
    assert _check_labels(torch.tensor(3), 4, cpu).tolist() == [3, 3, 3, 3]
    assert _check_labels([1, 2], 2, cpu).dtype == torch.long
    with pytest.raises(ValueError, match=r"one class per sample \(4\), got 3"):
        _check_labels(torch.tensor([0, 1, 2]), 4, cpu)


def test_a_given_start_moves_to_the_device_of_the_models_parameters() -> None:
    # "meta" stands in for a GPU: a CPU x_T given to a model whose weights live elsewhere
    # must follow the weights, as noise drawn by the sampler itself does.
    model = nn.Linear(1, 1).to("meta")
    x_T = torch.randn(2, 1, 2, 2)
    assert _start(model, tuple(x_T.shape), x_T, None, None).device.type == "meta"
    assert _start(model, tuple(x_T.shape), None, None, None).device.type == "meta"
    assert _start(model, tuple(x_T.shape), x_T, None, "cpu").device.type == "cpu"
    assert _start(lambda x, t: x, tuple(x_T.shape), x_T, None, None) is x_T  # no parameters
