"""Tests of the ViT backbone (model.vit): shapes, position embedding resizing, the export layout, drop path, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinopre.model.vit import BackboneOutput, VisionTransformer, count_parameters, drop_path

D, DEPTH, HEADS, PATCH, SIZE = 32, 2, 2, 8, 32


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_vit(seed: int = 0, **kwargs: object) -> VisionTransformer:
    """A 32 px, patch-8 ViT with 2 blocks of width 32 (4x4 token grid)."""
    torch.manual_seed(seed)
    options = dict(image_size=SIZE, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    options.update(kwargs)
    return VisionTransformer(**options)  # type: ignore[arg-type]


def images(batch: int, size: int = SIZE, width: int | None = None, seed: int = 1) -> torch.Tensor:
    """Random normalised images (batch, 3, size, width or size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, width or size, generator=generator)


def randomise(model: nn.Module, seed: int = 2, std: float = 0.3) -> None:
    """Replace every parameter by large random values so that attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def reference_features(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """A ViT forward built from stock PyTorch modules loaded with the model's weights (the export mapping).

    qkv.weight/bias -> MultiheadAttention.in_proj_weight/bias (rows q|k|v), proj -> out_proj, LayerNorm eps 1e-5.
    Returns (B, 1 + N, D) final-normed tokens.
    """
    with torch.no_grad():
        tokens = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=PATCH)
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + model.pos_embed
        for block in model.blocks:
            norm1, norm2 = nn.LayerNorm(D), nn.LayerNorm(D)  # PyTorch default eps 1e-5
            norm1.load_state_dict(block.norm1.state_dict())
            norm2.load_state_dict(block.norm2.state_dict())
            attention = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
            attention.in_proj_weight.copy_(block.attn.qkv.weight)
            attention.in_proj_bias.copy_(block.attn.qkv.bias)
            attention.out_proj.weight.copy_(block.attn.proj.weight)
            attention.out_proj.bias.copy_(block.attn.proj.bias)
            h = norm1(tokens)
            tokens = tokens + attention(h, h, h, need_weights=False)[0]
            h = F.gelu(F.linear(norm2(tokens), block.mlp.fc1.weight, block.mlp.fc1.bias))
            tokens = tokens + F.linear(h, block.mlp.fc2.weight, block.mlp.fc2.bias)
        final = nn.LayerNorm(D)
        final.load_state_dict(model.norm.state_dict())
        return final(tokens)


# ----------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size,tokens", [(32, 16), (16, 4), (48, 36)])
def test_output_shapes_native_and_other_sizes(size: int, tokens: int) -> None:
    """forward gives (B, D); forward_features gives CLS (B, D) and (B, (size/8)^2, D) patch tokens."""
    model = tiny_vit().eval()
    x = images(3, size)
    out = model(x)
    features = model.forward_features(x)
    assert out.shape == (3, D)
    assert isinstance(features, BackboneOutput)
    assert features.cls.shape == (3, D) and features.patch_tokens.shape == (3, tokens, D)
    assert torch.equal(out, features.cls)
    assert torch.isfinite(features.patch_tokens).all()


def test_non_square_input() -> None:
    """A 16 x 24 input gives a 2 x 3 grid of patch tokens."""
    features = tiny_vit().eval().forward_features(images(2, 16, width=24))
    assert features.patch_tokens.shape == (2, 6, D)


def test_pos_embed_at_native_size_is_the_parameter() -> None:
    """At the learned grid size no resampling happens: the parameter itself is returned."""
    model = tiny_vit()
    assert model.interpolate_pos_embed(4, 4) is model.pos_embed
    assert model.pos_embed.shape == (1, 1 + 16, D)


def test_pos_embed_interpolation_keeps_cls_and_orientation() -> None:
    """Resampling keeps the CLS position, preserves constants and keeps rows as rows (height first)."""
    model = tiny_vit()
    with torch.no_grad():
        rows = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1).expand(4, 4, D)  # value = row index
        model.pos_embed[:, 1:] = rows.reshape(1, 16, D)
    resized = model.interpolate_pos_embed(2, 3)
    assert resized.shape == (1, 1 + 6, D)
    assert torch.equal(resized[:, 0], model.pos_embed[:, 0])
    grid = resized[0, 1:].reshape(2, 3, D)
    assert torch.allclose(grid, grid[:, :1].expand(2, 3, D), atol=1e-6)  # constant along each row
    assert (grid[1, 0] > grid[0, 0]).all()  # and increasing down the rows
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.7
    torch.testing.assert_close(model.interpolate_pos_embed(3, 5)[:, 1:], torch.full((1, 15, D), 0.7))


def test_small_crop_uses_interpolated_pos_embed() -> None:
    """A 16 px crop's tokens are patch embeddings + the 2 x 2 resampled position embedding."""
    model = tiny_vit()
    x = images(2, 16)
    tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], 1)
    expected = tokens + model.interpolate_pos_embed(2, 2)
    assert torch.equal(model.prepare_tokens(x), expected)


