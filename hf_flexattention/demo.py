"""Answer one question about one image with a FlexAttention Llava model, and show what it looked at.

Without arguments it runs the small FlexAttention Llava that the package ships (trained by
`examples/train_visual_search.py` on the synthetic visual-search task, `hf_flexattention.visual_search`; no
download, a second on a CPU) on a test image of that task: it prints the question, the answer, the truth and the
time, and writes pictures of the low-res attention and the selected high-res tokens (`--output`). With `--model`
it runs a Llava checkpoint (a FlexAttention one, or a stock one patched on load):

    python -m hf_flexattention.demo                       # the shipped model, test sample 0
    python -m hf_flexattention.demo --sample 7            # another test sample
    python -m hf_flexattention.demo --model llava-hf/llava-1.5-7b-hf --image sign.jpg --prompt "What does it say?"

The pictures need matplotlib (`pip install "hf_flexattention[viz]"`); without it the demo says so and writes none.
"""

import argparse
import time

import torch
from PIL import Image, ImageDraw

from .loading import apply_settings, load_flex_model, load_flex_processor
from .processing_flex_llava import FlexLlavaProcessor
from .visual_search import load_shipped_model, make_sample
from .visualize import save_pictures, trace_generation


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_MAX_NEW_TOKENS = {"model": 32, "shipped": 8}


def make_test_image(width: int = 120, height: int = 80) -> Image.Image:
    """A small non-square image with coloured shapes and a line of text (deterministic)."""
    image = Image.new("RGB", (width, height), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((6, 6, 40, 34), fill=(200, 30, 30))
    draw.ellipse((80, 8, 112, 40), fill=(30, 60, 200))
    draw.polygon([(10, 74), (30, 46), (50, 74)], fill=(30, 160, 60))
    draw.text((58, 56), "STOP 42", fill=(0, 0, 0))
    return image


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m hf_flexattention.demo`."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_flexattention.demo",
        description="Generate an answer with a FlexAttention Llava model and show the high-res tokens each "
        "FlexAttention layer selected. Without --model: the model shipped in the package, on a test image of the "
        "synthetic visual-search task it was trained on.",
    )
    parser.add_argument(
        "--model",
        help="Llava checkpoint (Hub id or local folder): a FlexAttention checkpoint keeps its trained hr projections "
        "and settings, a stock one is patched; needs --image and --prompt",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=0,
        help="shipped model: which test-split sample of the visual-search task to ask about (default: 0)",
    )
    parser.add_argument("--image", help="image file to ask about (default: the visual-search test sample)")
    parser.add_argument("--prompt", help="question, or a full prompt holding <image> (default: the sample's question)")
    parser.add_argument(
        "--n-fa",
        type=int,
        help="FlexAttention layers at the top (default: a FlexAttention checkpoint's own; else 23 of 32)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="selection threshold in [0, 1) (default: a FlexAttention checkpoint's own; else 48/255)",
    )
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: 32; shipped model: 8)")
    parser.add_argument(
        "--output",
        default="flex_selection.png",
        help="where to write the selection pictures (PNG; two more files get _layers / _tokens suffixes)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: float16 on CUDA, else float32)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser


def load_image(path: str, parser: argparse.ArgumentParser) -> Image.Image:
    """Open `path` as an RGB image, or exit with an argparse error naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        parser.error(f"cannot open image file {path!r}: {error}")


def build_prompt(processor: FlexLlavaProcessor, question: str) -> str:
    """Use a prompt that already holds the image token as is; otherwise wrap the question in the chat format."""
    if processor.image_token in question:
        return question
    if processor.chat_template:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {processor.image_token}\n{question} ASSISTANT:"  # the LLaVA-1.5 format


def main(argv: list[str] | None = None) -> int:
    """Run the demo; `argv` defaults to the command line. Returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None and (args.image is None or args.prompt is None):
        parser.error("--model needs --image FILE and --prompt TEXT")
    if args.sample < 0:
        parser.error(f"--sample must be >= 0, got {args.sample}")
    mode = "model" if args.model is not None else "shipped"
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[mode]
    if max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    settings = {"n_fa": args.n_fa, "threshold": args.threshold}
    truth = None
    if mode == "model":
        try:
            # Loading straight onto the device avoids a full CPU copy of a multi-GB checkpoint.
            model = load_flex_model(args.model, settings, families=("llava",), dtype=dtype, device_map=device)
            processor = load_flex_processor(args.model, zoom=model.config.flex_zoom)
        except (OSError, TypeError, ValueError) as error:
            parser.error(f"cannot load --model {args.model!r}: {error}")
        image, question = load_image(args.image, parser), args.prompt
    else:
        model, processor, task = load_shipped_model(device=device, dtype=dtype)
        try:
            apply_settings(model, {k: v for k, v in settings.items() if v is not None})
        except (TypeError, ValueError) as error:
            parser.error(str(error))
        sample = make_sample("test", args.sample, **task["sample_kwargs"])
        image = load_image(args.image, parser) if args.image is not None else sample.image
        question = args.prompt if args.prompt is not None else sample.question
        if args.image is None and args.prompt is None:
            truth = sample.answer

    prompt = build_prompt(processor, question)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device, dtype=dtype)
    config = model.config
    num_layers = config.text_config.num_hidden_layers
    high_res_tokens = config.high_res_grid**2
    if mode == "model":
        print(f"model:      {args.model} on {device}, {str(dtype).split('.')[-1]}")
        print(f"image:      {args.image} ({image.width}x{image.height})")
    else:
        print(f"model:      the visual-search model shipped in the package on {device}, {str(dtype).split('.')[-1]}")
        where = args.image or f"visual-search test sample {args.sample}"
        print(f"image:      {where} ({image.width}x{image.height})")
    print(f"prompt:     {prompt!r}")
    print(
        f"settings:   n_fa={config.flex_n_fa} of {num_layers} layers, {config.flex_selection} selection (threshold "
        f"{config.flex_threshold:.4f}), zoom={config.flex_zoom}, {config.low_res_grid**2} low-res tokens in the "
        f"prompt, {high_res_tokens} high-res tokens outside it"
    )

    # Traced first: besides recording the selections, this run absorbs one-time costs so the timing excludes them.
    pictures = trace_generation(model, processor, image, question, max_new_tokens)
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start

    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    answer = processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    print(f"answer:     {answer!r}")
    if truth is not None:
        print(f"truth:      {truth!r} ({'right' if answer == truth else 'wrong'})")
        figures = {result["variant"]: result for result in task["results"]}
        flex, low_res = figures["flex"], figures["low_res"]
        print(
            f"            (this model answers {flex['free_accuracy']:.1%} of {flex['samples']} {flex['split']} "
            f"samples right; the low-res model trained alike, {low_res['free_accuracy']:.1%}; chance 12.5%)"
        )
    print(f"generate:   {len(new_tokens)} tokens in {elapsed * 1e3:.1f} ms (greedy, KV cache)")
    print("high-res tokens selected for the answer's first token (the prompt's last row):")
    for layer, (_, selected) in sorted(pictures.per_token[0].items()):
        count = int(selected.sum())
        print(f"  layer {layer:3d}: {count:6d} / {high_res_tokens} ({count / high_res_tokens:6.1%})")
    try:
        paths = save_pictures(pictures, args.output)
    except ImportError as error:
        print(f"pictures:   not written: {error}")
    else:
        print("pictures:   " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
