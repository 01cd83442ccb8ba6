"""Vision Transformer: Dosovitskiy et al. (2021), "An Image is Worth 16x16 Words: Transformers
for Image Recognition at Scale".

Non-overlapping patches embedded linearly, a class token, learned position embeddings, a stack
of pre-LayerNorm encoder blocks (multi-head self-attention, GELU MLP), a final LayerNorm and a
linear classifier on the class token. Sizes: Ti/S from Touvron et al. (2021, DeiT), B/L from
Table 1 of the paper.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

_dense_init = dict(
    kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(1e-6)
)


def _check_divisible(size: int, patch_size: int, what: str) -> None:
    if size % patch_size:
        raise ValueError(f"{what}={size} is not divisible by model.patch_size={patch_size}")


def resize_position_embedding(
    posemb: jnp.ndarray, grid: tuple[int, int], num_prefix_tokens: int = 1
) -> jnp.ndarray:
    """Resizes learned position embeddings [1, prefix + h*w, D] to a `grid` of patches.

    The patch part is interpolated bilinearly as an image of h x w (h = w: trained grids are
    square); the class-token part is kept. Returns `posemb` itself when the grid is unchanged, so
    it can be applied unconditionally, e.g. when loading a checkpoint for another image size.
    """
    prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"position embedding of {patches.shape[1]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return posemb
    patches = patches.reshape(side, side, -1)
    patches = jax.image.resize(patches, (*grid, patches.shape[-1]), method="bilinear")
    patches = patches.reshape(1, grid[0] * grid[1], -1).astype(posemb.dtype)
    return jnp.concatenate([prefix, patches], axis=1)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        y = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dropout_rate=self.attention_dropout_rate,
            deterministic=not train,
            name="attention",
            **_dense_init,
        )(y)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in", **_dense_init)(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.Dense(x.shape[-1], name="mlp_out", **_dense_init)(y)
        return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class ViT(nn.Module):
    """Vision Transformer classifier.

    Position embeddings are learned for `image_size`; applied to other sizes (any multiple of
    `patch_size`, e.g. 32x32 images), they are resized by `resize_position_embedding`. `norm` is
    a field for the registry's sake: a ViT only has LayerNorm.
    """

    num_classes: int
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    # big_vision's default: a zero head starts at uniform predictions, good for fine-tuning too.
    head_zero_init: bool = True
    norm: str = "layer"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.norm != "layer":
            raise ValueError(f"model.norm={self.norm!r} is not supported by ViT; allowed: layer")
        _check_divisible(self.image_size, self.patch_size, "model.image_size")
        height, width = x.shape[1:3]
        _check_divisible(height, self.patch_size, "input image height")
        _check_divisible(width, self.patch_size, "input image width")

        x = nn.Conv(
            self.hidden_size,
            (self.patch_size, self.patch_size),
            strides=self.patch_size,
            padding="VALID",
            name="patch_embedding",
        )(x)
        batch, grid_h, grid_w, _ = x.shape
        x = x.reshape(batch, grid_h * grid_w, self.hidden_size)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.hidden_size)), x], axis=1)

        trained_grid = self.image_size // self.patch_size
        posemb = self.param(
            "pos_embedding",
            nn.initializers.normal(0.02),
            (1, 1 + trained_grid**2, self.hidden_size),
        )
        x = x + resize_position_embedding(posemb, (grid_h, grid_w))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

        for index in range(self.depth):
            x = EncoderBlock(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                self.attention_dropout_rate,
                name=f"block{index}",
            )(x, train=train)
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        head_init = (
            nn.initializers.zeros if self.head_zero_init else nn.initializers.xavier_uniform()
        )
        return nn.Dense(self.num_classes, kernel_init=head_init, name="classifier")(x[:, 0])


ViTTi16 = functools.partial(ViT, hidden_size=192, depth=12, num_heads=3, mlp_dim=768)
ViTS16 = functools.partial(ViT, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536)
ViTB16 = functools.partial(ViT, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072)
ViTL16 = functools.partial(ViT, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096)
