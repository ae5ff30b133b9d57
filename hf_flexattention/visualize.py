"""Pictures of where a FlexAttention model looked: its low-res attention and its selected high-res tokens.

For each generated token and each FlexAttention layer, the row that predicts the token has a low-res attention
map (from the layer below, over the `g x g` image tokens) and a selection of high-res tokens (over the `G x G`
grid). Both are drawn on the original image, padding removed: the map as a heat-map (one colour per low-res cell)
and the selection as outlines around the selected high-res cells. Three PNG files are written:

* `FILE.png`: the image, and the overlay aggregated over layers and generated tokens (mean of the min-max
  normalised maps, outline of the tokens any of them selected);
* `FILE_layers.png`: a grid with one panel per FlexAttention layer, for the answer's first token;
* `FILE_tokens.png`: one panel per generated token, aggregated over layers.

    python -m hf_flexattention.visualize --image photo.jpg --prompt "What is written on the sign?" --model PATH
    python -m hf_flexattention.visualize --image canvas.png --prompt "what letter is in the red box ?"  # shipped model

Needs matplotlib: `pip install "hf_flexattention[viz]"`.
"""

import argparse
import os
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .patching import is_patched
from .tracing import FlexTrace


OUTLINE_COLOUR = (0, 255, 255)
HEAT_ALPHA = 0.55


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "hf_flexattention.visualize draws with matplotlib: install it with `pip install "
            '"hf_flexattention[viz]"` (or `pip install matplotlib`).'
        ) from error
    return plt


def _cell_index(length: int, offset: int, side: int, grid: int) -> np.ndarray:
    """`(length,)` the grid cell of each pixel of an image axis placed at `offset` on the padded `side`: the cell
    that holds the pixel's centre, as the processor's resize maps it (cell `c` spans `[c, c+1) * side / grid`)."""
    centres = np.arange(length) + offset + 0.5
    return np.minimum((centres * grid / side).astype(np.int64), grid - 1)


