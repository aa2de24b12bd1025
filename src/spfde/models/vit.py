"""A small Vision Transformer (Dosovitskiy et al. 2021) for CPU-scale runs, in two attention flavours.

What: a ``patch_size`` x ``patch_size`` convolutional patch embedding (:class:`PatchEmbed`, an
``nn.Conv2d`` computed as a matmul), a learnable class token and
position embedding (root-level parameters), ``depth`` pre-norm encoder blocks (LayerNorm ->
multi-head self-attention -> residual, LayerNorm -> GELU MLP -> residual), a final LayerNorm and a
linear head on the class token (the norm runs on that token alone). Sized for 28x28 / 32x32 images
on two CPU cores.

Flavours (same parameters in the same layout, so the same seed gives the same function):

* ``vit_tiny``: attention on ``nn.MultiheadAttention`` (a fused ``in_proj_weight`` and an
  ``out_proj`` the module calls functionally), the case a FLOPs ledger built on module hooks
  misses;
* ``vit_tiny_sdpa``: a ``qkv`` linear, ``F.scaled_dot_product_attention`` and a ``proj`` linear,
  as timm writes it.

Freezing blocks: ``patch_embed`` (with ``cls_token`` and ``pos_embed``, root parameters that join
the first block), ``layers.0`` ... ``layers.{depth-1}``, ``norm``, ``head``. A different image size
resamples the position embedding's grid (bicubic), so one model serves 28x28 and 32x32 inputs.

Init (timm's): truncated normal (std 0.02) for the tokens and every linear/attention weight, zero
biases, PyTorch's default for the patch convolution; drawn from one generator seeded by the global
RNG, so ``torch.manual_seed`` makes both flavours bit-identical.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spfde.models.common import BlockModel, scale_channels
from spfde.models.registry import register_model
from spfde.sparsity.kernels.attention import prenorm_attention
from spfde.sparsity.kernels.mlp import mlp_act, prenorm_mlp


class PatchEmbed(nn.Conv2d):
    """The patch embedding: an ``nn.Conv2d`` with stride = kernel (its parameters, state dict and
    module hooks), computed as one matmul of the non-overlapping patches with the flattened kernel.
    Why: on CPU oneDNN's convolution takes about twice as long, forward + backward, at the ViT
    preset's shape (1 -> 64 channels, 7x7, 128 images: 0.5 of 1 ms), time a dense and a sparse
    run share (issue 13). The output is the convolution's (N, C, H', W'), a view of the matmul's
    (N, H'W', C) tokens."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int) -> None:
        super().__init__(in_channels, out_channels, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # not a batch of images: the convolution's own handling (and errors)
            return super().forward(x)
        b, c, h, w = x.shape
        p = self.stride[0]
        gh, gw = h // p, w // p  # a remainder past the last whole patch is dropped, as by the convolution
        patches = x[..., : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        tokens = F.linear(patches.reshape(b, gh * gw, c * p * p), self.weight.reshape(self.out_channels, -1),
                          self.bias)
        return tokens.transpose(1, 2).reshape(b, self.out_channels, gh, gw)


class Attention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention`` (timm layout: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2`` (the parameter names of the ``nn.Sequential`` it replaces). Its
    forward goes through :func:`~spfde.sparsity.kernels.mlp.mlp_act`: with both Linears sparse the
    three run as one native call, with only ``fc1`` sparse the GELU is fused into its kernel;
    otherwise it is exactly ``fc2(act(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_act(self.fc1, self.act, self.fc2, x)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        # nn.MultiheadAttention's in_proj_weight is Attention's qkv.weight, out_proj its proj
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True) if attn == "mha" else Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the pre-norms and residuals go with their sublayers: where those run as one fused sparse call,
        # the norm and the add run inside it (prenorm_attention, prenorm_mlp); otherwise this is
        # x + attn(norm1(x)), then x + mlp(norm2(x))
        if isinstance(self.attn, nn.MultiheadAttention):
            x = prenorm_attention(self.norm1, self.attn, x, residual=True)
        else:
            x = x + self.attn(self.norm1(x))
        return prenorm_mlp(self.norm2, self.mlp, x, residual=True)


class VisionTransformer(BlockModel):
    """Pre-norm ViT; ``attn`` is ``"mha"`` (``nn.MultiheadAttention``) or ``"sdpa"``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, embed_dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0, patch_size: int = 7, image_size: int = 28,
                 attn: str = "mha") -> None:
        super().__init__()
        if attn not in ("mha", "sdpa"):
            raise ValueError(f"attn must be 'mha' or 'sdpa', got {attn!r}")
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of heads {heads}")
        seed = int(torch.randint(0, 2**62, (1,)))  # before any layer draws: both flavours see one stream
        self.grid = image_size // patch_size
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, embed_dim))
        # "layers", not timm's "blocks": the name is taken by the blocks() method every registry model has
        self.layers = nn.ModuleList(EncoderBlock(embed_dim, heads, mlp_ratio, attn) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self._block_names = ["patch_embed", *(f"layers.{i}" for i in range(depth)), "norm", "head"]
        self._init(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def _init(self, g: torch.Generator) -> None:
        bound = 1 / math.sqrt(self.patch_embed.weight[0].numel())  # PyTorch's conv default
        self.patch_embed.weight.uniform_(-bound, bound, generator=g)
        self.patch_embed.bias.uniform_(-bound, bound, generator=g)
        nn.init.trunc_normal_(self.cls_token, std=0.02, generator=g)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=g)
        for blk in self.layers:
            a = blk.attn
            mha = isinstance(a, nn.MultiheadAttention)
            qkv = (a.in_proj_weight, a.in_proj_bias) if mha else (a.qkv.weight, a.qkv.bias)
            proj = a.out_proj if mha else a.proj
            for w, b in (qkv, (proj.weight, proj.bias), (blk.mlp.fc1.weight, blk.mlp.fc1.bias),
                         (blk.mlp.fc2.weight, blk.mlp.fc2.bias)):
                nn.init.trunc_normal_(w, std=0.02, generator=g)
                b.zero_()
        nn.init.trunc_normal_(self.head.weight, std=0.02, generator=g)
        self.head.bias.zero_()

    def _pos(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == (self.grid, self.grid):
            return self.pos_embed
        cls, rest = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        rest = rest.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        rest = F.interpolate(rest, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls, rest.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self._pos(grid)
        for blk in self.layers:
            x = blk(x)
        # the class token alone through the final norm: the norm is per token and the head reads only
        # that one (timm norms every token first; a sixteenth of the work, forward and backward)
        return self.head(self.norm(x[:, 0]))


def _dim(width: float, heads: int = 4) -> int:
    return max(heads, heads * round(scale_channels(64, width) / heads))


@register_model("vit_tiny", input_size=(1, 28, 28))
def vit_tiny(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> VisionTransformer:
    """ViT, 7x7 patches, 4 pre-norm blocks of 64·width dims, 4 heads, on nn.MultiheadAttention."""
    return VisionTransformer(num_classes, in_channels, embed_dim=_dim(width), attn="mha")


@register_model("vit_tiny_sdpa", input_size=(1, 28, 28))
def vit_tiny_sdpa(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> VisionTransformer:
    """ViT, 7x7 patches, 4 pre-norm blocks of 64·width dims, 4 heads, on F.scaled_dot_product_attention."""
    return VisionTransformer(num_classes, in_channels, embed_dim=_dim(width), attn="sdpa")
