"""The networks of the book, from a denoising autoencoder to a U-net with self-attention and a
diffusion transformer.

Every noise predictor is a plain ``nn.Module`` with ``forward(x_t, t) -> eps`` (conditional
ones also take ``labels``); none of them owns a noise schedule.
"""

from __future__ import annotations

from torch import nn

from diffusion_lib.models.attention_unet import AttentionUNet
from diffusion_lib.models.autoencoder import DenoisingAutoencoder
from diffusion_lib.models.dit import DiffusionTransformer
from diffusion_lib.models.embeddings import TimeEmbedding, sinusoidal_embedding
from diffusion_lib.models.fc_unet import FCUNet
from diffusion_lib.models.toy_mlp import ToyMLP
from diffusion_lib.validation import check_choice

#: The networks by the name that ``build_model`` and ``train --model`` take.
MODELS: dict[str, type[nn.Module]] = {
    "fc_unet": FCUNet,
    "attention_unet": AttentionUNet,
    "dit": DiffusionTransformer,
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """The noise predictor registered as ``name`` in :data:`MODELS`, built with ``kwargs``."""
    check_choice("model", name, tuple(MODELS))
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (those with ``requires_grad``), each shared tensor once."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


__all__ = [
    "MODELS",
    "AttentionUNet",
    "DenoisingAutoencoder",
    "DiffusionTransformer",
    "FCUNet",
    "TimeEmbedding",
    "ToyMLP",
    "build_model",
    "count_parameters",
    "sinusoidal_embedding",
]
