"""The high-resolution benchmarks of the FlexAttention paper in their published layouts, loaded with `datasets`.

Every loader returns a `datasets.Dataset` with the same columns, one row per question:

- `id` (str): stable across runs (what a resumed evaluation keys on);
- `category` (str): the benchmark's split of its questions (V* Bench: `direct_attributes` or `relative_position`);
- `question` (str); `options` (list of str; the correct one first for V* Bench, in the letter order for
  MagnifierBench; empty for TextVQA); `answer` (str: MagnifierBench's letter, else empty);
  `answers` (list of str: TextVQA's human answers, else empty);
- `image`: a `datasets.Image(decode=False)` value, `{"path", "bytes"}`; the evaluation opens it (`open_image`), so a
  missing or unreadable image is counted as a skipped item instead of stopping the load;
- `image_count` (int): how many images the item has (1; MagnifierBench lists them, and FlexAttention takes one).

Layouts (a local folder, or a Hub dataset repository holding the same files):

- V* Bench (`craigwu/vstar_bench`): `direct_attributes/` and `relative_position/`, each holding `<name>.json`
  (`question`, `options` with the correct option first) beside the image `<name>.jpg` (or .jpeg/.png/.webp).
- TextVQA val: `TextVQA_0.5.1_val.json` (its `data` list: `question_id`, `question`, `image_id`, `answers`) and the
  images as `train_images/<image_id>.jpg` (TextVQA's `train_val_images.zip`; the val questions use train images).
- MagnifierBench (`Otter-AI/MagnifierBench`): the Hub's parquet files (columns `id`, `instruction` = question and
  options as "... ? A. x, B. y, C. z, D. w", `answer` = letter, `images`), or the MIMIC-IT pair the FlexAttention
  authors read, `data_instructions.json` (`data`: id -> `instruction`, `answer`, `image_ids`) and `images.json`
  (image id -> base64).
"""

import base64
import io
import json
import os
import re
from pathlib import Path

import datasets
from PIL import Image


TASKS = ("vstar", "textvqa", "magnifier")
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
IMAGE_SUFFIXES = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG", ".webp")
TEXTVQA_ANNOTATIONS = "TextVQA_0.5.1_val.json"
TEXTVQA_IMAGES = "train_images"
MAGNIFIER_FILES = ("data_instructions.json", "images.json")

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "category": datasets.Value("string"),
        "question": datasets.Value("string"),
        "options": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "image": datasets.Image(decode=False),
        "image_count": datasets.Value("int32"),
    }
)


class ImageProblem(Exception):
    """An item's image is missing or cannot be read (the item is skipped and counted, never dropped).

    `reason` is the short cause counted in the summary (`"missing image"`, `"unreadable image"`, `"not one image"`),
    the message says which file.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def load_benchmark(task: str, data: str) -> datasets.Dataset:
    """Load benchmark `task` (`"vstar"`, `"textvqa"` or `"magnifier"`) from a folder or a Hub dataset id.

    Returns:
        A `datasets.Dataset` with the columns described in the module docstring, in a deterministic order.

    Raises:
        ValueError: for an unknown task, a folder that is not in the task's published layout (the message says what
            was expected and what was found), a malformed annotation file, or a Hub id that cannot be fetched.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: use one of {list(TASKS)}.")
    if task == "magnifier" and not os.path.exists(data):
        return _magnifier_from_hub_dataset(_load_hub_dataset(data), data)
    folder = _local_folder(data)
    return {"vstar": load_vstar, "textvqa": load_textvqa, "magnifier": load_magnifier}[task](folder)


def load_vstar(folder: str | Path) -> datasets.Dataset:
    """V* Bench from its published folder layout (see the module docstring); the correct option stays first."""
    folder = Path(folder)
    present = [name for name in VSTAR_CATEGORIES if (folder / name).is_dir() and any((folder / name).glob("*.json"))]
    if not present:
        raise ValueError(
            f"{folder} is not in V* Bench's layout: expected the folders {list(VSTAR_CATEGORIES)}, each holding "
            f"<name>.json (question, options, the correct option first) beside the image <name>.jpg; found "
            f"{_listing(folder)}."
        )
    rows = []
    for category in present:
        for annotation in sorted((folder / category).glob("*.json")):
            record = _read_json(annotation)
            question = record.get("question") if isinstance(record, dict) else None
            options = record.get("options") if isinstance(record, dict) else None
            if not isinstance(question, str) or not _is_string_list(options) or len(options) < 2:
                raise ValueError(
                    f"{annotation} is not a V* Bench annotation: expected a JSON object with a string 'question' and "
                    f"an 'options' list of at least 2 strings (the correct one first), found {_describe(record)}."
                )
            image = next(
                (annotation.with_suffix(s) for s in IMAGE_SUFFIXES if annotation.with_suffix(s).exists()), None
            )
            rows.append(
                _row(
                    f"{category}/{annotation.stem}",
                    category,
                    question,
                    options=options,
                    image_path=str(image) if image is not None else str(annotation.with_suffix(".jpg")),
                )
            )
    return datasets.Dataset.from_list(rows, features=FEATURES)