# ----------------------------------------------------------------------------------- the export mapping


@pytest.mark.parametrize("size", [32, 16])
def test_features_equal_stock_pytorch_reference(size: int) -> None:
    """The forward equals nn.MultiheadAttention + nn.LayerNorm(eps 1e-5) loaded with qkv (q|k|v) / proj weights."""
    model = tiny_vit().eval()
    randomise(model)
    x = images(3, size)
    with torch.no_grad():
        features = model.forward_features(x)
        pos = model.interpolate_pos_embed(size // PATCH, size // PATCH)
        native_pos = model.pos_embed.data.clone()
        model.pos_embed.data = pos.detach().clone()  # the reference adds model.pos_embed as is
        try:
            expected = reference_features(model, x)
        finally:
            model.pos_embed.data = native_pos
    torch.testing.assert_close(features.cls, expected[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(features.patch_tokens, expected[:, 1:], rtol=0, atol=1e-5)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))


def test_reference_would_notice_a_qkv_order_change() -> None:
    """Control: swapping the q and k rows changes the features by far more than the tolerance above."""
    model = tiny_vit().eval()
    randomise(model)
    x = images(2)
    with torch.no_grad():
        before = model(x)
        qkv = model.blocks[0].attn.qkv.weight
        qkv.copy_(torch.cat([qkv[D:2 * D], qkv[:D], qkv[2 * D:]]))
        after = model(x)
    assert (before - after).abs().max() > 1e-3


# ----------------------------------------------------------------------------------- drop path


def test_drop_path_rates_grow_linearly_over_depth() -> None:
    """dino: block i gets rate i / (depth - 1) * drop_path_rate."""
    model = tiny_vit(depth=3, drop_path_rate=0.2)
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_drop_path_eval_deterministic_train_stochastic() -> None:
    """Eval mode ignores drop path (same output twice); train mode with rate > 0 differs between calls."""
    model = tiny_vit(drop_path_rate=0.5)
    randomise(model)
    x = images(8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(3)
        first, second = model(x), model(x)
    assert not torch.equal(first, second)


def test_zero_drop_path_train_equals_eval() -> None:
    """With rate 0, train and eval mode give identical outputs."""
    model = tiny_vit(drop_path_rate=0.0)
    randomise(model)
    x = images(4)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert torch.equal(train_out, eval_out)


def test_drop_path_drops_whole_samples_and_rescales() -> None:
    """Each sample's branch is either zeroed or scaled by 1 / keep (expectation preserved)."""
    torch.manual_seed(0)
    x = torch.ones(64, 5, 3)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.reshape(64, -1)
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))  # constant within a sample
    kept = per_sample[:, 0]
    assert torch.all((kept == 0) | torch.isclose(kept, torch.tensor(1 / 0.75)))
    assert (kept == 0).any() and (kept > 0).any()
    assert drop_path(x, 0.25, training=False) is x


# ----------------------------------------------------------------------------------- mask token


def test_mask_token_replaces_masked_patches_before_position_embedding() -> None:
    """Masked positions hold the mask token (+ position), unmasked ones the patch embedding (+ position)."""
    model = tiny_vit(use_mask_token=True)
    with torch.no_grad():
        model.mask_token.copy_(torch.randn(1, D))
    x = images(3)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[0, [0, 5, 15]] = True
    masks[2, :8] = True
    patches = model.patch_embed(x)
    pre_positional = torch.where(masks.unsqueeze(-1), model.mask_token.expand(3, 16, D), patches)
    assert torch.equal(pre_positional[masks], model.mask_token.expand(int(masks.sum()), D))
    assert torch.equal(pre_positional[~masks], patches[~masks])
    expected = torch.cat([model.cls_token.expand(3, -1, -1), pre_positional], 1) + model.pos_embed
    tokens = model.prepare_tokens(x, masks)
    assert torch.equal(tokens, expected)
    unmasked = model.prepare_tokens(x)
    assert torch.equal(tokens[:, 1:][~masks], unmasked[:, 1:][~masks])
    assert not torch.equal(tokens[:, 1:][masks], unmasked[:, 1:][masks])


