"""Train a small Llava, built in code, on the synthetic visual-search task in three variants, and compare them.

The variants share the seed, the data, the number of optimizer steps, the frozen vision tower and every weight that
they have in common at the start:

* `low_res`: stock Llava; the image enters the sequence as its `g x g` low-res tokens only;
* `flex`: the same model patched with FlexAttention (threshold selection, the high-res blend ramp driven by
  `HighResRampCallback`); the `zoom x zoom` high-res tiles stay outside the sequence;
* `full_high_res`: stock Llava with every high-res tile's tokens in the sequence (`zoom**2 * g * g` image tokens).

The vision tower is shared and frozen in all three (as LLaVA-1.5 freezes CLIP). No pretrained tower can be
downloaded here, so it is first taught to read the task's font patch by patch on generic tiles
(`pretrain_vision_tower`, never a task image). The projector (with `nn.Linear`'s own init: see `build_model`) and
the language model are trained from scratch, and the FlexAttention variant also trains its `hr_k_proj` /
`hr_v_proj`. By default the questions are "what letter is in the <colour> box ?" with one box per image, free
answer (`--multiple-choice-share` adds prompts that list the options; `--boxes`, `--letter-clutter`, `--kind`,
`--letter-scale` change the task).

Evaluation (on `--eval-split`: `validation` while developing, `test` once at the end): multiple-choice accuracy
(the option with the highest likelihood wins, as in V* Bench), free-answer accuracy (greedy generation), for
FlexAttention the mean fraction of high-res tokens selected, the hit rate per layer (the answer row's
selection covers at least half of the target's box) and the attention on the target (the answer row's low-res
attention per pixel of the target's box over its mean per pixel of the image: 1 for a row that does not look at
it), and the per-sample cost of a free answer: wall time of `generate` on this machine and analytic FLOPs from
`hf_flexattention.cost`.

    python examples/train_visual_search.py                      # all three variants, validation split
    # The README's table, and the model the package ships (about 15 min on 2 CPU cores):
    python examples/train_visual_search.py --eval-split test --threads 2 \
        --save-flex hf_flexattention/pretrained/visual_search
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Trainer,
    TrainingArguments,
)
from transformers import logging as transformers_logging

from hf_flexattention import FlexLlavaProcessor, patch_model
from hf_flexattention.cost import LlavaShapes, decode_step_flops, prefill_flops
from hf_flexattention.data import LlavaConversationCollator, LlavaSample
from hf_flexattention.high_res import split_into_tiles
from hf_flexattention.tiny import word_level_processor
from hf_flexattention.tracing import FlexTrace
from hf_flexattention.training import HighResRampCallback
from hf_flexattention.visual_search import COLOURS, LETTERS, WORDS, glyph_mask, make_sample, to_conversation
from hf_flexattention.visualize import cell_map


VARIANTS = ("low_res", "flex", "full_high_res")
IMAGE_SIZE, PATCH_SIZE, ZOOM = 32, 4, 3
IMAGE_TOKEN = "<image>"


def build_processor(zoom: int = ZOOM) -> FlexLlavaProcessor:
    """A word-level tokenizer over the task's words and a PIL image processor at the tower's 32 px."""
    return word_level_processor(list(dict.fromkeys(WORDS)), zoom, IMAGE_SIZE, PATCH_SIZE)


class FullHighResProcessor(FlexLlavaProcessor):
    """Expands `<image>` to every high-res tile's tokens (`zoom**2` times the low-res count), for the stock model
    that reads all of them; the collator below turns the high-res image into the tiles it encodes."""

    def _num_image_tokens(self, low_res_side: int) -> int:
        return super()._num_image_tokens(low_res_side) * self.zoom**2


def build_model(
    variant: str, vocab_size: int, image_token_id: int, args, tower_state: dict | None = None
) -> LlavaForConditionalGeneration:
    """The small Llava of `variant`; the same seed gives every variant the same initial weights."""
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    grid = IMAGE_SIZE // PATCH_SIZE
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=grid * grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config)
    # nn.Linear's own (Kaiming-uniform) init for the projector instead of Llava's N(0, 0.02): with the latter the
    # letter signal reaching the language model trained from scratch is too weak, and every variant stayed on the
    # loss plateau of guessing (measured; see the README's visual-search section).
    for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
        layer.reset_parameters()
    if tower_state is not None:
        model.model.vision_tower.load_state_dict(tower_state)
    model.model.vision_tower.requires_grad_(False)  # frozen, as LLaVA-1.5 freezes CLIP
    if variant == "flex":
        model = patch_model(
            model,
            n_fa=args.n_fa,
            selection=args.selection,
            threshold=args.threshold,
            topk_ratio=args.topk_ratio,
            selection_grid=args.selection_grid,
        )
    return model


def pretraining_tiles(rng: np.random.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` tiles of the tower's size for its pretraining, and the letter under each patch.

    Each tile has a noisy light background and one to three letters of the task's font (dark ink, some in a framed
    box of a random colour) in random patches: generic reading practice, like the text that CLIP saw. The label of a
    patch is `1 + letter index` when it holds a letter, else 0.

    Returns:
        `(pixels (count, 3, S, S) uint8, labels (count, g * g) long)`.
    """
    grid = IMAGE_SIZE // PATCH_SIZE
    pixels = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.zeros((count, grid * grid), dtype=np.int64)
    colours = list(COLOURS.values())
    for index in range(count):
        tile = rng.integers(140, 230, size=(1, 1, 3)) + rng.integers(-12, 13, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        tile = tile.clip(0, 255).astype(np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            # A letter fills one patch, as in the task's boxes (`visual_search.BOX_ALIGNMENT`).
            column, row = (int(v) for v in rng.integers(0, grid, size=2))
            left, top = column * PATCH_SIZE, row * PATCH_SIZE
            letter = int(rng.integers(len(LETTERS)))
            if rng.random() < 0.5 and 0 < column < grid - 1 and 0 < row < grid - 1:
                tile[top - 2 : top + 6, left - 2 : left + 6] = colours[int(rng.integers(len(colours)))]
                tile[top - 1 : top + 5, left - 1 : left + 5] = rng.integers(190, 256, size=(6, 6, 1))
            ink = glyph_mask(LETTERS[letter])
            tile[top : top + 4, left : left + 4][ink] = rng.integers(0, 70, size=(int(ink.sum()), 1))
            labels[index, row * grid + column] = 1 + letter
        pixels[index] = tile
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(labels)


def pretrain_vision_tower(model: LlavaForConditionalGeneration, processor: FlexLlavaProcessor, args) -> None:
    """Teach the (shared) vision tower to read the task's letters, patch by patch, then freeze it.

    LLaVA-1.5 starts from a pretrained CLIP; no tower can be downloaded here, so this short stage stands in for it.
    It sees tiles of generic letters (`pretraining_tiles`), never a task image or question.
    """
    if args.pretrain_steps == 0:
        return
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, 1 + len(LETTERS))
    parameters = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-3)
    rng = np.random.default_rng(args.seed + 1000)
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    # Most patches hold no letter's centre: weigh them down so that reading the letters dominates the loss.
    weight = torch.ones(1 + len(LETTERS))
    weight[0] = 0.1
    tower.train()
    progress = tqdm(range(args.pretrain_steps), desc="pretrain the vision tower")
    for step in progress:
        pixels, labels = pretraining_tiles(rng, 32)
        pixel_values = (pixels.float() / 255 - mean) / std
        hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        logits = head(hidden).flatten(0, 1)
        loss = torch.nn.functional.cross_entropy(logits, labels.flatten(), weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.pretrain_steps - 1:
            letters = labels.flatten() > 0
            accuracy = (logits[letters].argmax(-1) == labels.flatten()[letters]).float().mean()
            progress.set_postfix(loss=f"{loss.item():.3f}", letter_accuracy=f"{accuracy.item():.2f}")
    print(f"vision tower pretrained: last batch's letter-patch accuracy {accuracy.item():.2f}", flush=True)
    tower.eval()
    tower.requires_grad_(False)


class VisualSearchDataset(Dataset):
    """`count` samples of `split`; a share `multiple_choice_share` of them (by index) asks the multiple-choice form."""

    def __init__(self, split: str, count: int, multiple_choice_share: float = 0.5, **sample_kwargs):
        self.samples = [make_sample(split, index, **sample_kwargs) for index in range(count)]
        self.multiple_choice_share = multiple_choice_share

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> LlavaSample:
        sample = self.samples[index]
        multiple_choice = (index % 20) < 20 * self.multiple_choice_share
        return LlavaSample(to_conversation(sample, multiple_choice=multiple_choice), sample.image, str(index))


class VariantCollator:
    """`LlavaConversationCollator`'s batch, reduced to what the variant's model reads."""

    def __init__(self, variant: str, processor: FlexLlavaProcessor):
        self.variant = variant
        self.collator = LlavaConversationCollator(processor)

    def __call__(self, items) -> dict:
        return adapt_batch(self.variant, self.collator(items))


def adapt_batch(variant: str, batch: dict) -> dict:
    if variant == "flex":
        return batch
    high_res = batch.pop("high_res_pixel_values")
    batch.pop("original_image_sizes")
    if variant == "full_high_res":
        batch["pixel_values"] = split_into_tiles(high_res, IMAGE_SIZE)
    return batch


def sample_kwargs(args) -> dict:
    """`make_sample` settings from the command line (`--kind`, `--boxes`)."""
    return {
        "kind": None if args.kind == "both" else args.kind,
        "boxes": args.boxes,
        "letter_clutter": args.letter_clutter,
        "letter_scale": args.letter_scale,
    }


def processor_for(variant: str) -> FlexLlavaProcessor:
    processor = build_processor()
    if variant == "full_high_res":
        processor.__class__ = FullHighResProcessor
    return processor


def pretrained_tower(args) -> dict | None:
    """The vision tower's weights after `pretrain_vision_tower` (one tower, shared by every variant)."""
    if args.pretrain_steps == 0:
        return None
    processor = build_processor()
    tokenizer = processor.tokenizer
    model = build_model("low_res", len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), args)
    pretrain_vision_tower(model, processor, args)
    return {key: value.clone() for key, value in model.model.vision_tower.state_dict().items()}