def load_textvqa(folder: str | Path) -> datasets.Dataset:
    """TextVQA val from `TextVQA_0.5.1_val.json` and `train_images/` (see the module docstring)."""
    folder = Path(folder)
    annotations = folder / TEXTVQA_ANNOTATIONS
    if not annotations.is_file():
        raise ValueError(
            f"{folder} is not in TextVQA's layout: expected {TEXTVQA_ANNOTATIONS} and the folder {TEXTVQA_IMAGES}/ "
            f"(<image_id>.jpg); found {_listing(folder)}."
        )
    try:
        raw = datasets.load_dataset("json", data_files=str(annotations), field="data", split="train")
    except Exception as error:  # noqa: BLE001 (datasets raises several types for one cause: a malformed file)
        raise ValueError(
            f"{annotations} could not be read as TextVQA annotations (a JSON object whose 'data' is a list of "
            f"questions): {type(error).__name__}: {error}"
        ) from error
    missing = {"question_id", "question", "image_id", "answers"} - set(raw.column_names)
    if missing:
        raise ValueError(
            f"{annotations} lacks the fields {sorted(missing)} in its 'data' entries (TextVQA 0.5.1 has question_id, "
            f"question, image_id and answers); found {sorted(raw.column_names)}."
        )
    images = folder / TEXTVQA_IMAGES
    if not images.is_dir():
        raise ValueError(
            f"{folder} holds {TEXTVQA_ANNOTATIONS} but no {TEXTVQA_IMAGES}/ folder (TextVQA's train_val_images.zip "
            f"extracts to it; the val questions use train images); found {_listing(folder)}."
        )
    rows = [
        _row(
            str(entry["question_id"]),
            "val",
            entry["question"],
            answers=[str(answer) for answer in entry["answers"] or []],
            image_path=str(images / f"{entry['image_id']}.jpg"),
        )
        for entry in raw
    ]
    return datasets.Dataset.from_list(rows, features=FEATURES)


def load_magnifier(folder: str | Path) -> datasets.Dataset:
    """MagnifierBench from a folder: the Hub's parquet files, or the authors' MIMIC-IT JSON pair."""
    folder = Path(folder)
    if all((folder / name).is_file() for name in MAGNIFIER_FILES):
        return _magnifier_from_mimic_it(folder)
    if any(folder.rglob("*.parquet")):
        return _magnifier_from_hub_dataset(_load_hub_dataset(str(folder)), str(folder))
    raise ValueError(
        f"{folder} is not in MagnifierBench's layout: expected the Hub's parquet files (Otter-AI/MagnifierBench: "
        f"columns id, instruction, answer, images) or the pair {list(MAGNIFIER_FILES)}; found {_listing(folder)}."
    )


def magnifier_options(instruction: str) -> tuple[str, list[str]]:
    """Split a MagnifierBench instruction, "question? A. x, B. y, C. z, D. w", into the question and the options.

    Raises:
        ValueError: if the instruction holds fewer than two lettered options.
    """
    matches = list(re.finditer(r"(?:^|[\s,])([A-Z])\.\s+", instruction))
    letters = [match.group(1) for match in matches]
    expected = [chr(ord("A") + index) for index in range(len(letters))]
    if len(matches) < 2 or letters != expected:
        raise ValueError(
            f"MagnifierBench instruction {instruction!r} does not list options as 'A. ..., B. ...' in order."
        )
    question = instruction[: matches[0].start()].strip()
    options = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(instruction)
        options.append(instruction[match.end() : end].strip().rstrip(",").strip())
    return question, options


def open_image(item: dict) -> Image.Image:
    """Decode the image of a benchmark row (its `image` and `image_count` columns) into an RGB image.

    Raises:
        ImageProblem: if the item has not exactly one image, the file is missing, or it is not a readable image.
    """
    value = item["image"]
    path, data = value.get("path"), value.get("bytes")
    if item.get("image_count", 1) != 1:
        raise ImageProblem("not one image", f"{path} lists {item['image_count']} images; FlexAttention takes one")
    if data is None and (path is None or not os.path.isfile(path)):
        raise ImageProblem("missing image", str(path))
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageProblem("unreadable image", f"{path or '(embedded bytes)'}: {type(error).__name__}") from error


def _row(
    item_id, category, question, *, options=(), answer="", answers=(), image_path=None, image_bytes=None, image_count=1
):
    return {
        "id": item_id,
        "category": category,
        "question": question,
        "options": list(options),
        "answer": answer,
        "answers": list(answers),
        "image": {"path": image_path, "bytes": image_bytes},
        "image_count": image_count,
    }


