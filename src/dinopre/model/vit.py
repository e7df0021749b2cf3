"""Vision Transformer backbone (ViT, Dosovitskiy et al. 2021) as used by DINO and iBOT.

This module stands alone (it imports nothing from dinopre) so that an exported backbone can be rebuilt from it or
a copy of it. It follows the DINO / timm layout (pre-norm blocks, fused qkv Linear, learned CLS token and position
embedding) with two choices made for the consumer of our exports (the translation pipeline's ViT):
- LayerNorm eps is 1e-5, PyTorch's default, which the translation pipeline's ViT uses; DINO's 1e-6 would make the
  exported features differ slightly.
- The fused qkv weight keeps rows ordered q|k|v, the layout of `nn.MultiheadAttention.in_proj_weight`.
Attention runs through `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU). iBOT's learned
mask token replaces masked patch embeddings before position embeddings are added (iBOT models/vision_transformer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BackboneOutput:
    """Named outputs of `VisionTransformer.forward_features`.

    Attributes:
        cls: (B, D) final-normed CLS token.
        patch_tokens: (B, N, D) final-normed patch tokens.
    """

    cls: torch.Tensor
    patch_tokens: torch.Tensor


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention and output projection from the (B, N, 3D) qkv projection."""
        B, N, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        qkv = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a linear layer in here: its dtype when enabled, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _NormLinear(torch.autograd.Function):
    """`linear(layer_norm(x))` that keeps only `x` (and the norm's statistics) for the backward pass.

    Plain autograd keeps the LayerNorm's input for the norm's backward and, again, its output (cast to bf16 under
    autocast) for the linear's weight gradient; the output is recomputed here from the input instead: one
    (tokens x D) activation fewer per norm, two per block. The norm runs in fp32 and the linear in the autocast
    dtype, as autocast would run them, and the gradients are the same ops on the same values as plain autograd's
    (tests/model/test_vit.py compares them bit for bit).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            normed, mean, rstd = torch.native_layer_norm(x, norm_weight.shape, norm_weight, norm_bias, eps)
            out = F.linear(normed.to(dtype), weight.to(dtype), bias.to(dtype))
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.eps, ctx.dtype = eps, dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            normed = torch.native_layer_norm(x, norm_weight.shape, norm_weight, norm_bias, ctx.eps)[0].to(ctx.dtype)
            grad_out = grad_out.to(ctx.dtype)
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_weight = flat_grad.t().mm(normed.reshape(-1, normed.shape[-1]))
            grad_bias = flat_grad.sum(0)
            grad_normed = grad_out.matmul(weight.to(ctx.dtype)).to(x.dtype)
            grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad_normed, x, norm_weight.shape, mean, rstd, norm_weight, norm_bias, [True, True, True])
        return (grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight.to(weight.dtype),
                grad_bias.to(weight.dtype))


# Devices where blocks fuse each norm with its linear layer in training. Recomputing the norms costs little on a
# GPU, where activation memory bounds the batch (W1: about 1.5 GiB fewer at batch 128), but it measured ~10 %
# slower per C1 step on a 2-core CPU, where memory is rarely the limit.
NORM_RECOMPUTE_DEVICES = frozenset({"cuda"})


def _saves_for_backward(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd will record this call (then the memory-saving functions are worth using)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


class _GeluLinear(torch.autograd.Function):
    """`linear(gelu(h), weight, bias)` that keeps only `h` for the backward pass and recomputes `gelu(h)` there.

    Plain autograd keeps both the fc1 output (for GELU's backward) and the GELU output (for fc2's weight gradient):
    two (tokens x 4D) tensors per block, the largest activations a ViT stores, about a fifth of all it saves for
    DINO's multi-crop step. Recomputing the GELU is one elementwise pass; the gradients are the same ops on the same
    values as plain autograd's (tests/model/test_vit.py compares them). The linear runs in `h`'s dtype, as autocast
    would run it (fc1 under autocast already returns the autocast dtype), with autocast off inside.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            out = F.linear(F.gelu(h), weight.to(h.dtype), bias.to(h.dtype))
        ctx.save_for_backward(h, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, weight = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            grad_out = grad_out.to(h.dtype)
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, D)
            gelu = F.gelu(h)
            grad_weight = flat_grad.t().mm(gelu.reshape(-1, gelu.shape[-1]))
            grad_bias = flat_grad.sum(0)
            grad_h = torch.ops.aten.gelu_backward(grad_out.matmul(weight.to(h.dtype)), h)
        return grad_h, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


class Mlp(nn.Module):
    """Two Linear layers with exact GELU between them (the GELU output is recomputed for backward, see
    `_GeluLinear`)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.fc1(x))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """fc2(gelu(h)) from the fc1 output `h`."""
        if not _saves_for_backward(h, self.fc2):
            return self.fc2(F.gelu(h))  # inference / the teacher: nothing to save
        return _GeluLinear.apply(h, self.fc2.weight, self.fc2.bias)


def drop_path(x: torch.Tensor, rate: float, training: bool, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Stochastic depth per sample (Huang et al. 2016): drop the residual branch of whole samples.

    Args:
        x: (B, ...) residual branch output.
        rate: probability of dropping a sample's branch.
        training: no-op outside training.
        uniform: (B,) numbers in [0, 1) that decide which rows keep their branch (`keyed_uniform`); None draws
            them from the global generator, which makes them depend on the process and the batch.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if uniform is None:
        mask = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep)
    else:
        mask = (uniform < keep).to(x.dtype).view(shape)
    return x * mask / keep


_MASK31 = 0x7FFFFFFF
_MIX = 0x45D9F3B  # a 32-bit integer hash's multiplier (below 2^27: products of 31-bit values fit in int64)


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """An elementwise integer hash of 31-bit int64 values onto 31-bit values (no product can overflow)."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * _MIX) & _MASK31
    return (x >> 16) ^ x


