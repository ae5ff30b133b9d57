"""LLaVA-NeXT only: what the family has and LLaVA-OneVision has not. Every guarantee both families share (stock
parity, select-all == dense reference, generate, save / load, LoRA, host syncs, most bad inputs) is in
`tests/test_any_resolution.py`, run over the family table of `tests/anyres_helpers.py`."""

import pytest

from hf_flexattention import is_patched, patch_model

from .anyres_helpers import NEXT, Setting


SETTING = Setting(NEXT, "llama", None)


def test_pinpoints_that_are_not_whole_crops_are_refused():
    model = SETTING.stock()
    model.config.image_grid_pinpoints = [[32, 64], [48, 32]]
    with pytest.raises(ValueError, match=r"image_grid_pinpoints \[\[48, 32\]\] are not multiples of .* 32 px"):
        patch_model(model, n_fa=2)
    assert not is_patched(model)


def test_truncated_patches_are_refused():
    """Fewer patches than an image's base and crops (the 40x70 image needs 5): a truncated input."""
    model = SETTING.model()
    batch_inputs = NEXT.batch
    with pytest.raises(ValueError, match=r"holds 3 patches per image, but `image_sizes` \[40, 70\] needs 5"):
        model(**dict(batch_inputs, pixel_values=batch_inputs["pixel_values"][:, :3]))
