"""Score a FlexAttention Llava model on the paper's high-resolution benchmarks, with the stock model beside it.

    python -m hf_flexattention.evaluate --task vstar --data vstar_bench/ --model llava-v1.5-7b-flexattn-hf \\
        --baseline --output vstar.json

Tasks and protocols (the authors' protocols, `hf_flexattention.protocols`):

- `vstar`: V* Bench. `--protocol likelihood` (default; the authors' and V*'s own): each option is scored by the
  mean log-likelihood of its tokens as the answer (teacher forcing; with labels, the answer rows are the high-res
  rows); the item is correct when the published first option scores strictly highest. `--protocol generation`:
  the options are shown as lettered choices in a fixed per-item shuffled order and the generated letter is parsed.
- `textvqa`: TextVQA val, generation with LLaVA's "Answer the question using a single word or phrase.", scored with
  the standard VQA accuracy (`hf_flexattention.vqa_accuracy`).
- `magnifier`: MagnifierBench, multiple choice as in the authors' script: the options one per line, "Answer with
  the option's letter from the given choices directly.", the generated letter parsed.

Writes the per-item predictions as JSON lines next to `--output` (`results.json` -> `results.predictions.jsonl`),
one line per item and model variant, flushed after every batch: `--resume` continues an interrupted run from the
items already written. `--output` gets the summary: accuracy per category, counts, skipped items and why, the mean
fraction of high-res tokens selected, model, settings, versions and duration. `--baseline` also runs the model
unpatched (the stock Llava model: the same prompts and low-res pixels, no high-res inputs) on the same items.
"""

import argparse
import collections
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from . import __version__
from .benchmarks import ImageProblem, load_benchmark, open_image
from .demo import DTYPES
from .loading import flex_settings, load_flex_model, load_flex_processor
from .patching import is_patched, unpatch_model
from .protocols import (
    PROMPT_FORMATS,
    SHORT_ANSWER,
    build_prompt,
    generate_answers,
    letters,
    multiple_choice_text,
    option_order,
    parse_choice,
    score_options,
)
from .vqa_accuracy import vqa_accuracy


