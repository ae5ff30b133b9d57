"""A synthetic high-resolution visual-search task, in the spirit of V* Bench, made in code (no download).

Each sample is a cluttered canvas `zoom` times the vision tower's input side with one small target whose answer
can only be read at high resolution:

* `"letter"`: several coloured boxes, each framing a small letter; "what letter is in the red box ?". The boxes'
  colours survive downsampling (a low-res model can find the red box), their letters do not.
* `"colour"`: small shapes of different colours (crosses, triangles, bars, rings) and one small square; "what colour
  is the small square ?". At low resolution every shape is a blob of a few pixels: which blob is the square is lost.

Questions come in two forms: free answer (one word) and multiple choice (four options in the question; scored by
the options' likelihood, as V* Bench is). The generator knows the target's box, so a model's high-res selection
can be checked against it. Everything is a pure function of `(split, index)`: splits draw from disjoint seeds
(`numpy.random.SeedSequence((SPLIT_IDS[split], index))`), so train, validation and test never share a sample.

Letters are drawn from a 4x4 bitmap font defined here (no system font, so images are identical on every machine).

    >>> sample = make_sample("train", 0)
    >>> sample.image.size, sample.question, sample.answer, sample.target_box

The package ships a small FlexAttention Llava trained on this task by `examples/train_visual_search.py`
(`SHIPPED_MODEL`; `load_shipped_model`): the demo's default model.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
KINDS = ("letter", "colour")
COLOURS = {
    "red": (220, 30, 30),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (235, 200, 20),
    "purple": (150, 40, 200),
    "orange": (245, 120, 10),
}
# A 4x4 bitmap font ('#' is ink): a letter fills exactly one 4x4 patch of the tiny vision tower at high res, and
# about 1.3 pixels of the low-res view (zoom 3).
GLYPHS = {
    "a": (".##.", "#..#", "####", "#..#"),
    "e": ("####", "###.", "#...", "####"),
    "h": ("#..#", "####", "#..#", "#..#"),
    "k": ("#.#.", "##..", "#.#.", "#..#"),
    "l": ("#...", "#...", "#...", "####"),
    "t": ("####", ".##.", ".##.", ".##."),
    "x": ("#..#", ".##.", ".##.", "#..#"),
    "z": ("####", "..#.", ".#..", "####"),
}
GLYPH = 4
LETTERS = tuple(GLYPHS)
# Distractor shapes for the colour question, with sides that give them about the square's ink (36 pixels), so that
# at low resolution no blob stands out by its mass.
DISTRACTOR_SHAPES = {"disc": 7, "triangle": 9, "diamond": 8, "plus": 8}
CLUTTER_SHAPES = ("cross", "triangle", "bar", "ring")
TARGET_FRAME = 8  # box side in high-res pixels: 1 px frame, 1 px margin, a 4 px letter
# Boxes sit at `left = top = 2 (mod 4)`, so their letter fills one patch of a 4-pixel-patch tower (tiles start at
# multiples of its 32 px input). Real text straddles patches; a tiny tower built in code reads whole patches.
BOX_ALIGNMENT = 4
TARGET_SQUARE = 6
# The trained model shipped in the package: weights, processor, model card and `task.json` (the `make_sample`
# settings it was trained on, and its figures on the test split).
SHIPPED_MODEL = Path(__file__).resolve().parent / "pretrained" / "visual_search"
WORDS = (
    "USER: ASSISTANT: what letter is in the box ? colour small square options : "
    + " ".join(COLOURS)
    + " "
    + " ".join(LETTERS)
).split()


def glyph_mask(letter: str) -> np.ndarray:
    """`(4, 4)` bool: the ink of `letter` in the module's bitmap font."""
    return np.array([[char == "#" for char in row] for row in GLYPHS[letter]])


@dataclass
class VisualSearchSample:
    """One sample: the image, the question in both forms, the answer and the target's box.

    Attributes:
        image: RGB canvas of `size x size` pixels.
        kind: `"letter"` or `"colour"`.
        question: the free-answer question (tiny-vocabulary words, whitespace separated).
        options: four candidate answers in random order, one of them `answer`.
        answer: the correct one-word answer.
        target_box: `(left, top, right, bottom)` in image pixels, right/bottom exclusive.
    """

    image: Image.Image
    kind: str
    question: str
    options: tuple[str, ...]
    answer: str
    target_box: tuple[int, int, int, int]

    @property
    def multiple_choice_question(self) -> str:
        """The question with its four options appended (`... ? options : a b c d`)."""
        return f"{self.question} options : {' '.join(self.options)}"