def train(
    variant: str, args, tower_state: dict | None
) -> tuple[LlavaForConditionalGeneration, FlexLlavaProcessor, float]:
    processor = processor_for(variant)
    tokenizer = processor.tokenizer
    model = build_model(variant, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), args, tower_state)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, variant),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=VisualSearchDataset(
            "train", args.train_samples, multiple_choice_share=args.multiple_choice_share, **sample_kwargs(args)
        ),
        data_collator=VariantCollator(variant, processor),
        callbacks=[HighResRampCallback()] if variant == "flex" else None,
    )
    start = time.perf_counter()
    trainer.train()
    return model.eval(), processor, time.perf_counter() - start


def box_coverage(selected: torch.Tensor, box: tuple[int, int, int, int], image_side: int) -> float:
    """The fraction of the box's pixels that lie in selected high-res tokens (`selected`: `(G*G,)` bool; the
    image is square, so there is no padding margin)."""
    grid = int(selected.numel() ** 0.5)
    pixels = cell_map(selected.view(grid, grid).numpy(), (image_side, image_side))
    left, top, right, bottom = box
    return float(pixels[top:bottom, left:right].mean())


def attention_lift(low_res_map: torch.Tensor, box: tuple[int, int, int, int], image_side: int) -> float:
    """How much more low-res attention (per pixel) the target's box gets than the image on average (1: none).

    `low_res_map` `(g*g,)` is the answer row's attention over the low-res tokens (the map the selection
    thresholds); each token's attention is spread over the pixels of its cell, so a row that ignores where the
    target is gets 1 in expectation, and one that looks at it gets more. Unlike the hit rate, it does not grow with
    the share of the image the threshold keeps.
    """
    grid = int(low_res_map.numel() ** 0.5)
    pixels = cell_map(low_res_map.view(grid, grid).double().numpy(), (image_side, image_side))
    left, top, right, bottom = box
    return float(pixels[top:bottom, left:right].mean() / pixels.mean())


