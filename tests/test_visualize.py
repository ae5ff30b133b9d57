"""Pictures of the selection: pixels drawn exactly where the selection says, traces that match the model."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_flexattention import patch_model
from hf_flexattention.selection import select_high_res_tokens
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor
from hf_flexattention.tracing import FlexTrace
from hf_flexattention.visualize import OUTLINE_COLOUR, main, render_overlay, trace_generation


PROMPT = "USER: <image>\nwhat is in the image ? ASSISTANT:"


def reference_outline(selected: np.ndarray, width: int, height: int) -> np.ndarray:
    """Written plainly: pixel (x, y) of the original image sits at (x + ox, y + oy) on the padded square; its
    high-res cell holds its centre; it is drawn when its cell is selected and a 4-neighbour is outside the image or
    in an unselected cell."""
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    grid = selected.shape[0]

    def is_selected(x, y):
        if not (0 <= x < width and 0 <= y < height):
            return False
        col = min(int((x + ox + 0.5) * grid / side), grid - 1)
        row = min(int((y + oy + 0.5) * grid / side), grid - 1)
        return bool(selected[row, col])

    out = np.zeros((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            if is_selected(x, y):
                neighbours = [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)]
                out[y, x] = not all(is_selected(nx, ny) for nx, ny in neighbours)
    return out


def grey_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(40, 200, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(("width", "height"), [(37, 23), (23, 41), (45, 45), (101, 64)])
@pytest.mark.parametrize("with_heat_map", [False, True])
def test_outlines_are_drawn_exactly_where_selected(width, height, with_heat_map):
    rng = np.random.default_rng(width * height)
    selected = rng.random((24, 24)) < 0.3
    low_res_map = rng.random((8, 8)) if with_heat_map else None
    image = grey_image(width, height)
    drawn = np.asarray(render_overlay(image, low_res_map, selected, line_width=1))
    assert drawn.shape == (height, width, 3)  # the original size: the padding is cut away
    expected = reference_outline(selected, width, height)
    assert expected.any()
    is_outline = (drawn == OUTLINE_COLOUR).all(axis=-1)
    np.testing.assert_array_equal(is_outline, expected)
    if not with_heat_map:  # every other pixel is the image's own
        np.testing.assert_array_equal(drawn[~expected], np.asarray(image)[~expected])


def test_one_selected_cell_is_one_rectangle():
    """A single selected cell of a 3x3 grid on a 30x18 image (padded to 30x30, margin 6 rows): the middle cell
    spans x in [10, 20) and padded y in [10, 20), i.e. image rows [4, 14)."""
    selected = np.zeros((3, 3), dtype=bool)
    selected[1, 1] = True
    drawn = np.asarray(render_overlay(grey_image(30, 18), None, selected, line_width=1))
    expected = np.zeros((18, 30), dtype=bool)
    expected[4:14, 10:20] = True
    expected[5:13, 11:19] = False
    np.testing.assert_array_equal((drawn == OUTLINE_COLOUR).all(axis=-1), expected)


def test_heat_map_follows_the_low_res_cells():
    """The heat-map is one colour per low-res cell: a map hot in one cell changes the pixels of that cell only
    (against a zero map), on a non-square image."""
    image = grey_image(40, 24)
    cold = np.asarray(render_overlay(image, np.zeros((4, 4)), None)).astype(int)
    hot_map = np.zeros((4, 4))
    hot_map[2, 3] = 1.0  # padded square 40x40, cell (2, 3) spans x [30, 40), padded y [20, 30) -> image rows [12, 22)
    hot = np.asarray(render_overlay(image, hot_map, None)).astype(int)
    changed = (hot != cold).any(axis=-1)
    expected = np.zeros((24, 40), dtype=bool)
    expected[12:22, 30:40] = True
    np.testing.assert_array_equal(changed, expected)


@pytest.fixture(scope="module")
def flex_model():
    return patch_model(build_tiny_llava(), n_fa=2)


def test_trace_records_what_the_model_selected(flex_model):
    processor = build_tiny_processor()
    image = grey_image(50, 30, seed=3)
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    trace = FlexTrace()
    with torch.no_grad():
        output = flex_model.generate(**inputs, max_new_tokens=3, do_sample=False, flex_trace=trace)
    prompt_length = inputs["input_ids"].shape[1]
    assert output.shape[1] == prompt_length + 3
    # Prefill and two decode steps, each selecting for the two FlexAttention layers; counts as a plain list has.
    assert [layer for layer, _ in trace] == [2, 3] * 3
    config = flex_model.config
    for step in range(3):
        selections = trace.selections_for(prompt_length - 1 + step)
        assert sorted(selections) == [2, 3]
        for low_res_map, selected in selections.values():
            # The recorded mask is the selection of the recorded map (threshold mode, padding margin ignored).
            again = select_high_res_tokens(
                low_res_map[None],
                high_res_grid=config.high_res_grid,
                selection_grid=config.resolved_selection_grid,
                threshold=config.flex_threshold,
                original_sizes=inputs["original_image_sizes"],
            )[0]
            assert torch.equal(selected, again)
            assert low_res_map.shape == (config.low_res_grid**2,)
    with pytest.raises(ValueError, match="No high-res row at position 0"):
        trace.selections_for(0)


def test_pictures_of_a_generation(flex_model, tmp_path):
    pictures = trace_generation(flex_model, build_tiny_processor(), grey_image(50, 30), PROMPT, max_new_tokens=2)
    assert len(pictures.per_token) == len(pictures.tokens) == 2 and pictures.layers == [2, 3]
    low_res_map, union = pictures.aggregate()
    assert low_res_map.shape == (64,) and union.shape == (576,)


def test_command_line_writes_three_pngs(tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    grey_image(61, 35).save(image_path)
    output = tmp_path / "pictures" / "sel.png"
    argv = ["--image", str(image_path), "--prompt", "what letter is in the red box ?", "--output", str(output)]
    assert main([*argv, "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    paths = [str(output), str(tmp_path / "pictures" / "sel_layers.png"), str(tmp_path / "pictures" / "sel_tokens.png")]
    assert printed[1:] == paths
    for path in paths:
        with Image.open(path) as written:
            assert written.format == "PNG" and written.width > 100


def test_bad_inputs(flex_model, tmp_path, capsys):
    processor = build_tiny_processor()
    with pytest.raises(TypeError, match="patch_model"):
        trace_generation(build_tiny_llava(), processor, grey_image(20, 20), PROMPT)
    with pytest.raises(ValueError, match="pass the image"):
        trace_generation(flex_model, processor, None, PROMPT)
    with pytest.raises(TypeError, match="PIL image"):
        trace_generation(flex_model, processor, np.zeros((8, 8, 3)), PROMPT)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(SystemExit):
        main(["--image", str(not_an_image), "--prompt", "what ?"])
    assert "cannot read --image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image", str(tmp_path / "missing.png"), "--prompt", "what ?"])
    assert "cannot read --image" in capsys.readouterr().err
    with pytest.raises(ValueError, match="square grid"):
        render_overlay(grey_image(10, 10), np.zeros(10), None)