def cell_map(values: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Spread a `(grid, grid)` array over the original image: `(height, width)` with each pixel's cell's value.

    Args:
        values: `(grid, grid)` values over the square-padded image (row-major, as the model's grids are).
        image_size: `(width, height)` of the original image; it sits centred on the padded square
            (`processing_flex_llava.pad_to_square`), so the padding's cells are cut away.
    """
    width, height = image_size
    side, grid = max(width, height), values.shape[0]
    rows = _cell_index(height, (side - height) // 2, side, grid)
    cols = _cell_index(width, (side - width) // 2, side, grid)
    return values[rows[:, None], cols[None, :]]


def outline_mask(selected: np.ndarray, image_size: tuple[int, int], width: int = 1) -> np.ndarray:
    """`(height, width)` bool: the pixels on the border of the selected high-res cells, inside them.

    A pixel is on the border when it lies in a selected cell and some pixel within `width` of it (4-neighbourhood,
    repeated) does not, or it is within `width` of the image's edge. Selected cells therefore show as outlined
    regions; pixels outside every selected cell are never drawn.

    Args:
        selected: `(G, G)` bool selection over the padded square.
        image_size: `(width, height)` of the original image.
        width: line width in pixels.
    """
    inside = cell_map(selected.astype(bool), image_size)
    eroded = inside.copy()
    for _ in range(width):
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~eroded


def normalise(low_res_map: np.ndarray) -> np.ndarray:
    """Min-max normalise a map to [0, 1] (a constant map gives zeros), as the selection does before thresholding."""
    low, high = float(low_res_map.min()), float(low_res_map.max())
    return np.zeros_like(low_res_map, dtype=np.float64) if high <= low else (low_res_map - low) / (high - low)


def render_overlay(
    image: Image.Image,
    low_res_map: np.ndarray | torch.Tensor | None,
    selected: np.ndarray | torch.Tensor | None,
    *,
    line_width: int | None = None,
    colormap: str = "inferno",
    alpha: float = HEAT_ALPHA,
) -> Image.Image:
    """The original image with the low-res map as a heat-map and the selected high-res cells outlined.

    Args:
        image: the original image (any mode; drawn as RGB), before the processor padded it to a square.
        low_res_map: `(N,)` or `(g, g)` attention over the low-res tokens of the padded image, or None for no
            heat-map. It is min-max normalised over the cells inside the image and blended with weight `alpha`.
        selected: `(M,)` or `(G, G)` bool selection over the high-res tokens, or None for no outlines. Outlines are
            drawn in `OUTLINE_COLOUR` (cyan).
        line_width: outline width in pixels (default: 1 per 200 pixels of the shorter side, at least 1).

    Returns:
        An RGB image of the original size.

    Raises:
        ValueError: if a map or a selection is not a square grid.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    size = (image.width, image.height)
    if low_res_map is not None:
        grid_map = _square(low_res_map, "low_res_map").astype(np.float64)
        heat = cell_map(grid_map, size)
        colours = _pyplot().get_cmap(colormap)(normalise(heat))[..., :3] * 255
        rgb = (1 - alpha) * rgb + alpha * colours
    out = rgb.round().clip(0, 255).astype(np.uint8)
    if selected is not None:
        width = line_width or max(1, round(min(size) / 200))
        out[outline_mask(_square(selected, "selected").astype(bool), size, width)] = OUTLINE_COLOUR
    return Image.fromarray(out)


def _square(values, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim == 1:
        side = int(round(array.size**0.5))
        if side * side != array.size:
            raise ValueError(f"`{name}` has {array.size} entries, which is not a square grid.")
        array = array.reshape(side, side)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"`{name}` must be a square grid, (n,) or (g, g); got shape {array.shape}.")
    return array


@dataclass
class SelectionPictures:
    """What `trace_generation` recorded for one image and prompt.

    Attributes:
        image: the original image (RGB).
        tokens: the generated tokens' text, in order.
        answer: the decoded answer.
        per_token: for each generated token, `{layer: (low_res_map (N,), selected (M,))}` of the row that predicted
            it (the prompt's last row for the first token).
    """

    image: Image.Image
    tokens: list[str]
    answer: str
    per_token: list[dict[int, tuple[torch.Tensor, torch.Tensor]]]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for step in self.per_token for layer in step})

    def aggregate(self, steps: list[int] | None = None, layers: list[int] | None = None):
        """`(mean of the normalised maps (N,), union of the selections (M,))` over the given tokens and layers."""
        maps, union = [], None
        for step in steps if steps is not None else range(len(self.per_token)):
            for layer, (low_res_map, selected) in self.per_token[step].items():
                if layers is not None and layer not in layers:
                    continue
                maps.append(normalise(low_res_map.numpy()))
                union = selected.numpy().copy() if union is None else union | selected.numpy()
        return np.mean(maps, axis=0), union


def trace_generation(
    model, processor, image: Image.Image | None, prompt: str, max_new_tokens: int = 8
) -> SelectionPictures:
    """Generate greedily for one image and prompt, recording each answer row's map and selection per layer.

    Args:
        model: a FlexAttention model (`patch_model`, or `loading.load_flex_model`).
        processor: its `FlexLlavaProcessor`.
        image: the PIL image the prompt asks about.
        prompt: a question (wrapped in the model's chat format, with the image) or a full prompt with `<image>`.

    Raises:
        TypeError: for a model that is not patched with FlexAttention, or an image that is not a PIL image.
        ValueError: without an image, or when no FlexAttention layer selected anything (`flex_n_fa=0`).
    """
    from .demo import build_prompt

    if not is_patched(model):
        raise TypeError(
            f"{type(model).__name__} is not a FlexAttention model, so it selects nothing to draw: patch it with "
            "`hf_flexattention.patch_model(model, n_fa=...)` or load it with "
            "`hf_flexattention.loading.load_flex_model`."
        )
    if image is None:
        raise ValueError("FlexAttention selects high-res tokens of an image: pass the image the prompt asks about.")
    if not isinstance(image, Image.Image):
        raise TypeError(f"`image` must be a PIL image, got {type(image).__name__}: open files with PIL.Image.open.")
    image = image.convert("RGB")
    text = build_prompt(processor, prompt)
    device = next(model.parameters()).device
    inputs = processor(images=image, text=text, return_tensors="pt").to(device, dtype=model.dtype)
    trace = FlexTrace()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, flex_trace=trace)
    if not trace.records:
        raise ValueError(
            "The model recorded no selection: it has no FlexAttention layer (flex_n_fa=0) or the prompt has no image."
        )
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = output[0, prompt_length:]
    per_token = []
    for step in range(len(new_tokens)):
        try:
            per_token.append(trace.selections_for(prompt_length - 1 + step))
        except ValueError:  # the last generated token's row runs only if generation went on
            break
    tokenizer = processor.tokenizer
    return SelectionPictures(
        image=image,
        tokens=[tokenizer.decode([int(token)]) for token in new_tokens[: len(per_token)]],
        answer=tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
        per_token=per_token,
    )