@torch.no_grad()
def evaluate(variant: str, model, processor: FlexLlavaProcessor, args) -> dict:
    """Accuracies, selection statistics and cost on `args.eval_samples` samples of `args.eval_split`."""
    collator = LlavaConversationCollator(processor)
    tokenizer = processor.tokenizer
    mc_correct = free_correct = 0
    times, fractions, hits, coverages, lifts = [], [], {}, {}, {}
    samples = [make_sample(args.eval_split, index, **sample_kwargs(args)) for index in range(args.eval_samples)]
    for sample in tqdm(samples, desc=f"evaluate {variant} on {args.eval_split}"):
        # Multiple choice: the option whose answer tokens have the lowest loss (one row per option).
        options = [
            LlavaSample(
                to_conversation(sample, args.multiple_choice_share > 0)[:1] + [{"from": "gpt", "value": option}],
                sample.image,
            )
            for option in sample.options
        ]
        batch = adapt_batch(variant, collator(options))
        labels = batch["labels"]
        logits = model(**batch).logits.float()
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none"
        ).sum(dim=1) / (labels[:, 1:] != -100).sum(dim=1)
        mc_correct += sample.options[int(losses.argmin())] == sample.answer

        # Free answer: greedy generation, timed.
        prompt = collator.generation_prompt(to_conversation(sample, False)[:1])
        inputs = processor(images=sample.image, text=prompt, return_tensors="pt")
        inputs = adapt_batch(variant, dict(inputs))
        if len(times) < args.timed_samples:  # timed without a trace (tracing reads tensors on the host)
            if not times:
                model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            times.append(time.perf_counter() - start)
        traced = {"flex_trace": FlexTrace()} if variant == "flex" else {}
        output = model.generate(**inputs, max_new_tokens=2, do_sample=False, **traced)
        trace = traced.get("flex_trace")
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        free_correct += answer == sample.answer
        if trace is not None:
            selections = trace.selections_for(inputs["input_ids"].shape[1] - 1)
            for layer, (low_res_map, selected) in selections.items():
                coverage = box_coverage(selected, sample.target_box, sample.image.width)
                coverages.setdefault(layer, []).append(coverage)
                lifts.setdefault(layer, []).append(attention_lift(low_res_map, sample.target_box, sample.image.width))
                hits.setdefault(layer, []).append(coverage >= 0.5)
                fractions.append(float(selected.float().mean()))
    count = len(samples)
    result = {
        "variant": variant,
        "split": args.eval_split,
        "samples": count,
        "mc_accuracy": mc_correct / count,
        "free_accuracy": free_correct / count,
        "seconds_per_sample": sum(times) / len(times),
    }
    if variant == "flex":
        result["selected_fraction"] = sum(fractions) / len(fractions)
        result["hit_rate"] = {str(layer): sum(v) / len(v) for layer, v in sorted(hits.items())}
        result["box_coverage"] = {str(layer): sum(v) / len(v) for layer, v in sorted(coverages.items())}
        result["attention_lift"] = {str(layer): sum(v) / len(v) for layer, v in sorted(lifts.items())}
    result["gflops_per_sample"] = generation_flops(variant, model, inputs) / 1e9
    return result