def _magnifier_from_mimic_it(folder: Path) -> datasets.Dataset:
    instructions, images = (_read_json(folder / name) for name in MAGNIFIER_FILES)
    if not isinstance(instructions, dict) or not isinstance(instructions.get("data"), dict):
        raise ValueError(
            f"{folder / MAGNIFIER_FILES[0]} is not a MIMIC-IT instruction file: expected {{'data': {{id: "
            f"{{'instruction', 'answer', 'image_ids'}}}}}}, found {_describe(instructions)}."
        )
    if not isinstance(images, dict):
        raise ValueError(
            f"{folder / MAGNIFIER_FILES[1]} must map image ids to base64 images, found {_describe(images)}."
        )
    rows = []
    for item_id, entry in instructions["data"].items():
        image_ids = entry.get("image_ids") or []
        encoded = images.get(image_ids[0]) if len(image_ids) == 1 else None
        rows.append(
            _magnifier_row(
                str(item_id),
                entry,
                image_path=f"{folder / MAGNIFIER_FILES[1]}:{image_ids[0] if image_ids else '(no image id)'}",
                image_bytes=base64.b64decode(encoded) if encoded is not None else None,
                image_count=len(image_ids),
            )
        )
    return datasets.Dataset.from_list(rows, features=FEATURES)


def _magnifier_from_hub_dataset(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    missing = {"id", "instruction", "answer", "images"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"{source} is not MagnifierBench: its rows lack {sorted(missing)} (expected id, instruction, answer, "
            f"images); found {sorted(dataset.column_names)}."
        )
    dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    rows = []
    for entry in dataset:
        images = entry["images"] or []
        first = images[0] if len(images) == 1 else {}
        rows.append(
            _magnifier_row(
                str(entry["id"]),
                entry,
                image_path=first.get("path") or f"{source}:{entry['id']}",
                image_bytes=first.get("bytes"),
                image_count=len(images),
            )
        )
    return datasets.Dataset.from_list(rows, features=FEATURES)


def _magnifier_row(item_id, entry, *, image_path, image_bytes, image_count) -> dict:
    instruction, answer = entry.get("instruction"), entry.get("answer")
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise ValueError(
            f"MagnifierBench item {item_id} lacks a string 'instruction' or 'answer': {_describe(entry)}."
        )
    question, options = magnifier_options(instruction)
    letter = answer.strip().upper()
    if len(letter) != 1 or not "A" <= letter < chr(ord("A") + len(options)):
        raise ValueError(
            f"MagnifierBench item {item_id} has answer {answer!r}, not one of its {len(options)} letters."
        )
    return _row(
        item_id,
        "all",
        question,
        options=options,
        answer=letter,
        image_path=image_path,
        image_bytes=image_bytes,
        image_count=image_count,
    )


def _load_hub_dataset(name: str) -> datasets.Dataset:
    """The test split (or the only split) of a dataset that `datasets.load_dataset` reads (a Hub id or folder)."""
    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # noqa: BLE001 (offline, unknown id, or unreadable files: one message for all)
        raise ValueError(
            f"Cannot load {name!r} with datasets.load_dataset ({type(error).__name__}: {error}). Pass a local folder "
            "in the benchmark's layout, or a Hub dataset id that is cached or reachable (HF_HUB_OFFLINE unset)."
        ) from error
    if "test" in loaded:
        return loaded["test"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"{name!r} has the splits {sorted(loaded)}; expected 'test' (or a single split).")


def _local_folder(data: str) -> str:
    """`data` if it is a folder; else a Hub dataset repository fetched (or found in the cache) as a folder."""
    if os.path.isdir(data):
        return data
    if os.path.exists(data):
        raise ValueError(f"--data {data!r} is a file: pass the benchmark's folder (or a Hub dataset id).")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=data, repo_type="dataset")
    except Exception as error:  # noqa: BLE001 (invalid id, offline without a cached copy, no access, ...)
        raise ValueError(
            f"--data {data!r} is neither a folder nor a Hub dataset that could be fetched ({type(error).__name__}: "
            f"{error}). Pass the benchmark's folder, or a Hub dataset id while online (or cached)."
        ) from error


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} could not be read as JSON: {error}") from error


def _is_string_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _describe(value) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:10]}"
    return f"a {type(value).__name__}"


def _listing(folder: Path, limit: int = 12) -> str:
    if not folder.is_dir():
        return "no such folder"
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    if not entries:
        return "an empty folder"
    shown = ", ".join(entries[:limit])
    return f"[{shown}{', ...' if len(entries) > limit else ''}] ({len(entries)} entries)"
