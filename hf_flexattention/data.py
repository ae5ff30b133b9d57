"""LLaVA conversation data for fine-tuning: a `Dataset` of LLaVA's JSON format and a collator for `Trainer`.

The JSON format is the one of LLaVA's instruction data (`llava_v1_5_mix665k.json`):

```json
[
  {"id": "0", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat color is the bus?"},
                     {"from": "gpt", "value": "The bus is white and red."},
                     {"from": "human", "value": "Where is it going?"},
                     {"from": "gpt", "value": "..."}]},
  {"id": "1", "conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "7"}]}
]
```

`image` is relative to an image folder; text-only samples have no `image`. A sample with an image holds exactly
one `<image>` placeholder in its human turns (FlexAttention takes one image per sample).

[`LlavaConversationCollator`] renders each conversation with the processor's chat template (or, without one, the
LLaVA-1.5 "v1" format `USER: ... ASSISTANT: ...</s>`), supervises every assistant turn including its end token,
masks everything else with -100, and runs the FlexAttention processor for the image inputs: with a
[`FlexLlavaProcessor`] (LLaVA-1.5) `pixel_values`, `high_res_pixel_values` and `original_image_sizes`; with a
[`FlexLlavaNextProcessor`] (LLaVA-NeXT) the stock `pixel_values` (base image and any-resolution crops) and
`image_sizes`; with a [`FlexLlavaOnevisionProcessor`] (LLaVA-OneVision) those and `batch_num_images`.

Example:

```python
>>> dataset = LlavaConversationDataset("llava_v1_5_mix665k.json", image_folder="data/")
>>> collator = LlavaConversationCollator(processor, max_length=2048)
>>> trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
```
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .modeling_flex import IGNORE_INDEX
from .patching import FAMILIES


IMAGE_PLACEHOLDER = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLES = ("system",)
# The image inputs each FlexAttention processor returns, passed on to the model as they come.
IMAGE_INPUT_NAMES = (
    "pixel_values",
    "high_res_pixel_values",
    "original_image_sizes",
    "image_sizes",
    "batch_num_images",
)
# The system prompt of LLaVA-1.5's "v1" conversation template (`conv_vicuna_v1`); opt in with `system_prompt=`.
LLAVA_V1_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class LlavaSample:
    """One conversation and its image (None for text-only samples).

    Datasets return these objects rather than dicts, so `Trainer`'s `remove_unused_columns` (which filters dict
    samples by the model's forward signature) leaves them alone.
    """

    conversations: list[dict[str, str]]
    image: Image.Image | None = None
    id: str | None = None


def _describe(index: int | None, sample_id: Any) -> str:
    where = "sample" if index is None else f"sample {index}"
    return where if sample_id is None else f"{where} (id {sample_id!r})"


def validate_conversation(conversations: Any, has_image: bool, where: str = "sample") -> None:
    """Check one LLaVA conversation; raise a `ValueError`/`TypeError` that says what to fix.

    It must be a list of `{"from": ..., "value": str}` turns with roles human/user, gpt/assistant or system, at
    least one answer (gpt/assistant) turn, and exactly one `<image>` placeholder (in a human turn) when the sample
    has an image, none otherwise.
    """
    if not isinstance(conversations, list) or not conversations:
        raise TypeError(
            f"{where}: `conversations` must be a non-empty list of {{'from': ..., 'value': ...}} turns, got "
            f"{type(conversations).__name__}."
        )
    placeholders = 0
    answers = 0
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise TypeError(
                f"{where}, turn {turn_index}: each turn must be a dict with 'from' and a string 'value', got {turn!r}."
            )
        role = turn["from"]
        if role not in USER_ROLES + ASSISTANT_ROLES + SYSTEM_ROLES:
            raise ValueError(
                f"{where}, turn {turn_index}: unknown role {role!r}; use 'human'/'user', 'gpt'/'assistant' or "
                "'system'."
            )
        count = turn["value"].count(IMAGE_PLACEHOLDER)
        if count and role not in USER_ROLES:
            raise ValueError(
                f"{where}, turn {turn_index}: {IMAGE_PLACEHOLDER!r} may only appear in a human turn, not in {role!r}."
            )
        placeholders += count
        answers += role in ASSISTANT_ROLES
    if answers == 0:
        raise ValueError(
            f"{where} has no answer turn: add a {{'from': 'gpt', 'value': ...}} turn (only answers are "
            "supervised, so this sample would train on nothing)."
        )
    expected = 1 if has_image else 0
    if placeholders != expected:
        if has_image:
            fix = (
                f"put exactly one {IMAGE_PLACEHOLDER!r} in its human turns (LLaVA uses '<image>\\n' + question "
                "in the first one); FlexAttention takes one image per sample"
            )
        else:
            fix = f"give it an 'image' or remove the {IMAGE_PLACEHOLDER!r} placeholder"
        state = "has an image" if has_image else "has no image"
        raise ValueError(f"{where} {state} but holds {placeholders} {IMAGE_PLACEHOLDER!r} placeholders: {fix}.")


def load_image(path: str | os.PathLike, where: str = "sample") -> Image.Image:
    """Open an image file fully as RGB; a missing or unreadable file raises a `ValueError` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError, ValueError) as error:
        raise ValueError(
            f"{where}: cannot open image file {os.fspath(path)!r} ({type(error).__name__}: {error}). Check the "
            "`image_folder` and that the file exists and is a readable image."
        ) from error


