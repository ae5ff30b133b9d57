"""Answer one question about one image with a FlexAttention Llava model, and show what it looked at.

Without arguments it runs a tiny random model built in code on a drawn test image (no download, a few seconds on a
CPU; the answer is random words, the point is the mechanics). With `--model` it runs a real Llava checkpoint:

    python -m hf_flexattention.demo
    python -m hf_flexattention.demo --model llava-hf/llava-1.5-7b-hf --image sign.jpg --prompt "What does it say?"
"""

import argparse
import time

import torch
from PIL import Image, ImageDraw

from .loading import apply_settings, load_flex_model, load_flex_processor
from .processing_flex_llava import FlexLlavaProcessor


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TINY_PROMPT = "USER: <image>\nwhat color is the text on the sign ? ASSISTANT:"
# The tiny language model has 4 layers: two FlexAttention layers, and one below them to select for the first.
TINY_N_FA = 2
DEFAULT_MAX_NEW_TOKENS = {"model": 32, "tiny": 8}


def make_test_image(width: int = 120, height: int = 80) -> Image.Image:
    """A small non-square image with coloured shapes and a line of text (deterministic)."""
    image = Image.new("RGB", (width, height), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((6, 6, 40, 34), fill=(200, 30, 30))
    draw.ellipse((80, 8, 112, 40), fill=(30, 60, 200))
    draw.polygon([(10, 74), (30, 46), (50, 74)], fill=(30, 160, 60))
    draw.text((58, 56), "STOP 42", fill=(0, 0, 0))
    return image


def load_default_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """`(model, processor)` used when no `--model` is given: a tiny random Llava built in code, patched with
    FlexAttention (`TINY_N_FA` layers)."""
    from .tiny import build_tiny_llava, build_tiny_processor

    model = build_tiny_llava(dtype=dtype).to(device)
    return apply_settings(model, {"n_fa": TINY_N_FA}), build_tiny_processor()


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m hf_flexattention.demo`."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_flexattention.demo",
        description="Generate an answer with a FlexAttention-patched Llava model and report the high-res tokens "
        "each FlexAttention layer selected. Without --model: a tiny random model on a drawn image.",
    )
    parser.add_argument(
        "--model",
        help="Llava checkpoint (Hub id or local folder): a FlexAttention checkpoint keeps its trained hr projections "
        "and settings, a stock one is patched; needs --image and --prompt",
    )
    parser.add_argument("--image", help="image file to ask about (default: a drawn test image)")
    parser.add_argument("--prompt", help="question, or a full prompt holding <image> (default: a tiny-vocab question)")
    parser.add_argument(
        "--n-fa",
        type=int,
        help="FlexAttention layers at the top (default: a FlexAttention checkpoint's own; else 23 of 32, tiny: 2)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="selection threshold in [0, 1) (default: a FlexAttention checkpoint's own; else 48/255)",
    )
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: 32; tiny model: 8)")
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
    mode = "model" if args.model is not None else "tiny"
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[mode]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    image = load_image(args.image, parser) if args.image is not None else make_test_image()

    settings = {"n_fa": args.n_fa, "threshold": args.threshold}
    if mode == "model":
        try:
            # Loading straight onto the device avoids a full CPU copy of a multi-GB checkpoint.
            model = load_flex_model(args.model, settings, families=("llava",), dtype=dtype, device_map=device)
            processor = load_flex_processor(args.model, zoom=model.config.flex_zoom)
        except (OSError, TypeError, ValueError) as error:
            parser.error(f"cannot load --model {args.model!r}: {error}")
    else:
        from .tiny import build_tiny_llava, build_tiny_processor

        model = build_tiny_llava(dtype=dtype).to(device)
        processor = build_tiny_processor()
        try:
            apply_settings(model, {"n_fa": TINY_N_FA, **{k: v for k, v in settings.items() if v is not None}})
        except (TypeError, ValueError) as error:
            parser.error(str(error))

    prompt = build_prompt(processor, args.prompt) if args.prompt is not None else TINY_PROMPT
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device, dtype=dtype)
    config = model.config
    num_layers = config.text_config.num_hidden_layers
    high_res_tokens = config.high_res_grid**2
    print(f"model:      {args.model or 'tiny random Llava (built in code)'} on {device}, {str(dtype).split('.')[-1]}")
    print(f"image:      {args.image or 'drawn test image'} ({image.width}x{image.height})")
    print(f"prompt:     {prompt!r}")
    print(
        f"settings:   n_fa={config.flex_n_fa} of {num_layers} layers, {config.flex_selection} selection (threshold "
        f"{config.flex_threshold:.4f}), zoom={config.flex_zoom}, {config.low_res_grid**2} low-res tokens in the "
        f"prompt, {high_res_tokens} high-res tokens outside it"
    )

    with torch.no_grad():
        trace = []
        # Besides the trace, this forward absorbs one-time costs so the generate timing below excludes them.
        model(**inputs, flex_trace=trace)
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
    if mode == "tiny":
        print("            (a random tiny model built in code: its answer is random words; --model runs a real one)")
    print(f"generate:   {len(new_tokens)} tokens in {elapsed:.2f} s (greedy, KV cache)")
    print("high-res tokens selected for the answer's first row (the prompt's last row):")
    for layer, counts in trace:
        selected = int(counts[0, 0])
        print(f"  layer {layer:3d}: {selected:6d} / {high_res_tokens} ({selected / high_res_tokens:6.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