PROTOCOLS = {"vstar": ("likelihood", "generation"), "textvqa": ("generation",), "magnifier": ("generation",)}
VARIANTS = ("flexattention", "stock")
# The paper's numbers for LLaVA-1.5-7B and LLaVA-FlexAttn (Tables 1-2, as reported in
# shared/reference/flexattention-spec.md section 3.1; V* attribute derived from overall and spatial).
PAPER = {
    "vstar": {
        "overall": {"stock": 47.6, "flexattention": 54.5},
        "direct_attributes": {"stock": 41.7, "flexattention": 47.8},
        "relative_position": {"stock": 56.6, "flexattention": 64.5},
    },
    "textvqa": {"overall": {"stock": 46.0, "flexattention": 48.9}},
    "magnifier": {"overall": {"stock": 26.8, "flexattention": 35.0}},
}
# Settings that must match to resume a run (the others, e.g. --limit, --batch-size, --baseline, may change).
RUN_KEYS = ("task", "protocol", "data", "model", "prompt_format", "max_new_tokens", "dtype", "flex_settings")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m hf_flexattention.evaluate`."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_flexattention.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="Data layouts: see hf_flexattention.benchmarks or the README's Evaluation section.",
    )
    parser.add_argument("--task", required=True, choices=list(PROTOCOLS))
    parser.add_argument("--data", required=True, help="the benchmark's folder, or a Hub dataset id")
    parser.add_argument(
        "--model",
        required=True,
        help="Llava checkpoint (Hub id or folder): a FlexAttention checkpoint keeps its trained hr projections and "
        "settings, a stock one is patched (--n-fa, --threshold)",
    )
    parser.add_argument(
        "--output", required=True, help="summary JSON path; predictions go to <stem>.predictions.jsonl"
    )
    parser.add_argument("--protocol", help="vstar: likelihood (default, the authors') or generation")
    parser.add_argument("--baseline", action="store_true", help="also run the unpatched (stock) model")
    parser.add_argument("--limit", type=int, help="evaluate the first N items only")
    parser.add_argument("--batch-size", type=int, default=8, help="items per batch (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation protocol (default: 32)")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="llava_v1", help="default: llava_v1")
    parser.add_argument("--n-fa", type=int, help="FlexAttention layers (default: the checkpoint's, else 23 of 32)")
    parser.add_argument("--threshold", type=float, help="selection threshold in [0, 1) (default: the checkpoint's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run whose predictions are at --output")
    resume.add_argument("--overwrite", action="store_true", help="start again, replacing earlier results")
    return parser


def predictions_path(output: str | Path) -> Path:
    """Where the per-item predictions of the run summarised at `output` go."""
    output = Path(output)
    return output.with_name(f"{output.stem}.predictions.jsonl")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Stop with a usage error for every bad option, before anything is loaded."""
    protocols = PROTOCOLS[args.task]
    if args.protocol is None:
        args.protocol = protocols[0]
    elif args.protocol not in protocols:
        parser.error(f"--task {args.task} supports --protocol {' or '.join(protocols)}, not {args.protocol!r}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1 (it counts items to evaluate), got {args.limit}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be at least 1")
    existing = [path for path in (Path(args.output), predictions_path(args.output)) if path.exists()]
    if existing and not (args.resume or args.overwrite):
        parser.error(
            f"{', '.join(map(str, existing))} already exist: pass --resume to continue that run, or --overwrite to "
            "replace it"
        )
    if Path(args.output).suffix != ".json":
        parser.error(f"--output must be a .json file (the summary), got {args.output!r}")


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; `argv` defaults to the command line. Returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        dataset = load_benchmark(args.task, args.data)
    except ValueError as error:
        parser.error(str(error))
    try:
        model = load_flex_model(
            args.model,
            {"n_fa": args.n_fa, "threshold": args.threshold},
            families=("llava",),
            dtype=dtype,
            device_map=device,
        )
        processor = load_flex_processor(args.model, zoom=model.config.flex_zoom)
    except (OSError, TypeError, ValueError) as error:
        parser.error(f"cannot load --model {args.model!r}: {error}")
    try:
        summary = evaluate(
            model,
            processor,
            dataset,
            task=args.task,
            protocol=args.protocol,
            output=args.output,
            data=args.data,
            model_name=args.model,
            baseline=args.baseline,
            limit=args.limit,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            prompt_format=args.prompt_format,
            resume=args.resume,
        )
    except ValueError as error:
        parser.error(str(error))
    print(format_summary(summary))
    return 0


def check_image_token(model, processor) -> None:
    """Raise a ValueError unless the model has an image token and the processor's tokenizer maps to it."""
    image_token_id = getattr(model.config, "image_token_id", None)
    token = getattr(processor, "image_token", None)
    tokenizer_id = processor.tokenizer.convert_tokens_to_ids(token) if token is not None else None
    if image_token_id is None or tokenizer_id is None or tokenizer_id != image_token_id:
        raise ValueError(
            f"The model's image token id is {image_token_id} but its processor's image token {token!r} is id "
            f"{tokenizer_id}: evaluation needs a Llava checkpoint whose tokenizer has the image token the model was "
            "trained with (config.image_token_id). Load the processor saved with the checkpoint."
        )


def evaluate(
    model,
    processor,
    dataset,
    *,
    task: str,
    protocol: str,
    output: str | Path,
    data: str = "",
    model_name: str = "",
    baseline: bool = False,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    prompt_format: str = "llava_v1",
    resume: bool = False,
) -> dict:
    """Evaluate `model` (a FlexAttention model) on `dataset` (from `load_benchmark`), then, with `baseline`, the same
    model unpatched; write the predictions (JSON lines) and the summary (JSON) and return the summary.

    With `resume`, items already in the predictions file (same run settings) are kept and not recomputed; otherwise
    the files are replaced. `model` is left unpatched after a baseline run.

    Raises:
        ValueError: for a model without an image token, an unpatched model, `limit < 1`, an unknown task or
            protocol, or a predictions file from a run with other settings (or corrupt) when resuming.
    """
    if protocol not in PROTOCOLS.get(task, ()):
        raise ValueError(f"Task {task!r} supports the protocols {list(PROTOCOLS.get(task, ()))}, not {protocol!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (it counts items to evaluate), got {limit}.")
    if not is_patched(model):
        raise ValueError(
            "evaluate() needs a FlexAttention model (load_flex_model or patch_model); it unpatches it "
            "itself for the baseline."
        )
    check_image_token(model, processor)
    started = time.perf_counter()
    run = {
        "task": task,
        "protocol": protocol,
        "data": str(data),
        "model": str(model_name),
        "prompt_format": prompt_format,
        "max_new_tokens": max_new_tokens if protocol == "generation" else None,
        "dtype": str(model.dtype).removeprefix("torch."),
        "flex_settings": flex_settings(model),
    }
    items = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    path = predictions_path(output)
    Path(output).unlink(missing_ok=True)  # written at the end: never leave an old summary beside new predictions
    records = _read_predictions(path, run) if resume and path.exists() else {}
    if not records:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps({"run": run}) + "\n")
    variants = VARIANTS if baseline else VARIANTS[:1]
    with open(path, "a", encoding="utf-8") as file:
        for variant in variants:
            if variant == "stock":
                unpatch_model(model)
            _run_variant(
                model,
                processor,
                items,
                records,
                file,
                variant,
                task,
                protocol,
                batch_size,
                max_new_tokens,
                prompt_format,
            )
    summary = summarize(records, items, run, variants)
    summary.update(
        {
            "predictions": str(path),
            "limit": limit,
            "batch_size": batch_size,
            "device": str(model.device),
            "hardware": torch.cuda.get_device_name(model.device)
            if model.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "versions": _versions(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
    )
    Path(output).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _run_variant(
    model, processor, items, records, file, variant, task, protocol, batch_size, max_new_tokens, prompt_format
) -> None:
    from tqdm.auto import tqdm

    todo = [index for index, item_id in enumerate(items["id"]) if (variant, item_id) not in records]
    progress = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{task} {variant}", unit="item")
    high_res = variant == "flexattention"
    for start in range(0, len(todo), batch_size):
        batch = [items[index] for index in todo[start : start + batch_size]]
        begin = time.perf_counter()
        ready, images, new = [], [], []
        for item in batch:
            try:
                images.append(open_image(item))
                ready.append(item)
            except ImageProblem as problem:
                record = {"variant": variant, "id": item["id"], "category": item["category"]}
                new.append({**record, "skipped": problem.reason, "detail": str(problem)})
        if ready:
            new += _answer(model, processor, ready, images, task, protocol, high_res, max_new_tokens, prompt_format)
        seconds = (time.perf_counter() - begin) / len(batch)
        for record in new:
            record["seconds"] = round(seconds, 4)
            records[(variant, record["id"])] = record
            file.write(json.dumps(record) + "\n")
        file.flush()
        progress.update(len(batch))
    progress.close()


def _answer(model, processor, items, images, task, protocol, high_res, max_new_tokens, prompt_format) -> list[dict]:
    """Records of `items` (all with readable `images`) under `task`/`protocol`, one batch."""
    variant = "flexattention" if high_res else "stock"
    base = [{"variant": variant, "id": item["id"], "category": item["category"]} for item in items]
    if protocol == "likelihood":
        question = [build_prompt(processor, f"{item['question']}\n{SHORT_ANSWER}", prompt_format) for item in items]
        scores, selected = score_options(
            model, processor, question, [item["options"] for item in items], images, high_res=high_res
        )
        for record, item_scores, fraction in zip(base, scores, selected, strict=True):
            means = [total / count for total, count in item_scores]
            best = max(means)
            record.update(
                {
                    "option_logprob_sums": [round(total, 6) for total, _ in item_scores],
                    "option_token_counts": [count for _, count in item_scores],
                    "prediction": means.index(best),
                    # The published correct option is first: a tie with it is not counted as a win.
                    "correct": float(means[0] == best and means.count(best) == 1),
                    "tie": means.count(best) > 1,
                    "selected_fraction": fraction,
                }
            )
        return base

    if task == "textvqa":
        texts = [f"{item['question']}\n{SHORT_ANSWER}" for item in items]
        orders = [None] * len(items)
    else:
        orders = [
            option_order(item["id"], len(item["options"])) if task == "vstar" else list(range(len(item["options"])))
            for item in items
        ]
        texts = [
            multiple_choice_text(item["question"], [item["options"][k] for k in order])
            for item, order in zip(items, orders, strict=True)
        ]
    prompts = [build_prompt(processor, text, prompt_format) for text in texts]
    answers, selected = generate_answers(
        model, processor, prompts, images, max_new_tokens=max_new_tokens, high_res=high_res
    )
    for record, item, order, answer, fraction in zip(base, items, orders, answers, selected, strict=True):
        record.update({"answer": answer, "selected_fraction": fraction})
        if task == "textvqa":
            record["correct"] = vqa_accuracy(answer, item["answers"]) if item["answers"] else 0.0
            record["human_answers"] = len(item["answers"])
            continue
        shown = [item["options"][k] for k in order]
        choice = parse_choice(answer, shown)
        target = order.index(0) if task == "vstar" else letters(len(shown)).index(item["answer"])
        record.update(
            {
                "shown_order": order,
                "target": letters(len(shown))[target],
                "parsed": letters(len(shown))[choice] if choice is not None else None,
                "correct": float(choice == target),
            }
        )
    return base


def summarize(records: dict, items, run: dict, variants) -> dict:
    """Accuracy (skipped items count as wrong, and are counted), per category and overall, for each variant."""
    categories = dict(zip(items["id"], items["category"], strict=True))
    results = {}
    for variant in variants:
        groups = collections.defaultdict(list)
        for item_id, category in categories.items():
            record = records.get((variant, item_id))
            if record is not None:
                groups[category].append(record)
                groups["overall"].append(record)
        results[variant] = {
            "complete": len(groups["overall"]) == len(categories),
            "seconds": round(sum(record.get("seconds", 0.0) for record in groups["overall"]), 2),
            "groups": {name: _group_summary(group, run) for name, group in sorted(groups.items())},
        }
    return {**run, "items": len(categories), "results": results, "paper": PAPER.get(run["task"])}


def _group_summary(group: list[dict], run: dict) -> dict:
    scored = [record for record in group if "skipped" not in record]
    skipped = collections.Counter(record["skipped"] for record in group if "skipped" in record)
    fractions = [record["selected_fraction"] for record in scored if record.get("selected_fraction") is not None]
    total = sum(record["correct"] for record in scored)
    summary = {
        # Skipped items stay in the denominator (as wrong): a missing image never makes a model look better.
        "accuracy": total / len(group) if group else None,
        "accuracy_of_scored": total / len(scored) if scored else None,
        "items": len(group),
        "scored": len(scored),
        "skipped": sum(skipped.values()),
        "skipped_reasons": dict(skipped),
        "skipped_ids": [record["id"] for record in group if "skipped" in record],
        "mean_selected_fraction": sum(fractions) / len(fractions) if fractions else None,
    }
    if run["protocol"] == "likelihood":
        summary["ties"] = sum(record["tie"] for record in scored)
    elif run["task"] != "textvqa":
        summary["unparsed"] = sum(record["parsed"] is None for record in scored)
    else:
        summary["not_10_answers"] = sum(record["human_answers"] != 10 for record in scored)
    return summary


def format_summary(summary: dict) -> str:
    """A short table of the summary: accuracy per category and variant, and the paper's figures."""
    lines = [
        f"task: {summary['task']} ({summary['protocol']}), {summary['items']} items, model {summary['model']}",
        "",
        "| variant | category | accuracy % | items | scored | skipped | high-res selected % | paper % |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    paper = summary.get("paper") or {}
    for variant, result in summary["results"].items():
        for category, group in result["groups"].items():
            accuracy = "-" if group["accuracy"] is None else f"{100 * group['accuracy']:.1f}"
            fraction = group["mean_selected_fraction"]
            reference = paper.get(category)
            figure = "-" if reference is None else f"{reference[variant]:.1f}"
            lines.append(
                f"| {variant} | {category} | {accuracy} | {group['items']} | {group['scored']} | {group['skipped']} | "
                f"{'-' if fraction is None else f'{100 * fraction:.1f}'} | {figure} |"
            )
    lines.append("")
    lines.append(f"predictions: {summary['predictions']}")
    return "\n".join(lines)


def _read_predictions(path: Path, run: dict) -> dict:
    """The records of an earlier run of the same settings; a half-written last line (an interruption) is dropped."""
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    complete = lines[:-1]  # every record ends with a newline; what follows the last one was cut off
    if lines[-1]:
        with open(path, "w", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in complete))
    if not complete:
        return {}
    try:
        header = json.loads(complete[0])["run"]
        entries = [json.loads(line) for line in complete[1:]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a predictions file of this tool ({error}); pass --overwrite.") from error
    header = {key: header.get(key) for key in RUN_KEYS}
    differing = {key: (header[key], run[key]) for key in RUN_KEYS if header[key] != run[key]}
    if differing:
        detail = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in differing.items())
        raise ValueError(f"Cannot resume {path}: it was written with other settings ({detail}). Pass --overwrite.")
    return {(entry["variant"], entry["id"]): entry for entry in entries}


def _versions() -> dict:
    import datasets

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "hf_flexattention": __version__,
    }


if __name__ == "__main__":
    sys.exit(main())
