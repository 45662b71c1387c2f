"""Diffusion models conditioned on a caption: a tokenizer, a text encoder and cross-attention.

A caption y is split into words, each word becomes a token index, and a text encoder
``tau_theta`` turns the sequence into L token vectors. The U-net reads them through
cross-attention at its low resolutions (Rombach et al. 2022, sec. 3.3, eq. 3)::

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,
    Q = W_Q phi(x_t),   K = W_K tau_theta(y),   V = W_V tau_theta(y),

where ``phi(x_t)`` are the pixels of a feature map. Each pixel takes its own mixture of the
caption's tokens, so different parts of the image can follow different words. Pooling the
tokens into one vector first (``pooled=True``) gives every pixel the same message, as a
class embedding does; without positional embeddings (``positional=False``) the encoder sees
a bag of words and cannot tell "three left of seven" from "seven left of three".

The captions a model can be asked for form a table fixed at construction, and the model's
``labels`` index that table. The last row is the empty caption, the model's ``null_label``,
so :func:`~diffusion_lib.training.train` (``label_dropout``), classifier-free guidance and
every sampler of the library work unchanged. The encoder reads words, not rows: a caption
that was in the table but never in the training data can still be drawn, which is how
:mod:`diffusion_lib.digit_pairs` tests composition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffusion_lib.models.attention_unet import AttentionUNet
from diffusion_lib.models.embeddings import _check_labels
from diffusion_lib.validation import check_positive_int

PAD, PAD_INDEX = "<pad>", 0
START, START_INDEX = "<start>", 1


class CaptionVocabulary:
    """A word-level tokenizer for a closed vocabulary.

    Index 0 is padding and index 1 the start token that begins every caption, so even the
    empty caption has one token for the attention to read (as CLIP's start-of-text token).

    Args:
        words: the words captions may use, lower case, without spaces.
        max_length: the most words a caption may have; encoded captions have
            ``max_length + 1`` tokens.
    """

    def __init__(self, words: Sequence[str], max_length: int) -> None:
        words = [str(word) for word in words]
        problems = [w for w in words if not w or w != w.strip().lower() or " " in w]
        if problems:
            raise ValueError(f"words must be lower case and without spaces, got {problems}")
        if len(set(words)) != len(words) or {PAD, START} & set(words):
            raise ValueError(f"words must be distinct and must not be {PAD} or {START}")
        self.words = (PAD, START, *words)
        self.index = {word: i for i, word in enumerate(self.words)}
        self.max_length = check_positive_int("max_length", max_length)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, captions: Sequence[str]) -> Tensor:
        """Token indices (N, max_length + 1) int64: the start token, the words, padding."""
        if isinstance(captions, str):
            raise ValueError("encode takes a list of captions; wrap a single one as [caption]")
        tokens = torch.full((len(captions), self.max_length + 1), PAD_INDEX)
        for row, caption in enumerate(captions):
            words = caption.lower().split()
            unknown = sorted({w for w in words if w not in self.index})
            if unknown:
                raise ValueError(
                    f"caption {caption!r} uses words outside the vocabulary: {unknown}; "
                    f"known words: {', '.join(self.words[2:])}"
                )
            if len(words) > self.max_length:
                raise ValueError(
                    f"caption {caption!r} has {len(words)} words; at most {self.max_length}"
                )
            tokens[row, : len(words) + 1] = torch.tensor(
                [START_INDEX] + [self.index[w] for w in words]
            )
        return tokens

    def decode(self, tokens: Tensor) -> list[str]:
        """The captions (N,) of token indices (N, L), without start and padding tokens."""
        return [" ".join(self.words[i] for i in row if i > START_INDEX) for row in tokens.tolist()]


class CaptionEncoder(nn.Module):
    """``tau_theta``: token embeddings, learned positions and a pre-norm transformer encoder.

    A small transformer (Vaswani et al. 2017) trained with the diffusion model, as the
    text-to-image model of Rombach et al. (2022) does, in place of a large pretrained one.
    Padding tokens are masked out of its self-attention. With ``positional=False`` nothing
    tells the tokens' order apart: permuting the words permutes the outputs alike.

    Shapes: ``tokens`` (B, L) int64 -> ``(context, mask)``, (B, L, dim) and (B, L) bool,
    True for the tokens that are not padding.
    """

    def __init__(
        self,
        vocabulary_size: int,
        length: int,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        positional: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        if dim % check_positive_int("heads", heads):
            raise ValueError(f"heads={heads} must divide the text encoder's width dim={dim}")
        # Words and positions start at the same small scale (as GPT-2's), so that the order
        # is as visible to the first layer as the words are.
        self.token_embedding = nn.Embedding(
            check_positive_int("vocabulary_size", vocabulary_size), dim
        )
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.position_embedding = (
            nn.Parameter(0.02 * torch.randn(check_positive_int("length", length), dim))
            if positional
            else None
        )
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(
            layer, check_positive_int("layers", layers), enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        mask = tokens != PAD_INDEX
        h = self.token_embedding(tokens)
        if self.position_embedding is not None:
            h = h + self.position_embedding[: tokens.shape[1]]
        h = self.transformer(h, src_key_padding_mask=~mask)
        return self.norm(h), mask


def pool_tokens(context: Tensor, mask: Tensor) -> Tensor:
    """The mean of the non-padding tokens: (B, L, D), (B, L) bool -> (B, 1, D)."""
    weights = mask.to(context.dtype).unsqueeze(-1)
    return (context * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)


class TextConditionedUNet(nn.Module):
    """``eps_theta(x_t, t, y)`` for the captions ``y`` of a fixed table.

    An :class:`~diffusion_lib.models.attention_unet.AttentionUNet` with cross-attention (its
    ``context_dim``) reading a :class:`CaptionEncoder`'s tokens. ``labels[i]`` picks
    ``captions[labels[i]]``; ``labels`` None or ``null_label = len(captions)`` is the empty
    caption, which ``label_dropout`` trains for classifier-free guidance.

    Args:
        captions: the table of captions the model can be asked for.
        vocabulary: the tokenizer they are written in.
        pooled: cross-attend to the mean of the caption's tokens (one token) instead of the
            tokens themselves: global conditioning, for comparison.
        positional: give the text encoder positional embeddings; ``False`` makes it a bag
            of words.
        text_dim, text_layers, text_heads: width, depth and heads of the text encoder.
        **unet_options: the U-net's arguments (image size, widths, ...); not
            ``num_classes`` or ``context_dim``, which the captions set.

    Shapes: ``forward(x_t, t, labels=None)`` with ``x_t`` (B, C, H, W), ``t`` (B,) and
    ``labels`` (B,) int64 in 0..len(captions) -> (B, C, H, W).
    """

    def __init__(
        self,
        captions: Sequence[str],
        vocabulary: CaptionVocabulary,
        *,
        pooled: bool = False,
        positional: bool = True,
        text_dim: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        **unet_options,
    ) -> None:
        super().__init__()
        if isinstance(captions, str) or not len(captions):
            raise ValueError("captions must be a non-empty list of strings")
        given = sorted({"num_classes", "context_dim"} & set(unet_options))
        if given:
            raise ValueError(f"{', '.join(given)} are set by the captions; leave them out")
        if not isinstance(vocabulary, CaptionVocabulary):
            raise ValueError(
                f"vocabulary must be a CaptionVocabulary, got {type(vocabulary).__name__}"
            )
        self.vocabulary = vocabulary
        self.pooled = bool(pooled)
        # The table is not part of the weights: nothing learned depends on a caption's row.
        self.register_buffer("caption_tokens", vocabulary.encode([*captions, ""]), persistent=False)
        self.text_encoder = CaptionEncoder(
            len(vocabulary),
            vocabulary.max_length + 1,
            text_dim,
            text_layers,
            text_heads,
            positional,
        )
        self.unet = AttentionUNet(context_dim=text_dim, **unet_options)

    @property
    def num_classes(self) -> int:
        """The number of captions in the table."""
        return self.caption_tokens.shape[0] - 1

    @property
    def null_label(self) -> int:
        """The label of the empty caption, ``len(captions)``."""
        return self.num_classes

    @property
    def captions(self) -> list[str]:
        """The table of captions, without the empty one."""
        return self.vocabulary.decode(self.caption_tokens[:-1].cpu())

    def caption_rows(self, captions: Sequence[str]) -> Tensor:
        """The labels (N,) int64 of ``captions``, adding those not in the table to its end.

        The network reads words, not rows, so any caption in the vocabulary can be drawn.
        Adding captions moves the empty caption, and so ``null_label``, to the new end.
        """
        if isinstance(captions, str):
            raise ValueError("caption_rows takes a list of captions; wrap one as [caption]")
        table, wanted = self.captions, [" ".join(c.lower().split()) for c in captions]
        new = [c for c in dict.fromkeys(wanted) if c not in table]
        if new:
            tokens = self.vocabulary.encode(new).to(self.caption_tokens.device)
            rows = [self.caption_tokens[:-1], tokens, self.caption_tokens[-1:]]
            self.caption_tokens = torch.cat(rows)
            table = table + new
        index = {caption: row for row, caption in enumerate(table)}
        return torch.tensor([index[c] for c in wanted])

    def encode_captions(self, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """The context the U-net reads for ``labels`` (B,): (B, L, text_dim) tokens and their
        (B, L) mask, or with ``pooled`` their mean (B, 1, text_dim) and no mask."""
        context, mask = self.text_encoder(self.caption_tokens[labels])
        if self.pooled:
            return pool_tokens(context, mask), None
        return context, mask

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            labels = torch.full((x_t.shape[0],), self.null_label, device=x_t.device)
        elif not torch.compiler.is_compiling():
            _check_labels(labels, self.null_label, x_t.shape[0])
        context, mask = self.encode_captions(labels)
        return self.unet(x_t, t, context=context, context_mask=mask)