def generation_flops(variant: str, model, inputs) -> float:
    """Analytic FLOPs of one free answer (prefill and one decode step) from `hf_flexattention.cost`."""
    config = model.config
    n_fa = config.flex_n_fa if variant == "flex" else 0
    shapes = LlavaShapes.from_config(config, n_fa=n_fa, zoom=ZOOM)
    image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    text_tokens = inputs["input_ids"].shape[1] - image_tokens
    cost_variant = {"low_res": "a", "flex": "b", "full_high_res": "c"}[variant]
    context = text_tokens + (shapes.high_res_tokens if variant == "full_high_res" else shapes.low_res_tokens)
    return prefill_flops(shapes, cost_variant, text_tokens) + decode_step_flops(shapes, cost_variant, context)


def format_table(results: list[dict]) -> str:
    lines = [
        "| variant | MC acc | free acc | selected | hit rate per layer | attention on target (x uniform) "
        "| s / sample | GFLOPs / sample | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        hit = ", ".join(f"L{layer}: {rate:.2f}" for layer, rate in r.get("hit_rate", {}).items()) or "-"
        lift = ", ".join(f"L{layer}: {value:.2f}" for layer, value in r.get("attention_lift", {}).items()) or "-"
        selected = f"{r['selected_fraction']:.1%}" if "selected_fraction" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['mc_accuracy']:.1%} | {r['free_accuracy']:.1%} | {selected} | {hit} | {lift} | "
            f"{r['seconds_per_sample'] * 1e3:.1f} ms | {r['gflops_per_sample']:.3f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["flex", "low_res", "full_high_res"])
    parser.add_argument("--kind", choices=("letter", "colour", "both"), default="letter", help="question kind")
    parser.add_argument("--boxes", type=int, default=1, help="framed boxes per letter question (1-4)")
    parser.add_argument("--letter-clutter", type=float, default=0.0, help="share of clutter that is letters")
    parser.add_argument(
        "--multiple-choice-share", type=float, default=0.0, help="share of training questions with their options"
    )
    parser.add_argument(
        "--letter-scale", type=int, default=1, help="font pixel size of the boxed letter (2+: a legible control)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="vision tower pretraining steps (0: none)")
    parser.add_argument("--train-samples", type=int, default=19200)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--n-fa", type=int, default=2)
    parser.add_argument("--selection", choices=("threshold", "topk"), default="threshold")
    parser.add_argument("--threshold", type=float, default=48 / 255)
    parser.add_argument("--topk-ratio", type=float, default=0.25, help="--selection topk's budget")
    parser.add_argument("--selection-grid", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-split", choices=("validation", "test"), default="validation")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--timed-samples", type=int, default=30, help="samples whose generate is timed")
    parser.add_argument("--output-dir", default="outputs/visual_search")
    parser.add_argument(
        "--save-flex",
        help="folder to save the trained FlexAttention model, processor, model card and task.json to "
        "(hf_flexattention/pretrained/visual_search is the one the package ships)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.save_flex and "flex" not in args.variants:
        parser.error("--save-flex saves the FlexAttention variant: add flex to --variants")
    transformers_logging.set_verbosity_warning()
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    results = []
    start = time.perf_counter()
    tower_state = pretrained_tower(args)
    pretrain_seconds = time.perf_counter() - start
    for variant in args.variants:
        model, processor, seconds = train(variant, args, tower_state)
        result = evaluate(variant, model, processor, args)
        result["train_seconds"] = seconds
        result["tower_pretrain_seconds"] = pretrain_seconds
        print(json.dumps(result), flush=True)
        results.append(result)
        if variant == "flex":
            flex_model, flex_processor = model, processor
    with open(os.path.join(args.output_dir, f"results_{args.eval_split}.json"), "w") as file:
        json.dump({"args": vars(args), "results": results}, file, indent=1)
    table = format_table(results)
    print(table)
    if args.save_flex:
        save_flex_model(flex_model, flex_processor, args, results, table)
    return 0


def without_auto_map(saved):
    """A saved JSON value without its `auto_map` entries, at any depth (the processor nests its parts' configs)."""
    if isinstance(saved, dict):
        return {key: without_auto_map(value) for key, value in saved.items() if key != "auto_map"}
    return [without_auto_map(value) for value in saved] if isinstance(saved, list) else saved


def save_flex_model(model, processor: FlexLlavaProcessor, args, results: list[dict], table: str) -> None:
    """Save the FlexAttention variant as `load_shipped_model` reads it: weights, config, processor, `task.json`
    (the `make_sample` settings it was trained on, the command, every variant's figures) and a model card.

    Without remote code: `save_pretrained` copies the plugin's modules into the folder for `trust_remote_code`, but
    this model is shipped inside the plugin, whose classes load it; the copies would only go stale there. For the
    Hub, `hf_flexattention.hub.push_to_hub` adds them back.
    """
    folder = Path(args.save_flex)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for module in folder.glob("*.py"):
        module.unlink()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            saved = without_auto_map(json.loads(path.read_text()))
            path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    command = "python examples/train_visual_search.py " + " ".join(args.argv)
    task = {"sample_kwargs": sample_kwargs(args), "command": command, "results": results}
    (folder / "task.json").write_text(json.dumps(task, indent=1) + "\n")
    config = model.config
    (folder / "README.md").write_text(
        "---\nlibrary_name: hf_flexattention\npipeline_tag: image-text-to-text\n"
        "tags: [hf_flexattention, flexattention, llava, visual-search, synthetic]\n---\n\n"
        "# FlexAttention Llava trained on a synthetic visual-search task\n\n"
        "A small Llava (CLIP tower 32 px / patch 4, 2 layers; Llama, "
        f"{config.text_config.num_hidden_layers} layers, hidden {config.text_config.hidden_size}; vocabulary: the "
        "task's words) with FlexAttention ([Li et al., ECCV 2024](https://arxiv.org/abs/2407.20228)) in its top "
        f"{config.flex_n_fa} layers ({config.flex_selection} selection, threshold {config.flex_threshold:.4f}, zoom "
        f"{config.flex_zoom}: {config.low_res_grid**2} low-res tokens in the sequence, {config.high_res_grid**2} "
        'high-res tokens outside it). It answers "what letter is in the <colour> box ?" about images of '
        "`hf_flexattention.visual_search.make_sample(split, index, **task.json's sample_kwargs)`, whose 4 px letter "
        "cannot be read at low resolution. It is the default model of `python -m hf_flexattention.demo`.\n\n"
        "## How to load\n\n"
        "```python\nfrom hf_flexattention.visual_search import load_shipped_model\n\n"
        "model, processor, task = load_shipped_model()\n```\n\n"
        "or `FlexLlavaForConditionalGeneration.from_pretrained(folder)` and "
        "`FlexLlavaProcessor.from_pretrained(folder)` (`hf_flexattention` must be installed: the folder holds no "
        "remote code).\n\n"
        "## Training and evaluation\n\n"
        "Trained from scratch (the frozen vision tower was first taught the task's font on generic tiles, never a "
        "task image) with\n\n"
        f"```bash\n{command}\n```\n\n"
        f"Figures on {results[0]['samples']} samples of the `{args.eval_split}` split, beside the stock low-res and "
        "full high-res variants trained with the same seed, data and budget (time: `generate` on the CPU that "
        "trained them):\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
