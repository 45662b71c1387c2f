"""New classes for a trained conditional model: the enlarged label table and textual inversion."""

import pytest
import torch
from torch import nn

from diffusion_lib import AttentionUNet, DiffusionTransformer, NoiseSchedule
from diffusion_lib.personalization import add_classes, learn_class_embedding


def _conditional(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "unet":
        model = AttentionUNet(
            base_channels=8, num_res_blocks=1, attention_resolutions=(7,), num_classes=4
        )
        nn.init.normal_(model.output[2].weight, std=0.05)
    else:
        model = DiffusionTransformer(
            patch_size=7, hidden_size=32, depth=1, num_heads=2, num_classes=4
        )
        for parameter in model.parameters():  # adaLN-Zero starts at zero; wake every layer up
            nn.init.normal_(parameter, std=0.05)
    return model.double().eval()


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_add_classes_keeps_every_old_label(kind):
    model = _conditional(kind)
    x_t = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    t = torch.tensor([1, 100, 300, 500, 700, 999])
    old_labels = torch.tensor([0, 1, 2, 3, 4, 4])  # 4 is the null label
    before = model(x_t, t, old_labels)
    rows = model.label_embedding.weight.detach().clone()
    new = add_classes(model, count=2)
    assert new == [4, 5] and model.num_classes == 6 and model.null_label == 6
    assert model.label_embedding.weight.shape == (7, rows.shape[1])
    after = model(x_t, t, torch.tensor([0, 1, 2, 3, 6, 6]))  # the null label moved to 6
    torch.testing.assert_close(after, before)
    for label in new:
        torch.testing.assert_close(model.label_embedding.weight[label], rows[:4].mean(dim=0))


def test_add_classes_takes_initial_rows():
    model = _conditional("unet")
    init = torch.randn(1, model.label_embedding.embedding_dim, dtype=torch.float64)
    (label,) = add_classes(model, init=init)
    torch.testing.assert_close(model.label_embedding.weight[label], init[0])


class PointMassDenoiser(nn.Module):
    """The exact noise predictor for data that all sit at one value m: eps = (x_t - sqrt(abar) m)
    / sqrt(1 - abar), with m read from the label's row. ``extra`` is a weight that must stay."""

    def __init__(self, schedule: NoiseSchedule, classes: int) -> None:
        super().__init__()
        self.schedule = schedule
        self.num_classes = classes
        self.label_embedding = nn.Embedding(classes + 1, 1)
        self.extra = nn.Parameter(torch.ones(()))

    def forward(self, x_t, t, labels):
        alpha_bar = self.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        m = self.label_embedding(labels).view(-1, 1, 1, 1)
        return self.extra * (x_t - alpha_bar.sqrt() * m) / (1 - alpha_bar).sqrt()


def test_textual_inversion_finds_the_row_that_explains_the_images(linear):
    torch.manual_seed(0)
    model = PointMassDenoiser(linear, classes=3)
    others = {name: value.clone() for name, value in model.state_dict().items()}
    (label,) = add_classes(model)
    images = torch.full((5, 1, 4, 4), 0.7)  # all at m = 0.7, where the loss is zero
    result = learn_class_embedding(
        model, linear, images, label, steps=300, lr=0.05, generator=torch.Generator().manual_seed(1)
    )
    assert abs(result.embedding.item() - 0.7) < 0.01
    assert result.loss[-1] < 1e-3 < result.loss[0]
    assert model.label_embedding.weight[label].item() == result.embedding.item()
    # Nothing else moved, and no weight of the model received a gradient.
    torch.testing.assert_close(
        model.label_embedding.weight[:3], others["label_embedding.weight"][:3]
    )
    torch.testing.assert_close(model.label_embedding.weight[4], others["label_embedding.weight"][3])
    assert model.extra.item() == 1.0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, s, x: add_classes(m, count=0), "count"),
        (lambda m, s, x: add_classes(m, init=torch.zeros(2, 64)), "init must be a tensor of shape"),
        (lambda m, s, x: add_classes(AttentionUNet(base_channels=8), 1), "no label table"),
        (lambda m, s, x: learn_class_embedding(m, s, x, 4, steps=1), "label must be a class"),
        (lambda m, s, x: learn_class_embedding(m, s, x, -1, steps=1), "label must be a class"),
        (lambda m, s, x: learn_class_embedding(m, s, x, 1, steps=0), "steps"),
        (lambda m, s, x: learn_class_embedding(m, s, x[0], 1, steps=1), "images must be"),
        (lambda m, s, x: learn_class_embedding(m, s, x, 1, steps=1, lr=0.0), "lr"),
    ],
)
def test_errors(call, message, linear):
    model = AttentionUNet(
        base_channels=8, num_res_blocks=1, attention_resolutions=(7,), num_classes=4
    )
    with pytest.raises(ValueError, match=message):
        call(model, linear, torch.zeros(2, 1, 28, 28))