class LlavaConversationDataset(Dataset):
    """LLaVA's conversation JSON (a path or an already loaded list) plus an image folder, as a torch `Dataset`.

    Records are validated when the dataset is built (so a bad record fails before training starts); images are
    opened lazily in `__getitem__`, which returns a [`LlavaSample`].

    Args:
        data: path to the JSON file, or the list of records.
        image_folder: folder the records' `image` paths are relative to (default: the JSON file's folder).
    """

    def __init__(self, data: str | os.PathLike | Sequence[dict], image_folder: str | os.PathLike | None = None):
        if isinstance(data, (str, os.PathLike)):
            with open(data, encoding="utf-8") as file:
                records = json.load(file)
            default_folder = os.path.dirname(os.path.abspath(data))
        else:
            records, default_folder = data, os.getcwd()
        if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
            raise TypeError(
                f"The data must be a JSON list of {{'image': ..., 'conversations': [...]}} records, got "
                f"{type(records).__name__}."
            )
        self.records = list(records)
        self.image_folder = os.fspath(image_folder) if image_folder is not None else default_folder
        for index, record in enumerate(self.records):
            if not isinstance(record, dict) or "conversations" not in record:
                raise TypeError(f"Record {index} must be a dict with 'conversations' (LLaVA format), got {record!r}.")
            image = record.get("image")
            if image is not None and not isinstance(image, str):
                raise TypeError(
                    f"{_describe(index, record.get('id'))}: 'image' must be one relative path (FlexAttention takes "
                    f"one image per sample), got {image!r}."
                )
            validate_conversation(record["conversations"], image is not None, _describe(index, record.get("id")))

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> str | None:
        """Absolute path of the image of record `index` (None for a text-only record)."""
        image = self.records[index].get("image")
        return None if image is None else os.path.join(self.image_folder, image)

    def __getitem__(self, index: int) -> LlavaSample:
        record = self.records[index]
        path = self.image_path(index)
        where = _describe(index, record.get("id"))
        image = None if path is None else load_image(path, where)
        return LlavaSample(conversations=record["conversations"], image=image, id=record.get("id"))


def _as_sample(item: Any, index: int) -> LlavaSample:
    if isinstance(item, LlavaSample):
        return item
    if isinstance(item, dict) and "conversations" in item:
        return LlavaSample(conversations=item["conversations"], image=item.get("image"), id=item.get("id"))
    if isinstance(item, dict):
        raise ValueError(
            f"Batch item {index} has no 'conversations' (keys: {sorted(item)}). If a Trainer removed it, set "
            "`TrainingArguments(remove_unused_columns=False)` or use LlavaConversationDataset, whose LlavaSample "
            "items Trainer leaves alone."
        )
    raise TypeError(f"Batch item {index} must be a LlavaSample or a dict with 'conversations', got {type(item)}.")