def _free_spot(
    rng: np.random.Generator, size: int, side: int, taken: list, gap: int = 2, aligned: bool = False
) -> tuple[int, int]:
    """A top-left corner for a `side` x `side` object that keeps `gap` pixels from every box in `taken`; `aligned`:
    at `2 (mod BOX_ALIGNMENT)` on both axes."""
    for _ in range(200):
        left, top = (int(v) for v in rng.integers(1, size - side - 1, size=2))
        if aligned:
            left, top = (v - v % BOX_ALIGNMENT + 2 for v in (left, top))
        box = (left - gap, top - gap, left + side + gap, top + side + gap)
        if all(box[0] >= b[2] or box[2] <= b[0] or box[1] >= b[3] or box[3] <= b[1] for b in taken):
            taken.append((left, top, left + side, top + side))
            return left, top
    raise RuntimeError("The canvas is too crowded to place another object: lower `distractors` or raise `size`.")


def _draw_box(
    pixels: np.ndarray, left: int, top: int, colour, letter: str, rng: np.random.Generator, scale: int = 1
) -> None:
    """A box of side `GLYPH * scale + 4`: a one-pixel `colour` frame, a noisy light inside and the letter in dark
    grey at `(left + 2, top + 2)`, each font pixel `scale` pixels wide."""
    side = GLYPH * scale + 4
    pixels[top : top + side, left : left + side] = colour
    inside = side - 2
    pixels[top + 1 : top + side - 1, left + 1 : left + side - 1] = rng.integers(190, 256, size=(inside, inside, 1))
    ink = np.kron(glyph_mask(letter), np.ones((scale, scale), dtype=bool))
    region = pixels[top + 2 : top + 2 + GLYPH * scale, left + 2 : left + 2 + GLYPH * scale]
    region[ink] = rng.integers(0, 70, size=(int(ink.sum()), 1))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, left: int, top: int, side: int, colour) -> None:
    right, bottom = left + side - 1, top + side - 1
    middle = left + side // 2
    if shape == "square":
        draw.rectangle((left, top, right, bottom), fill=colour)
    elif shape == "cross":
        draw.rectangle((middle - 1, top, middle, bottom), fill=colour)
        draw.rectangle((left, top + side // 2 - 1, right, top + side // 2), fill=colour)
    elif shape == "triangle":
        draw.polygon([(left, bottom), (right, bottom), (middle, top)], fill=colour)
    elif shape == "bar":
        draw.rectangle((left, top + 2, right, bottom - 2), fill=colour)
    elif shape == "disc":
        draw.ellipse((left, top, right, bottom), fill=colour)
    elif shape == "diamond":
        draw.polygon([(middle, top), (right, top + side // 2), (middle, bottom), (left, top + side // 2)], fill=colour)
    elif shape == "plus":
        third = side // 3
        draw.rectangle((left + third, top, right - third, bottom), fill=colour)
        draw.rectangle((left, top + third, right, bottom - third), fill=colour)
    elif shape == "ring":
        draw.ellipse((left, top, right, bottom), outline=colour, width=1)
    else:
        raise ValueError(f"Unknown shape {shape!r}.")


def make_sample(
    split: str,
    index: int,
    size: int = 96,
    kind: str | None = None,
    clutter: int = 6,
    boxes: int = 4,
    letter_clutter: float = 0.5,
    letter_scale: int = 1,
) -> VisualSearchSample:
    """The sample `index` of `split` (deterministic).

    Args:
        split: `"train"`, `"validation"` or `"test"`; their seeds are disjoint.
        index: sample number (>= 0).
        size: canvas side in pixels (`zoom` times the vision tower's input side; 96 = 3 x 32 for the example).
        kind: `"letter"` or `"colour"`; None alternates with the index (even: letter).
        clutter: how many unframed distractor letters and grey shapes to scatter (besides the question's own
            distractors: other boxes, or three other shapes).
        letter_scale: font pixel size of the boxed letters; 1 (4 px letters) makes them illegible at low res,
            larger ones are a legible control.
        letter_clutter: the share of clutter items that are unframed letters (the others are grey shapes).
        boxes: letter questions: how many framed boxes (1 to 4, each its own colour and letter); with one, the
            options are its letter and three others drawn at random.

    Raises:
        ValueError: for an unknown split or kind, a negative index, or a canvas under 48 pixels.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"Unknown split {split!r}: use one of {sorted(SPLIT_IDS)}.")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}.")
    if not 1 <= letter_scale <= 4:
        raise ValueError(f"letter_scale={letter_scale}: use 1 (illegible at low res) to 4.")
    if not 1 <= boxes <= 4:
        raise ValueError(f"boxes={boxes}: a letter question draws 1 to 4 framed boxes.")
    if size < 48:
        raise ValueError(f"size={size} is too small for the targets and clutter: use at least 48 pixels.")
    kind = KINDS[index % 2] if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}: use one of {KINDS}.")
    rng = np.random.default_rng(np.random.SeedSequence((SPLIT_IDS[split], index)))
    # A textured light background: low-frequency shading plus pixel noise, so flat colour is no cue.
    shade = rng.integers(150, 215, size=(4, 4, 3)).astype(np.uint8)
    background = np.asarray(Image.fromarray(shade).resize((size, size), Image.BILINEAR), dtype=np.int16)
    background = background + rng.integers(-12, 13, size=(size, size, 3))
    pixels = background.clip(0, 255).astype(np.uint8)
    taken: list[tuple[int, int, int, int]] = []
    colour_names = list(COLOURS)

    if kind == "letter":
        colours = rng.choice(len(colour_names), size=4, replace=False)
        letters = rng.choice(len(LETTERS), size=4, replace=False)
        for colour, letter in zip(colours[:boxes], letters[:boxes], strict=True):
            box_side = GLYPH * letter_scale + 4
            left, top = _free_spot(rng, size, box_side, taken, gap=3, aligned=True)
            _draw_box(pixels, left, top, COLOURS[colour_names[colour]], LETTERS[letter], rng, letter_scale)
        target_box = taken[0]
        answer, options = LETTERS[letters[0]], [LETTERS[i] for i in letters]
        question = f"what letter is in the {colour_names[colours[0]]} box ?"
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    if kind == "colour":
        colours = rng.choice(len(colour_names), size=4, replace=False)
        names = list(DISTRACTOR_SHAPES)
        shapes = ["square"] + [names[i] for i in rng.choice(len(names), 3, replace=False)]
        for colour, shape in zip(colours, shapes, strict=True):
            side = DISTRACTOR_SHAPES.get(shape, TARGET_SQUARE)
            left, top = _free_spot(rng, size, side, taken, gap=3)
            _draw_shape(draw, shape, left, top, side, COLOURS[colour_names[colour]])
            if shape == "square":
                target_box = (left, top, left + TARGET_SQUARE, top + TARGET_SQUARE)
        answer, options = colour_names[colours[0]], [colour_names[i] for i in colours]
        question = "what colour is the small square ?"
    # Clutter: unframed dark letters and grey shapes, in neither question's answer colours.
    for _ in range(clutter):
        if rng.random() < letter_clutter:
            left, top = _free_spot(rng, size, GLYPH, taken)
            ink = glyph_mask(LETTERS[int(rng.integers(len(LETTERS)))])
            grey = int(rng.integers(30, 90))
            for y, x in zip(*np.nonzero(ink), strict=True):
                draw.point((left + int(x), top + int(y)), fill=(grey, grey, grey))
        else:
            side = int(rng.integers(5, 9))
            left, top = _free_spot(rng, size, side, taken)
            grey = int(rng.integers(60, 120))
            _draw_shape(draw, CLUTTER_SHAPES[int(rng.integers(4))], left, top, side, (grey, grey, grey))
    order = rng.permutation(4)
    return VisualSearchSample(
        image=image,
        kind=kind,
        question=question,
        options=tuple(options[i] for i in order),
        answer=answer,
        target_box=target_box,
    )


def make_split(split: str, count: int, size: int = 96, **kwargs) -> list[VisualSearchSample]:
    """Samples `0 .. count - 1` of `split` (see `make_sample`)."""
    return [make_sample(split, index, size=size, **kwargs) for index in range(count)]


def to_conversation(sample: VisualSearchSample, multiple_choice: bool) -> list[dict[str, str]]:
    """The sample as a LLaVA conversation (`hf_flexattention.data`'s format), free answer or multiple choice."""
    question = sample.multiple_choice_question if multiple_choice else sample.question
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": sample.answer}]


def downsample(image: Image.Image, factor: int) -> Image.Image:
    """What the low-res path sees of `image`: its size divided by `factor`, bilinear with antialiasing (as
    `FlexLlavaProcessor` makes the low-res view), stored in 8 bits."""
    import torch
    import torch.nn.functional as F

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    size = (image.height // factor, image.width // factor)
    small = F.interpolate(pixels, size=size, mode="bilinear", antialias=True)[0].permute(1, 2, 0)
    return Image.fromarray(small.round().clamp(0, 255).byte().numpy())


def read_letter(image: Image.Image, box: tuple[int, int, int, int], factor: int = 1) -> str:
    """A template reader: the letter whose glyph best correlates with the 4x4 pixels where the box holds its letter.

    With `factor > 1` it reads what the low-res path keeps: the image downsampled by `factor` (`downsample`) and
    scaled back up (bilinear). It is told where the letter is, which a model is not, so its low-res accuracy
    bounds how legible the letter stays. (The letter is not erased at low res, only blurred to about
    `4 / factor` pixels: a reader that models the downsampling exactly could still tell letters apart, so
    legibility, not information, is what this measures.)

    Args:
        image: the sample's image.
        box: the target box `(left, top, right, bottom)` of a `"letter"` sample.
        factor: the downsampling factor (the processor's `zoom`); 1 reads the high-res image.
    """
    view = image if factor == 1 else downsample(image, factor).resize(image.size, Image.BILINEAR)
    grey = np.asarray(view.convert("L"), dtype=np.float32)
    left, top = box[0], box[1]
    observed = grey[top + 2 : top + 2 + GLYPH, left + 2 : left + 2 + GLYPH].ravel()
    observed = (observed - observed.mean()) / (observed.std() + 1e-6)

    def correlation(letter: str) -> float:
        paper = (~glyph_mask(letter)).astype(np.float32).ravel()  # ink is dark: correlate with the paper
        return float(((paper - paper.mean()) / paper.std() * observed).mean())

    return max(LETTERS, key=correlation)


__all__ = [
    "COLOURS",
    "KINDS",
    "LETTERS",
    "SPLIT_IDS",
    "VisualSearchSample",
    "WORDS",
    "downsample",
    "make_sample",
    "make_split",
    "read_letter",
    "to_conversation",
]


def load_shipped_model(device=None, dtype=None):
    """The FlexAttention Llava trained on this task and shipped in the package, with its processor and task.

    `examples/train_visual_search.py --save-flex` wrote it (see the README's visual-search section for the run and
    its figures); it loads from `SHIPPED_MODEL` with `from_pretrained`, offline. Its vocabulary is the task's
    words (`WORDS`) and its images are `zoom x 32` pixels (`zoom = 3`): ask it about samples drawn with
    `make_sample(split, index, **task["sample_kwargs"])`.

    Args:
        device: torch device to load onto (default: the CPU).
        dtype: torch dtype (default: float32, as trained).

    Returns:
        `(model, processor, task)`: a `FlexLlavaForConditionalGeneration` in eval mode, its `FlexLlavaProcessor`,
        and the parsed `task.json` (`"sample_kwargs"` for `make_sample`, `"results"` of the training run).

    Raises:
        FileNotFoundError: when the package was installed without its data files (`SHIPPED_MODEL` is missing).
    """
    import torch

    from .modeling_flex_llava import FlexLlavaForConditionalGeneration
    from .processing_flex_llava import FlexLlavaProcessor

    if not (SHIPPED_MODEL / "config.json").is_file():
        raise FileNotFoundError(
            f"The shipped visual-search model is missing from {SHIPPED_MODEL}: reinstall hf_flexattention from a "
            "source that includes its package data (`pip install -e .` from the repository)."
        )
    model = FlexLlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL, dtype=dtype or torch.float32)
    processor = FlexLlavaProcessor.from_pretrained(SHIPPED_MODEL)
    task = json.loads((SHIPPED_MODEL / "task.json").read_text())
    return model.to(device or "cpu").eval(), processor, task