def test_all_false_mask_equals_no_mask() -> None:
    """An all-False mask changes nothing."""
    model = tiny_vit(use_mask_token=True).eval()
    with torch.no_grad():
        model.mask_token.copy_(torch.randn(1, D))
    x = images(2)
    with torch.no_grad():
        masked = model.forward_features(x, torch.zeros(2, 16, dtype=torch.bool))
        plain = model.forward_features(x)
    assert torch.equal(masked.cls, plain.cls) and torch.equal(masked.patch_tokens, plain.patch_tokens)


def test_masks_without_mask_token_raise() -> None:
    """A backbone built without a mask token refuses masks instead of ignoring them."""
    model = tiny_vit()
    assert model.mask_token is None
    with pytest.raises(ValueError, match="mask token"):
        model.forward_features(images(1), torch.ones(1, 16, dtype=torch.bool))


# ----------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("size", [32, 16])
def test_every_parameter_gets_a_finite_gradient(size: int) -> None:
    """A loss on CLS and patch tokens reaches every parameter (mask token included when masks are used)."""
    model = tiny_vit(use_mask_token=True, drop_path_rate=0.1).train()
    x = images(2, size)
    masks = torch.zeros(2, (size // PATCH) ** 2, dtype=torch.bool)
    masks[:, 1] = True
    features = model.forward_features(x, masks)
    weights = torch.randn(features.patch_tokens.shape, generator=torch.Generator().manual_seed(0))
    loss = (features.patch_tokens * weights).sum() + features.cls.square().sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if not name.endswith("attn.qkv.bias"):  # the key bias has an exactly-zero gradient (softmax shift)
            assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(features.cls).all()


def test_count_parameters() -> None:
    """count_parameters sums numel over all parameters."""
    model = tiny_vit()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(nn.Linear(3, 4)) == 16


# ----------------------------------------------------------------------------------- activation memory


def _saved_bytes(fn, module: nn.Module) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs, beyond `module`'s own parameters."""
    storages: dict[int, int] = {}
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _bytes_saved_versus_plain(module: nn.Module, plain, autocast: bool) -> int:
    """Run `module` and the plain-autograd `plain` on the same input and output gradient; assert their outputs and
    every gradient are equal bit for bit, and return how many fewer bytes `module` keeps for backward."""
    torch.manual_seed(1)
    x = torch.randn(3, 7, 16)
    grad = torch.randn(3, 7, 16)
    results, saved = {}, {}
    for name, forward in (("ours", module), ("plain", plain)):
        module.zero_grad()
        inp = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            saved[name] = _saved_bytes(lambda: results.__setitem__(name, forward(inp)), module)
        (results[name].float() * grad).sum().backward()
        results[name + "_grads"] = [inp.grad] + [p.grad.clone() for p in module.parameters()]
    assert torch.equal(results["ours"], results["plain"])
    assert all(torch.equal(a, b) for a, b in zip(results["ours_grads"], results["plain_grads"], strict=True))
    return saved["plain"] - saved["ours"]


@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_gradients_are_plain_autograd_s_with_the_gelu_output_not_kept(autocast: bool) -> None:
    """The MLP recomputes GELU in backward: outputs and all gradients equal plain autograd's bit for bit (fp32 and
    bf16 autocast), and it keeps one (tokens x hidden) activation fewer."""
    from dinopre.model.vit import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    fewer = _bytes_saved_versus_plain(mlp, lambda t: mlp.fc2(F.gelu(mlp.fc1(t))), autocast)
    hidden_bytes = 3 * 7 * 64 * (2 if autocast else 4)  # the GELU output
    fc2_cast = 16 * 64 * 2 if autocast else 0  # autocast's bf16 copy of fc2's weight; ours refers to the parameter
    assert fewer == hidden_bytes + fc2_cast


@pytest.mark.parametrize("autocast", [False, True])
def test_training_blocks_give_plain_autograd_s_gradients_and_keep_less(autocast: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """In training (on a GPU; here forced on the CPU) a block fuses each LayerNorm with the linear layer it feeds and
    recomputes the norm's output in backward: output and every gradient equal plain autograd's bit for bit (fp32
    and bf16 autocast), and it keeps two (tokens x D) activations and one (tokens x 4D) activation fewer."""
    from dinopre.model import vit
    from dinopre.model.vit import Block

    monkeypatch.setattr(vit, "NORM_RECOMPUTE_DEVICES", frozenset({"cpu"}))
    torch.manual_seed(0)
    block = Block(16, 2, 4.0, drop_path_rate=0.0).train()

    def plain(t: torch.Tensor) -> torch.Tensor:
        t = t + block.attn(block.norm1(t))
        return t + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(t))))

    fewer = _bytes_saved_versus_plain(block, plain, autocast)
    element = 2 if autocast else 4
    weight_casts = (16 * 48 + 16 * 64 + 64 * 16) * 2 if autocast else 0  # autocast's bf16 copies of qkv/fc1/fc2
    assert fewer == (2 * 3 * 7 * 16 + 3 * 7 * 64) * element + weight_casts