class LlavaConversationCollator:
    """Turns [`LlavaSample`]s into a training batch for [`FlexLlavaForConditionalGeneration`],
    [`FlexLlavaNextForConditionalGeneration`] or [`FlexLlavaOnevisionForConditionalGeneration`].

    Each conversation is rendered with `processor.chat_template` when the processor has one, else in LLaVA-1.5's
    "v1" format (`[system ]USER: question ASSISTANT: answer</s>USER: ...`). Every assistant turn is supervised,
    including the token that ends it: when the rendered turn does not end with the tokenizer's EOS token (the
    llava-hf templates end it with a space), EOS replaces the trailing whitespace, so the model learns to stop as
    LLaVA-1.5 did. All other tokens (system, questions, image tokens, role names, padding) get label -100.

    Returns `input_ids`, `attention_mask`, `labels` (each `(batch, length)` long) and, when the batch has images,
    the processor's image inputs, one per image-bearing sample in batch order (text-only samples can share the
    batch): for a [`FlexLlavaProcessor`], `pixel_values` `(n_images, 3, S, S)`, `high_res_pixel_values`
    `(n_images, 3, zoom * S, zoom * S)` and `original_image_sizes` `(n_images, 2)`; for a [`FlexLlavaNextProcessor`],
    `pixel_values` `(n_images, max_patches, 3, S, S)` (base image then crops, zero-padded to the batch's most
    patches) and `image_sizes` `(n_images, 2)` (height, width); for a [`FlexLlavaOnevisionProcessor`], those and
    `batch_num_images` `(n_images,)` (all ones: one image per sample, which the model checks). Each `<image>`
    spans as many tokens as the processor expands it to (the low-res grid for LLaVA-1.5, the base image's grid for
    LLaVA-NeXT and LLaVA-OneVision).

    Args:
        processor: a [`FlexLlavaProcessor`] (its zoom must match the model's `flex_zoom`), a
            [`FlexLlavaNextProcessor`] or a [`FlexLlavaOnevisionProcessor`].
        max_length: truncate longer samples from the right; a sample whose image tokens or whose every answer
            token would be cut raises instead.
        padding_side: `"right"` (usual for training) or `"left"`.
        pad_to_multiple_of: pad the sequence length up to a multiple of this.
        system_prompt: text put before the first turn in the v1 format (LLaVA-1.5 trained with
            `LLAVA_V1_SYSTEM_PROMPT`; None keeps the llava-hf inference prompt `USER: <image>\\n... ASSISTANT:`).
        append_eos: whether to end each assistant turn with EOS when the rendering does not.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        system_prompt: str | None = None,
        append_eos: bool = True,
    ):
        _check_processor(processor)
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}.")
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token: set `processor.tokenizer.pad_token` (e.g. to unk).")
        if not getattr(tokenizer, "is_fast", True):
            raise TypeError("LlavaConversationCollator needs a fast tokenizer (for offsets): load it with use_fast.")
        self.processor = processor
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.system_prompt = system_prompt
        self.append_eos = append_eos

    # ----- rendering -------------------------------------------------------------------------------------------

    @staticmethod
    def _role(turn: dict) -> str:
        role = turn["from"]
        if role in USER_ROLES:
            return "user"
        return "assistant" if role in ASSISTANT_ROLES else "system"

    def _template_messages(self, conversations: list[dict]) -> list[dict]:
        """LLaVA turns as chat-template messages; the `<image>` placeholder becomes an image content part."""
        messages = []
        for turn in conversations:
            text = turn["value"]
            content = []
            if IMAGE_PLACEHOLDER in text:
                content.append({"type": "image"})
                text = text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
            content.append({"type": "text", "text": text})
            messages.append({"role": self._role(turn), "content": content})
        return messages

    def _template_segments(self, conversations: list[dict]) -> list[tuple[str, bool]]:
        """`(text, is_answer)` pieces of the chat-template rendering, found by rendering growing prefixes."""
        messages = self._template_messages(conversations)

        def render(count: int, generation_prompt: bool) -> str:
            return self.processor.apply_chat_template(
                messages[:count], add_generation_prompt=generation_prompt, tokenize=False
            )

        segments, done = [], ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, answered = render(index, True), render(index + 1, False)
            if not (prompt.startswith(done) and answered.startswith(prompt)):
                raise ValueError(
                    "The processor's chat template does not render conversations prefix by prefix (each turn "
                    "appended to the previous rendering), so answer turns cannot be located: pass a processor with "
                    "another `chat_template`, or `chat_template=None` for the LLaVA v1 format."
                )
            segments.append((prompt[len(done) :], False))
            segments.append((answered[len(prompt) :], True))
            done = answered
        final = render(len(messages), False)
        if final.startswith(done) and len(final) > len(done):
            segments.append((final[len(done) :], False))
        return segments

    def _v1_segments(self, conversations: list[dict]) -> list[tuple[str, bool]]:
        """`(text, is_answer)` pieces of LLaVA-1.5's v1 format: `USER: <image>\\nq ASSISTANT: a</s>USER: ...`."""
        eos = self.processor.tokenizer.eos_token or ""
        image_token = self.processor.image_token
        segments = []
        text = "" if self.system_prompt is None else self.system_prompt + " "
        for turn in conversations:
            role = self._role(turn)
            value = turn["value"]
            if IMAGE_PLACEHOLDER in value:  # as LLaVA's preprocessing does: the image opens its turn
                value = image_token + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()
            if role == "system":
                text += value + " "
            elif role == "user":
                text += f"USER: {value} ASSISTANT:"
            else:
                segments.append((text + " ", False))
                segments.append((value + eos, True))
                text = ""
        if text:
            segments.append((text, False))
        return segments

    def render(self, conversations: list[dict]) -> list[tuple[str, bool]]:
        """The conversation as `(text, is_answer)` pieces; their concatenation is the training text."""
        if self.processor.chat_template is not None:
            segments = self._template_segments(conversations)
        else:
            segments = self._v1_segments(conversations)
        eos = self.processor.tokenizer.eos_token
        if self.append_eos and eos:
            segments = [
                (text.rstrip() + eos, True) if answer and not text.rstrip().endswith(eos) else (text, answer)
                for text, answer in segments
            ]
        return segments

    def generation_prompt(self, conversations: list[dict]) -> str:
        """The inference prompt for a conversation that ends with a question (ends where the answer starts).

        It is exactly the training text up to the first answer character, so what `generate` continues is what
        training supervised.
        """
        if self.processor.chat_template is not None:
            messages = self._template_messages(conversations)
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        closed = list(conversations) + [{"from": "gpt", "value": ""}]
        segments = self._v1_segments(closed)
        return "".join(text for text, _ in segments[:-1]).rstrip()

    # ----- batching --------------------------------------------------------------------------------------------

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        samples = [_as_sample(item, index) for index, item in enumerate(items)]
        texts, segments, images = [], [], []
        for index, sample in enumerate(samples):
            where = _describe(index, sample.id) + " of the batch"
            if sample.image is not None and not isinstance(sample.image, Image.Image):
                raise TypeError(
                    f"{where}: the image must be a PIL image, got {type(sample.image).__name__} "
                    "(LlavaConversationDataset opens image files)."
                )
            validate_conversation(sample.conversations, sample.image is not None, where)
            pieces = self.render(sample.conversations)
            texts.append("".join(text for text, _ in pieces))
            segments.append(pieces)
            if sample.image is not None:
                images.append(sample.image)

        encoded = self.processor(
            images=images or None, text=texts, return_offsets_mapping=True, padding=False, truncation=False
        )
        image_token = self.processor.image_token
        image_token_id = self.processor.tokenizer.convert_tokens_to_ids(image_token)
        rows = []
        for index, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)):
            # The offsets index the text as the processor tokenised it, each `<image>` expanded to its image tokens.
            placeholders = texts[index].count(image_token)
            expansion = image_token * (ids.count(image_token_id) // placeholders if placeholders else 0)
            spans = self._answer_spans(segments[index], image_token, expansion)
            labels = [
                token if any(end > span_start and start < span_end for span_start, span_end in spans) else -100
                for token, (start, end) in zip(ids, offsets, strict=True)
            ]
            rows.append(self._truncate(ids, labels, _describe(index, samples[index].id) + " of the batch"))

        batch = self._pad(rows)
        for key in IMAGE_INPUT_NAMES:
            if key in encoded:
                batch[key] = _as_tensor(encoded[key])
        return batch

    @staticmethod
    def _answer_spans(segments: list[tuple[str, bool]], image_token: str, expansion: str) -> list[tuple[int, int]]:
        """Character spans of the answers (leading whitespace excluded) in the text with `<image>` expanded."""
        spans, length = [], 0
        for piece, is_answer in segments:
            expanded = piece.replace(image_token, expansion)
            if is_answer:
                spans.append((length + len(expanded) - len(expanded.lstrip()), length + len(expanded)))
            length += len(expanded)
        return spans

    def _truncate(self, ids: list[int], labels: list[int], where: str) -> tuple[list[int], list[int]]:
        image_token_id = self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        if self.max_length is not None and len(ids) > self.max_length:
            if image_token_id in ids[self.max_length :]:
                raise ValueError(
                    f"{where} has {len(ids)} tokens; max_length={self.max_length} would cut its image tokens: raise "
                    "max_length or drop the sample."
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            reason = f" within max_length={self.max_length}" if self.max_length is not None else ""
            raise ValueError(
                f"{where} has no supervised answer token{reason}: it would add nothing to the loss. Raise "
                "max_length, or check that the answers are not empty."
            )
        return ids, labels

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(ids) for ids, _ in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            place = slice(0, len(ids)) if self.padding_side == "right" else slice(length - len(ids), length)
            input_ids[row, place] = torch.tensor(ids, dtype=torch.long)
            labels[row, place] = torch.tensor(row_labels, dtype=torch.long)
            attention_mask[row, place] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _check_processor(processor: Any) -> None:
    """Refuse anything but a FlexAttention processor; a stock one is named with the call that wraps it.

    Raises:
        TypeError: a stock Llava / LLaVA-NeXT / LLaVA-OneVision processor (no high-res image for LLaVA-1.5, every
            crop's tokens in the prompt for the others), or anything else.
    """
    if isinstance(processor, tuple(family.flex_processor_class for family in FAMILIES)):
        return
    names = ", ".join(family.flex_processor_class.__name__ for family in FAMILIES)
    for family in FAMILIES:
        if isinstance(processor, family.processor_class):
            raise TypeError(
                f"`processor` must be a FlexAttention processor ({names}), got a stock {type(processor).__name__} "
                f"(its inputs are the unpatched model's): wrap it with `{family.wrap_call()}`."
            )
    raise TypeError(
        f"`processor` must be a FlexAttention processor ({names}), got {type(processor).__name__}: wrap the model's "
        f"processor with {' or '.join(f'`{family.wrap_call()}`' for family in FAMILIES)}."
    )


def _as_tensor(value: Any) -> torch.Tensor:
    """A processor output as a tensor: FlexLlavaProcessor returns tensors, the LLaVA-NeXT / OneVision processors
    (without `return_tensors`, which would also tensorise the unpadded `input_ids`) lists of equally shaped arrays
    (`pixel_values`, `image_sizes`) or of ints (`batch_num_images`)."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def write_colour_dataset(folder: str | os.PathLike, num_samples: int = 64, seed: int = 0) -> str:
    """Write a small synthetic LLaVA-format dataset (images + `data.json`) to `folder`; return the JSON path.

    Each image is a coloured sign on a noisy grey background, in varied sizes and aspect ratios; its sample asks
    "what color is the sign ?" (answer: the colour) and, every other sample, a second turn "is it <colour> ?"
    (yes/no). Every fifth sample is text-only ("what is two and three ?" -> "five"). Only words of the tiny
    tokenizer (`hf_flexattention.tiny.TINY_WORDS`) are used, so it serves the tiny model of the example and tests.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = list(COLOURS)
    records = []
    for index in range(num_samples):
        if index % 5 == 4:
            a, b = (int(v) for v in rng.integers(1, 6, size=2))
            question = f"what is {NUMBERS[a - 1]} and {NUMBERS[b - 1]} ?"
            records.append(
                {
                    "id": str(index),
                    "conversations": [
                        {"from": "human", "value": question},
                        {"from": "gpt", "value": NUMBERS[a + b - 1]},
                    ],
                }
            )
            continue
        colour = names[int(rng.integers(len(names)))]
        width, height = (int(v) for v in rng.integers(40, 97, size=2))
        pixels = rng.integers(100, 156, size=(height, width, 3)).astype(np.uint8)
        side = min(width, height) // 2
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        pixels[top : top + side, left : left + side] = COLOURS[colour]
        path = f"images/{index:04d}.png"
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(folder, path))
        conversations = [
            {"from": "human", "value": "<image>\nwhat color is the sign ?"},
            {"from": "gpt", "value": colour},
        ]
        if index % 2:
            asked = names[int(rng.integers(len(names)))]
            conversations += [
                {"from": "human", "value": f"is it {asked} ?"},
                {"from": "gpt", "value": "yes" if asked == colour else "no"},
            ]
        records.append({"id": str(index), "image": path, "conversations": conversations})
    json_path = os.path.join(folder, "data.json")
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump(records, file, indent=1)
    return json_path


__all__ = [
    "IGNORE_INDEX",
    "LLAVA_V1_SYSTEM_PROMPT",
    "LlavaConversationCollator",
    "LlavaConversationDataset",
    "LlavaSample",
    "load_image",
    "validate_conversation",
    "write_colour_dataset",
]
