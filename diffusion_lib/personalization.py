"""Teaching a trained class-conditional model a new class from a handful of images.

A conditional network (:class:`~diffusion_lib.models.attention_unet.AttentionUNet` or
:class:`~diffusion_lib.models.dit.DiffusionTransformer` with ``num_classes``) looks its label up in a table
of ``num_classes + 1`` rows, the last being the null label of classifier-free guidance.
:func:`add_classes` appends rows for new classes in front of the null row, so every old label
keeps its meaning. Then:

* textual inversion (Gal et al. 2023) learns only the new row, the network frozen:
  :func:`learn_class_embedding` minimises the simplified loss over that one vector, the
  equivalent of a new word's embedding in a text-to-image model;
* DreamBooth (Ruiz et al. 2023) fine-tunes the whole network on the new images, and keeps the
  old classes by training on the model's own samples of them at the same time;
* LoRA (Hu et al. 2022, :mod:`diffusion_lib.adapters`) trains a low-rank update instead of the
  weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from diffusion_lib.losses import diffusion_loss
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.validation import check_number, check_positive_int, is_integer

TABLE = "label_embedding.weight"  # where conditional networks keep their label table


def add_classes(model: nn.Module, count: int = 1, init: Tensor | None = None) -> list[int]:
    """Give a conditional network ``count`` new classes, in place; returns their labels.

    The table (num_classes + 1, dim) becomes (num_classes + count + 1, dim): old rows keep their
    indices, the new rows get ``num_classes .. num_classes + count - 1`` and the null row moves
    to the end, where ``model.null_label`` (= the new ``num_classes``) finds it. ``init``
    (count, dim) sets the new rows; by default each is the mean of the old class rows, a
    neutral start in the middle of the classes the model knows.
    """
    count = check_positive_int("count", count)
    table = _label_table(model)
    classes, dim = table.num_embeddings - 1, table.embedding_dim
    weight = table.weight.detach()
    if init is None:
        init = weight[:classes].mean(dim=0, keepdim=True).expand(count, dim)
    elif not isinstance(init, Tensor) or init.shape != (count, dim):
        shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
        raise ValueError(
            f"init must be a tensor of shape ({count}, {dim}), one row per class; got {shape}"
        )
    larger = nn.Embedding(classes + count + 1, dim, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        larger.weight.copy_(torch.cat([weight[:classes], init.to(weight), weight[classes:]]))
    larger.weight.requires_grad_(table.weight.requires_grad)
    model.label_embedding = larger
    model.num_classes = classes + count
    return list(range(classes, classes + count))


@dataclass
class TextualInversion:
    """What :func:`learn_class_embedding` returns.

    Attributes:
        embedding: (dim,) the learned row, already written into the model's table.
        loss: the simplified loss of every step, one float each.
    """

    embedding: Tensor
    loss: list[float]


def learn_class_embedding(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: Tensor,
    label: int,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 5e-3,
    generator: torch.Generator | None = None,
) -> TextualInversion:
    """Textual inversion: fit the table row of ``label`` to ``images``, every weight frozen.

    Minimises Ho et al.'s simplified loss ``E ||eps - eps_theta(x_t, t, v)||^2`` over the row v
    alone (Gal et al. 2023, eq. 2, with the label row in place of a word's embedding), by Adam
    from the row's current value. The network is called through ``torch.func.functional_call``
    with a table in which only row ``label`` depends on v, so no weight of ``model`` receives a
    gradient or changes. At the end v is written into the table.

    Args:
        model: a conditional network with ``label_embedding``; ``label`` is usually a class
            :func:`add_classes` just made.
        schedule: the noise schedule the model was trained with, on the model's device.
        images: (N, C, H, W) the examples of the class, on the model's device, scaled like the
            training data. Each step draws ``batch_size`` of them with replacement.
        label: the row to learn, in 0..num_classes - 1.
        steps, batch_size, lr: Adam's steps, images per step and learning rate.
        generator: for the draws of images, timesteps and noise; on the CPU or the images' device.
    """
    table = _label_table(model)
    classes = table.num_embeddings - 1
    if not is_integer(label) or not 0 <= label < classes:
        raise ValueError(f"label must be a class of the model, 0..{classes - 1}; got {label!r}")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    lr = check_number("lr", lr, 0.0, low_open=True)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty batch (N, C, H, W); got {tuple(images.shape)}"
        )
    frozen = table.weight.detach()
    row = nn.Parameter(frozen[label].clone())
    optimizer = torch.optim.Adam([row], lr=lr)
    is_label = torch.arange(table.num_embeddings, device=frozen.device).unsqueeze(1) == label
    weights = {name: p.detach() for name, p in model.named_parameters()}

    def with_row(x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        table_with_row = torch.where(is_label, row.unsqueeze(0), frozen)
        return functional_call(model, {**weights, TABLE: table_with_row}, (x_t, t, labels))

    source = generator.device if generator is not None else images.device
    losses = []
    for _ in range(steps):
        picks = torch.randint(len(images), (batch_size,), device=source, generator=generator)
        picks = picks.to(images.device)
        labels = torch.full((batch_size,), label, device=images.device)
        loss = diffusion_loss(with_row, schedule, images[picks], labels=labels, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        table.weight[label] = row
    return TextualInversion(row.detach().clone(), losses)


def _label_table(model: nn.Module) -> nn.Embedding:
    table = getattr(model, "label_embedding", None)
    if not isinstance(table, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__} has no label table: build a conditional network, e.g. "
            "AttentionUNet(num_classes=10), whose label_embedding holds one row per class"
        )
    return table