def test_blocks_give_the_same_output_with_and_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without autograd (the teacher, exports) a block runs the ordinary modules, with it the fused functions: the
    output is the same."""
    from dinopre.model import vit
    from dinopre.model.vit import Block

    monkeypatch.setattr(vit, "NORM_RECOMPUTE_DEVICES", frozenset({"cpu"}))
    torch.manual_seed(0)
    block = Block(16, 2, 4.0, drop_path_rate=0.0).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fused_free = block(x)
    with torch.enable_grad():
        trained = block(x.clone().requires_grad_())
    assert torch.equal(fused_free, trained.detach())


@pytest.mark.slow
def test_fused_blocks_compile_to_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile` traces the fused norm and GELU functions (the GPU path, forced here on the CPU): compiled and
    eager give the same output and gradients up to float rounding."""
    from dinopre.model import vit
    from dinopre.model.vit import Block

    monkeypatch.setattr(vit, "NORM_RECOMPUTE_DEVICES", frozenset({"cpu"}))
    torch.manual_seed(0)
    block = Block(16, 2, 4.0, drop_path_rate=0.0).train()
    x = torch.randn(2, 5, 16)
    grads = []
    for forward in (block, torch.compile(block)):
        block.zero_grad()
        inp = x.clone().requires_grad_()
        out = forward(inp)
        out.square().sum().backward()
        grads.append([out.detach(), inp.grad] + [p.grad.clone() for p in block.parameters()])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- keyed drop path

def test_keyed_uniforms_are_a_function_of_key_and_stream_and_uniform() -> None:
    from dinopre.model.vit import keyed_uniform

    keys = torch.arange(200_000, dtype=torch.int64) * 7919
    u = keyed_uniform(keys, 3)
    assert torch.equal(u, keyed_uniform(keys, 3)) and u.dtype == torch.float32
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float((u < 0.9).float().mean()) - 0.9) < 0.005
    assert float((u == keyed_uniform(keys, 4)).float().mean()) < 0.001  # each block and branch draws anew
    assert torch.equal(keyed_uniform(keys[5:9], 3), u[5:9])  # a row's number does not depend on the others


def test_keyed_drop_path_gives_a_sample_the_same_masks_in_any_batch() -> None:
    """What lets 1 and N processes train alike: each process holds a slice of the batch, and a sample's drop path
    must not depend on which slice (the process's generator would give the halves other masks)."""
    from dinopre.model.vit import row_keys

    model = tiny_vit(drop_path_rate=0.5, depth=4).train()
    randomise(model)
    x, keys = images(8), torch.arange(8, dtype=torch.int64) * 1_000_003
    with torch.no_grad():
        whole = model(x, drop_keys=row_keys(keys, 1))
        halves = torch.cat([model(x[:4], drop_keys=row_keys(keys[:4], 1)),
                            model(x[4:], drop_keys=row_keys(keys[4:], 1))])
        unkeyed = model(x)
    assert torch.allclose(whole, halves, atol=1e-6)
    assert not torch.allclose(whole, unkeyed, atol=1e-3)  # drop path did drop branches
    assert not torch.allclose(whole, model.eval()(x), atol=1e-3)
    views = row_keys(keys, 3, first_view=2)
    assert views.shape == (24,) and torch.equal(views[8:16], row_keys(keys, 1, first_view=3))