def _grid_figure(panels: list[tuple[str, Image.Image]], path: str, title: str, columns: int = 4) -> str:
    plt = _pyplot()
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows + 0.8), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (name, picture) in zip(axes.flat, panels, strict=False):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(name, fontsize=9)
    figure.suptitle(textwrap.fill(title, width=int(34 * columns)), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_pictures(pictures: SelectionPictures, path: str) -> list[str]:
    """Write `path` (aggregate), `<stem>_layers.png` and `<stem>_tokens.png`; return the paths written."""
    stem = path[:-4] if path.lower().endswith(".png") else path
    directory = os.path.dirname(stem)
    if directory:
        os.makedirs(directory, exist_ok=True)
    image = pictures.image
    caption = f"answer: {pictures.answer!r}; heat: low-res attention, cyan: selected high-res tokens"
    low_res_map, union = pictures.aggregate()
    written = [
        _grid_figure(
            [("image", image), ("all layers, all tokens", render_overlay(image, low_res_map, union))],
            stem + ".png",
            caption,
            columns=2,
        )
    ]
    first = pictures.per_token[0]
    layer_panels = [
        (f"layer {layer} ({int(selected.sum())}/{selected.numel()} selected)", render_overlay(image, m, selected))
        for layer, (m, selected) in sorted(first.items())
    ]
    written.append(_grid_figure(layer_panels, stem + "_layers.png", "first answer token, per layer; " + caption))
    token_panels = []
    for step, token in enumerate(pictures.tokens):
        step_map, step_union = pictures.aggregate(steps=[step])
        token_panels.append((f"token {step}: {token!r}", render_overlay(image, step_map, step_union)))
    written.append(_grid_figure(token_panels, stem + "_tokens.png", "per generated token, all layers; " + caption))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_flexattention.visualize",
        description="Draw a FlexAttention model's low-res attention and selected high-res tokens on an image.",
    )
    parser.add_argument("--image", required=True, help="image file to ask about")
    parser.add_argument("--prompt", required=True, help="question, or a full prompt holding <image>")
    parser.add_argument(
        "--model",
        help="checkpoint (Hub id or folder; a stock Llava is patched); default: the visual-search model the package "
        "ships (hf_flexattention.visual_search.load_shipped_model)",
    )
    parser.add_argument("--output", default="flex_selection.png", help="PNG path (default: flex_selection.png)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default: 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; `argv` defaults to `sys.argv[1:]`. Returns the exit status."""
    from .loading import load_flex_model, load_flex_processor
    from .visual_search import load_shipped_model

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    try:
        with Image.open(args.image) as file:
            image = file.convert("RGB")
    except (OSError, ValueError) as error:
        parser.error(f"cannot read --image {args.image!r} as an image: {error}")
    try:
        _pyplot()
    except ImportError as error:
        parser.error(str(error))
    if args.model is None:
        model, processor, _ = load_shipped_model()
    else:
        try:
            model = load_flex_model(args.model, families=("llava",))
            processor = load_flex_processor(args.model, zoom=model.config.flex_zoom)
        except (OSError, TypeError, ValueError) as error:
            parser.error(f"cannot load --model {args.model!r}: {error}")
    try:
        pictures = trace_generation(model, processor, image, args.prompt, args.max_new_tokens)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    paths = save_pictures(pictures, args.output)
    print(f"answer: {pictures.answer!r}")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
