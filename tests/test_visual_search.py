"""The synthetic visual-search generator: deterministic, disjoint splits, a target legible only at high res."""

import hashlib

import numpy as np
import pytest

from hf_flexattention.visual_search import (
    COLOURS,
    LETTERS,
    SPLIT_IDS,
    TARGET_FRAME,
    downsample,
    glyph_mask,
    make_sample,
    make_split,
    read_letter,
    to_conversation,
)


def digest(sample) -> str:
    return hashlib.sha256(sample.image.tobytes() + sample.question.encode()).hexdigest()


def test_samples_are_deterministic():
    first, second = make_split("train", 6), make_split("train", 6)
    for a, b in zip(first, second, strict=True):
        assert digest(a) == digest(b)
        assert (a.options, a.answer, a.target_box) == (b.options, b.answer, b.target_box)


def test_splits_share_no_sample():
    digests = {split: {digest(s) for s in make_split(split, 60)} for split in SPLIT_IDS}
    assert all(len(d) == 60 for d in digests.values())  # no repeat inside a split either
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


@pytest.mark.parametrize("index", range(8))
def test_question_answer_and_target_box(index):
    sample = make_sample("validation", index)
    assert sample.kind == ("letter", "colour")[index % 2]
    assert len(set(sample.options)) == 4 and sample.answer in sample.options
    left, top, right, bottom = sample.target_box
    assert 0 <= left < right <= sample.image.width and 0 <= top < bottom <= sample.image.height
    pixels = np.asarray(sample.image)
    if sample.kind == "letter":
        assert right - left == TARGET_FRAME and sample.answer in LETTERS
        colour = sample.question.split(" the ")[1].split(" box")[0]
        # The box's frame is drawn in the colour the question names.
        assert (pixels[top, left:right] == COLOURS[colour]).all()
        assert (pixels[bottom - 1, left:right] == COLOURS[colour]).all()
    else:
        assert (pixels[top:bottom, left:right] == COLOURS[sample.answer]).all()
    conversation = to_conversation(sample, multiple_choice=True)
    assert conversation[0]["value"].startswith("<image>\n") and conversation[1]["value"] == sample.answer
    assert conversation[0]["value"].endswith("options : " + " ".join(sample.options))


def test_letter_is_legible_at_high_res_only():
    """A template reader told where the letter is reads every letter in the high-res image; in the low-res view
    (downsampled by the zoom, 3) it reads 33% of these 100 (measured; chance is 1/8). The bound leaves room for
    that figure and still fails if the letters became legible at low res."""
    samples = [make_sample("validation", 2 * index, kind="letter") for index in range(100)]
    high = np.mean([read_letter(s.image, s.target_box) == s.answer for s in samples])
    low = np.mean([read_letter(s.image, s.target_box, factor=3) == s.answer for s in samples])
    assert high == 1.0
    assert low < 0.45


@pytest.mark.parametrize("scale", [1, 3])
def test_one_box_without_letter_clutter(scale):
    """The training setting: one framed box, its letter drawn `scale` pixels per font pixel, no other letter."""
    sample = make_sample("train", 4, kind="letter", boxes=1, letter_clutter=0.0, letter_scale=scale)
    left, top, right, bottom = sample.target_box
    assert right - left == 4 * scale + 4 and left % 4 == 2 and top % 4 == 2
    pixels = np.asarray(sample.image).astype(int)
    dark = (pixels.max(axis=-1) < 70).sum()  # letter ink is the only near-black: no clutter letter drawn
    assert dark == int(np.kron(glyph_mask(sample.answer), np.ones((scale, scale))).sum())


def test_downsample_matches_the_low_res_view_size():
    sample = make_sample("train", 0)
    assert downsample(sample.image, 3).size == (32, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev", "index": 0}, "Unknown split"),
        ({"split": "train", "index": -1}, "index must be"),
        ({"split": "train", "index": 0, "kind": "shape"}, "Unknown kind"),
        ({"split": "train", "index": 0, "size": 20}, "too small"),
        ({"split": "train", "index": 0, "boxes": 0}, "1 to 4 framed boxes"),
        ({"split": "train", "index": 0, "letter_scale": 5}, "letter_scale=5"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sample(**kwargs)