def keyed_uniform(keys: torch.Tensor, stream: int) -> torch.Tensor:
    """(R,) int64 keys -> (R,) float32 numbers in [0, 1), a pure function of (key, stream) on any device.

    Random numbers that belong to a row, not to a generator's state: with a sample's key, its drop path is the same
    in whatever process, batch or position the sample is (`dinopre.data.dataset.KeyedSample`). `stream` tells apart
    the draws of one row (each block's two branches).
    """
    x = _mix31((_mix31(keys & _MASK31) + stream * 0x9E3779B1) & _MASK31)
    return (x >> 7).to(torch.float32) / 2**24  # 24 bits: exact in float32, never 1


def row_keys(sample_keys: torch.Tensor, views: int, first_view: int = 0) -> torch.Tensor:
    """(B,) keys of the samples -> (views * B,) keys of their crop-major views `first_view`, `first_view + 1`, ..."""
    view = torch.arange(first_view + 1, first_view + views + 1, device=sample_keys.device)[:, None]
    return _mix31((sample_keys[None, :] & _MASK31) ^ _mix31(view)).flatten()


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, drop_keys: torch.Tensor | None = None, stream: int = 0) -> torch.Tensor:
        """x + attn(norm1(x)), then + mlp(norm2(x)); with `drop_keys` (per row), drop path draws
        `keyed_uniform(drop_keys, stream)` and `stream + 1` for the two branches."""
        attn_keep, mlp_keep = self._uniforms(drop_keys, stream)
        if x.device.type not in NORM_RECOMPUTE_DEVICES or not _saves_for_backward(x, self):
            x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training, attn_keep)
            return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training, mlp_keep)
        # Training: the same computation, each norm fused with the linear layer it feeds (see _NormLinear).
        qkv = _NormLinear.apply(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, self.attn.qkv.weight,
                                self.attn.qkv.bias)
        x = x + drop_path(self.attn.attend(qkv), self.drop_path_rate, self.training, attn_keep)
        hidden = _NormLinear.apply(x, self.norm2.weight, self.norm2.bias, self.norm2.eps, self.mlp.fc1.weight,
                                   self.mlp.fc1.bias)
        return x + drop_path(self.mlp.project(hidden), self.drop_path_rate, self.training, mlp_keep)

    def _uniforms(self, keys: torch.Tensor | None, stream: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if keys is None or self.drop_path_rate == 0.0 or not self.training:
            return None, None
        return keyed_uniform(keys, stream), keyed_uniform(keys, stream + 1)


class VisionTransformer(nn.Module):
    """ViT backbone returning the CLS embedding; accepts any input size that is a multiple of the patch size.

    Args:
        image_size: the size the position embedding is learned for (the global crop size).
        patch_size: side of a square patch in pixels.
        in_channels: input channels.
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of D.
        drop_path_rate: stochastic depth rate of the last block, linearly increasing from 0 at the first (DINO).
        use_mask_token: add iBOT's learned mask token (student only).
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        use_mask_token: bool = False,
    ) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.embed_dim = image_size, patch_size, embed_dim
        self.grid_size = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, embed_dim))
        # dino vision_transformer.py: stochastic depth rate grows linearly over depth.
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None
        self._init_weights()

    def _init_weights(self) -> None:
        # DINO / timm init: trunc-normal(0.02) for Linear weights, position embedding and CLS token.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def interpolate_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Position embedding for a (height x width) token grid; bicubic resampling of the learned grid.

        Resizing to an explicit target size avoids the float scale-factor off-by-one that dino#8 patched.

        Returns:
            (1, 1 + height*width, D) position embedding.
        """
        if height == self.grid_size and width == self.grid_size:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, height, width)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed, apply the mask token, prepend CLS and add position embeddings.

        Args:
            x: (B, C, H, W) images.
            masks: optional (B, N) bool, True where the patch is replaced by the mask token.

        Returns:
            (B, 1 + N, D) tokens.
        """
        B, _, H, W = x.shape
        tokens = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("This backbone has no mask token; build it with use_mask_token=True.")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        return tokens + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                         drop_keys: torch.Tensor | None = None) -> BackboneOutput:
        """Run the backbone and return the normed CLS and patch tokens (drop path keyed by `drop_keys`, one per
        image, when given: `row_keys`)."""
        tokens = self.prepare_tokens(x, masks)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, drop_keys, 2 * i)
        tokens = self.norm(tokens)
        return BackboneOutput(cls=tokens[:, 0], patch_tokens=tokens[:, 1:])

    def forward(self, x: torch.Tensor, drop_keys: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images -> (B, D) CLS embeddings."""
        # Without keys, the call `forward_features` always got (what wrappers of it, compiled or not, expect).
        features = self.forward_features(x) if drop_keys is None else self.forward_features(x, drop_keys=drop_keys)
        return features.cls


def resample_pos_embed(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (1, 1 + g*g, D) position embedding of a square g x g grid resampled to (height x width) patches, bicubic;
    the CLS position is kept. `VisionTransformer` does this on the fly and `dinopre convert --image-size` once, with
    the same operations, so both give the same embedding.

    Returns:
        (1, 1 + height*width, D) position embedding.
    """
    grid_size = math.isqrt(pos_embed.shape[1] - 1)
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    grid = patch_pos.reshape(1, grid_size, grid_size, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
    patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, height * width, -1)  # (1, h*w, D)
    return torch.cat([cls_pos, patch_pos], dim=1)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())

