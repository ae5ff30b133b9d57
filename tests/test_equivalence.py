"""DESIGN.md 4.1 and 4.2: the patched model equals the stock model where it must, and a dense reference where
every high-res token is selected."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

from hf_flexattention import patch_model, projections
from hf_flexattention.tiny import build_tiny_llava


BACKBONES = ["llama", "mistral", "qwen2"]
# fp32 on CPU: the patched path runs the same kernels on the same inputs for the plain rows, so differences are
# rounding only (observed ~1e-7); 1e-5 is the contract of DESIGN.md 4.1.
ATOL = 1e-5


def stock_and_patched(backbone="llama", attn_implementation="sdpa", **patch_kwargs):
    stock = build_tiny_llava(backbone, attn_implementation=attn_implementation)
    patched = patch_model(copy.deepcopy(stock), **{"n_fa": 2, **patch_kwargs})
    return stock, patched


def logits(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra).logits


@pytest.mark.parametrize("backbone", BACKBONES)
def test_without_high_res_input_logits_equal_stock(backbone, batch_inputs):
    stock, patched = stock_and_patched(backbone)
    inputs = {k: v for k, v in batch_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")}
    torch.testing.assert_close(logits(patched, inputs), logits(stock, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_inert_patch_equals_stock(backbone, batch_inputs):
    stock, patched = stock_and_patched(backbone, n_fa=0)
    assert not any(hasattr(layer.self_attn, "hr_k_proj") for layer in patched.model.language_model.layers)
    stock_inputs = {
        k: v for k, v in batch_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")
    }
    torch.testing.assert_close(logits(patched, batch_inputs), logits(stock, stock_inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_empty_selection_equals_stock(backbone, batch_inputs):
    stock, patched = stock_and_patched(backbone, selection="random", random_p=0.0)
    stock_inputs = {
        k: v for k, v in batch_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")
    }
    trace = []
    got = logits(patched, batch_inputs, flex_trace=trace)
    assert trace and all(int(counts.sum()) == 0 for _, counts in trace)
    torch.testing.assert_close(got, logits(stock, stock_inputs), atol=ATOL, rtol=0)


def test_high_res_changes_only_the_high_res_rows(single_inputs):
    stock, patched = stock_and_patched()
    stock_inputs = {
        k: v for k, v in single_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")
    }
    got, want = logits(patched, single_inputs), logits(stock, stock_inputs)
    torch.testing.assert_close(got[:, :-1], want[:, :-1], atol=ATOL, rtol=0)
    assert (got[:, -1] - want[:, -1]).abs().max() > 1e-3


# --- A dense reference (DESIGN.md 4.2), written independently of the plugin's gather/select/scatter code --------


def reference_high_res_features(model, high_res, zoom):
    """Encode each tile separately and stitch the grid with explicit loops."""
    side = model.config.vision_config.image_size
    grid = side // model.config.vision_config.patch_size
    rows = []
    for i in range(zoom):
        row = []
        for j in range(zoom):
            tile = high_res[:, :, i * side : (i + 1) * side, j * side : (j + 1) * side]
            with torch.no_grad():
                features = model.model.get_image_features(pixel_values=tile).pooler_output[0]
            row.append(features.reshape(grid, grid, -1))
        rows.append(torch.cat(row, dim=1))
    stitched = torch.cat(rows, dim=0)
    return stitched.reshape(-1, stitched.shape[-1])


def reference_high_res_rotary(model, image_positions, grid, high_res_grid):
    dummy = torch.zeros(1, dtype=torch.float32)
    cos, sin = model.model.language_model.rotary_emb(dummy, position_ids=image_positions[None])
    tables = []
    for table in (cos[0], sin[0]):
        planes = table.reshape(grid, grid, -1).permute(2, 0, 1)[None]
        resized = F.interpolate(planes, size=(high_res_grid, high_res_grid), mode="bicubic", align_corners=False)
        tables.append(resized[0].permute(1, 2, 0).reshape(high_res_grid * high_res_grid, -1))
    return tables


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DenseReference:
    """Eager attention over every row; in FlexAttention layers, the high-res rows also see ALL high-res keys."""

    def __init__(self, features, cos, sin, high_res_rows):
        self.features, self.cos, self.sin, self.high_res_rows = features, cos, sin, high_res_rows

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = module.num_key_value_groups
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query.float() @ key.float().transpose(-1, -2) * scaling + attention_mask
        if hasattr(module, "hr_k_proj"):
            head_dim = query.shape[-1]
            hr_key = module.hr_k_proj(self.features).view(1, -1, key.shape[1] // groups, head_dim).transpose(1, 2)
            hr_value = module.hr_v_proj(self.features).view(1, -1, key.shape[1] // groups, head_dim).transpose(1, 2)
            hr_key = rotate(hr_key, self.cos, self.sin).repeat_interleave(groups, dim=1)
            hr_value = hr_value.repeat_interleave(groups, dim=1)
            hr_scores = query.float() @ hr_key.float().transpose(-1, -2) * scaling
            hidden = torch.full_like(hr_scores, float("-inf"))
            hidden[:, :, self.high_res_rows] = 0.0
            scores = torch.cat([scores, hr_scores + hidden], dim=-1)
            value = torch.cat([value, hr_value], dim=2)
        probabilities = scores.softmax(dim=-1)
        return (probabilities @ value.float()).to(query.dtype).transpose(1, 2), probabilities


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("values", ["folded", "per_token"])
def test_select_all_equals_dense_reference(backbone, with_labels, values, single_inputs, monkeypatch):
    """`values`: the high-res values enter as the projection of the attention-weighted features (as when decoding)
    or token by token (as for long answers); both must be the reference (Qwen2's biased projections included)."""
    monkeypatch.setattr(projections, "folds_values", lambda head_rows, tokens: values == "folded")
    stock, patched = stock_and_patched(backbone, n_fa=2, selection="topk", topk_ratio=1.0)
    # Distinct hr projections, so a mix-up with k_proj/v_proj cannot pass; Qwen2's biases are initialised to zero,
    # so give them values too.
    with torch.no_grad():
        for layer in patched.model.language_model.layers[2:]:
            for projection in (layer.self_attn.hr_k_proj, layer.self_attn.hr_v_proj):
                for parameter in projection.parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))

    input_ids = single_inputs["input_ids"]
    length = input_ids.shape[1]
    labels = None
    if with_labels:
        labels = torch.full_like(input_ids, -100)
        labels[0, length - 4 :] = input_ids[0, length - 4 :]
        high_res_rows = list(range(length - 5, length - 1))
    else:
        high_res_rows = [length - 1]

    reference = copy.deepcopy(stock)
    for index in (2, 3):
        reference.model.language_model.layers[index].self_attn.hr_k_proj = copy.deepcopy(
            patched.model.language_model.layers[index].self_attn.hr_k_proj
        )
        reference.model.language_model.layers[index].self_attn.hr_v_proj = copy.deepcopy(
            patched.model.language_model.layers[index].self_attn.hr_v_proj
        )
    config = reference.config
    grid = config.vision_config.image_size // config.vision_config.patch_size
    features = reference_high_res_features(reference, single_inputs["high_res_pixel_values"], zoom=3)
    image_positions = (input_ids[0] == config.image_token_id).nonzero().squeeze(1)
    cos, sin = reference_high_res_rotary(reference, image_positions, grid, 3 * grid)
    name = f"dense_reference_{backbone}_{with_labels}_{values}"
    AttentionInterface.register(name, DenseReference(features, cos, sin, high_res_rows))
    AttentionMaskInterface.register(name, eager_mask)
    reference.set_attn_implementation({"text_config": name})

    stock_inputs = {
        k: v for k, v in single_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")
    }
    got = logits(patched, {k: v for k, v in single_inputs.items() if k != "original_image_sizes"}, labels=labels)
    want = logits(reference, stock_inputs)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    plain = logits(stock, stock_inputs)
    assert (got[0, high_res_rows] - plain[0, high_res_rows]).abs().max() > 1e-3


def test_eager_and_sdpa_agree(batch_inputs):
    _, eager = stock_and_patched(attn_implementation="eager")
    _, sdpa = stock_and_patched(attn_implementation="sdpa")
    assert eager.config.text_config._attn_implementation == "eager"  # what the ecosystem compares against
    assert eager.model.language_model.layers[0].self_attn.config._attn_implementation == "flexattn_eager"
    real = batch_inputs["attention_mask"].bool()  # padding rows attend to nothing: each kernel fills them its own way
    torch.testing.assert_close(logits(eager, batch_inputs)[real], logits(sdpa, batch_inputs)[real], atol=ATOL, rtol=0)


def test_training_path_equals_inference_path(batch_inputs):
    """With gradients on, high-res tokens are projected directly; without, through the decode-time memo."""
    _, patched = stock_and_patched()
    labels = batch_inputs["input_ids"].masked_fill(batch_inputs["attention_mask"] == 0, -100)
    labels[:, :-4] = -100
    with torch.enable_grad():
        direct = patched(**batch_inputs, labels=labels).logits.detach()
    torch.testing.assert_close(direct, logits(patched, batch_inputs, labels=labels), atol=ATOL, rtol=0)
