"""LLaVA-OneVision only: what the family has and LLaVA-NeXT has not (the crop grids `anyres_max_N` shrinks, videos,
`batch_num_images`, `vision_aspect_ratio`). Every guarantee both families share (stock parity, select-all == dense
reference, generate, save / load, LoRA, host syncs, most bad inputs) is in `tests/test_any_resolution.py`, run over
the family table of `tests/anyres_helpers.py` (where OneVision's crop grids for `anyres_max_9` / `anyres_max_2` are
derived)."""

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from hf_flexattention import is_patched, patch_model
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID

from .anyres_helpers import (
    ATOL,
    BASE_TOKENS,
    ONEVISION,
    PROMPTS,
    SIZES,
    Setting,
    image,
    settings,
    stock_packed_features,
)


RATIO_SETTINGS = settings(ratios=True, families=(ONEVISION,))
SETTING = Setting(ONEVISION, "qwen2", "anyres_max_9")


@pytest.mark.parametrize("setting", RATIO_SETTINGS)
def test_the_stock_processor_counts_the_shrunk_grid(setting):
    """The prompt length a stock OneVision user gets agrees with the shrunk grid: the grids of the family table are
    the real ones."""
    inputs = setting.stock_inputs([image(SIZES[2], 3)], [PROMPTS[0]])
    rows, cols = setting.crop_grid(SIZES[2])
    assert int((inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum()) == BASE_TOKENS + rows * (cols + 1)


@pytest.mark.parametrize("setting", RATIO_SETTINGS)
def test_the_pool_is_the_stock_packed_crops_without_newlines(setting):
    batch_inputs = ONEVISION.batch
    stock, patched = setting.stock_and_patched()
    packed = stock_packed_features(stock, batch_inputs)
    with torch.no_grad():
        base, crops = patched.encode_images(batch_inputs["pixel_values"], batch_inputs["image_sizes"], -1)
    assert base.shape == (3, BASE_TOKENS, packed[0].shape[-1])
    for features, image_base, crop, size in zip(packed, base, crops, SIZES, strict=True):
        rows, cols = setting.crop_grid(size)
        assert crop.shape[:2] == (rows, cols)
        # The same tower, projector, unpadding and bilinear shrinking on the same patches: identical up to rounding.
        torch.testing.assert_close(image_base, features[:BASE_TOKENS], atol=ATOL, rtol=0)
        torch.testing.assert_close(crop, features[BASE_TOKENS:].view(rows, cols + 1, -1)[:, :cols], atol=ATOL, rtol=0)


def test_videos_are_refused():
    model = SETTING.model()
    videos = torch.zeros(1, 2, 3, 32, 32)  # one video of two frames
    with pytest.raises(ValueError, match="single images, not videos.*unpatch the model"):
        model(**ONEVISION.batch, pixel_values_videos=videos)
    with pytest.raises(ValueError, match="single images, not videos"):
        model(**ONEVISION.batch, image_sizes_videos=torch.tensor([[32, 32]]))


def test_multi_image_samples_are_refused():
    model = SETTING.model()
    inputs = ONEVISION.inputs(images=[image(SIZES[0], 1), image(SIZES[1], 2)], text=[PROMPTS[0], PROMPTS[1]])
    with pytest.raises(ValueError, match=r"one image per sample; got batch_num_images=\[2\].*Split"):
        model(**dict(inputs, batch_num_images=torch.tensor([2])))
    with pytest.raises(ValueError, match=r"batch_num_images=\[1, 2\]"):
        model.generate(**dict(inputs, batch_num_images=torch.tensor([1, 2])), max_new_tokens=2)


@pytest.mark.parametrize("ratio", ["anyres", "anyres_max_0", "pad"])
def test_a_vision_aspect_ratio_that_is_not_anyres_max_n_is_refused(ratio):
    model = SETTING.stock()
    model.config.vision_aspect_ratio = ratio
    with pytest.raises(ValueError, match=f"vision_aspect_ratio='{ratio}' is not supported.*'anyres_max_N'"):
        patch_model(model, n_fa=2)
    assert not is_patched(model) and type(model) is LlavaOnevisionForConditionalGeneration


def test_a_vision_aspect_ratio_other_than_the_configs_is_refused():
    model = SETTING.model()
    with pytest.raises(ValueError, match="vision_aspect_ratio='anyres_max_2' differs from the config's"):
        model(**ONEVISION.batch, vision_aspect_ratio="anyres_max_2")
