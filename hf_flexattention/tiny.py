"""Tiny random Llava models built in code, for the demo, the tests and the benchmarks (no download)."""

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)


TEXT_BACKBONES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
TINY_VOCAB_SIZE = 96
TINY_IMAGE_TOKEN_ID = TINY_VOCAB_SIZE - 1
# The tiny LLaVA-OneVision's `<video>` (`tiny_llava_onevision_config`'s `video_token_index`), just before `<image>`.
TINY_VIDEO_TOKEN_ID = TINY_IMAGE_TOKEN_ID - 1
TINY_PAD_TOKEN_ID = 0
# Any-resolution grids of the tiny LLaVA-NeXT, (height, width) in pixels: crops of the 32 px tower in 1x2, 2x1, 2x2.
TINY_IMAGE_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_llava_config(
    backbone: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 4,
) -> LlavaConfig:
    """A small `LlavaConfig`: CLIP at `image_size`/`patch_size` (an 8x8 token grid by default) and a `backbone`
    language model (`"llama"`, `"mistral"` or `"qwen2"`, grouped-query attention by default)."""
    if backbone not in TEXT_BACKBONES:
        raise ValueError(f"Unknown backbone {backbone!r}: use one of {sorted(TEXT_BACKBONES)}.")
    text_kwargs = {
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 1024,
        "pad_token_id": TINY_PAD_TOKEN_ID,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if backbone in ("mistral", "qwen2"):
        text_kwargs["sliding_window"] = None
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=TEXT_BACKBONES[backbone](**text_kwargs),
        image_token_index=TINY_IMAGE_TOKEN_ID,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def tiny_llava_next_config(backbone: str = "llama", **kwargs) -> LlavaNextConfig:
    """A small `LlavaNextConfig`: `tiny_llava_config`'s towers (same arguments) with `TINY_IMAGE_GRID_PINPOINTS`."""
    llava = tiny_llava_config(backbone, **kwargs)
    return LlavaNextConfig(
        vision_config=llava.vision_config,
        text_config=llava.text_config,
        image_token_index=llava.image_token_id,
        image_grid_pinpoints=TINY_IMAGE_GRID_PINPOINTS,
        image_seq_length=llava.image_seq_length,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def tiny_llava_onevision_config(
    backbone: str = "qwen2", *, vision_aspect_ratio: str = "anyres_max_9", **kwargs
) -> LlavaOnevisionConfig:
    """A small `LlavaOnevisionConfig`: a SigLIP tower (no CLS token, `"full"` features) at `tiny_llava_config`'s
    size, a `backbone` language model (Qwen2 as released), `TINY_IMAGE_GRID_PINPOINTS` and `vision_aspect_ratio`
    (`"anyres_max_2"` shrinks the 2x2 grid's 16x16 crop tokens to 11x11, as large grids shrink on the real model)."""
    llava = tiny_llava_config(backbone, **kwargs)
    clip = llava.vision_config
    vision_config = SiglipVisionConfig(
        hidden_size=clip.hidden_size,
        intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_hidden_layers,
        num_attention_heads=clip.num_attention_heads,
        image_size=clip.image_size,
        patch_size=clip.patch_size,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=llava.text_config,
        image_token_index=llava.image_token_id,
        video_token_index=llava.image_token_id - 1,
        image_grid_pinpoints=TINY_IMAGE_GRID_PINPOINTS,
        vision_aspect_ratio=vision_aspect_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def build_tiny_llava_onevision(
    backbone: str = "qwen2",
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    attention_sharpness: float = 16.0,
    **config_kwargs,
) -> LlavaOnevisionForConditionalGeneration:
    """A randomly initialised (seeded) tiny `LlavaOnevisionForConditionalGeneration` in eval mode."""
    config = tiny_llava_onevision_config(backbone, **config_kwargs)
    return _build(
        LlavaOnevisionForConditionalGeneration, config, seed, attn_implementation, dtype, attention_sharpness
    )


def _build(model_class, config, seed: int, attn_implementation: str, dtype: torch.dtype, attention_sharpness: float):
    """`model_class(config)` seeded, in `dtype`, with sharpened attention, in eval mode."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_class(config).to(dtype)
    # At the default init scale, tiny attention is almost uniform and every selection would be all-or-nothing;
    # sharper queries and keys give the peaked attention maps that trained models have.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(attention_sharpness)
            layer.self_attn.k_proj.weight.mul_(attention_sharpness)
    return model.eval()


def build_tiny_llava_next(
    backbone: str = "llama",
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    attention_sharpness: float = 16.0,
    **config_kwargs,
) -> LlavaNextForConditionalGeneration:
    """A randomly initialised (seeded) tiny `LlavaNextForConditionalGeneration` in eval mode."""
    config = tiny_llava_next_config(backbone, **config_kwargs)
    return _build(LlavaNextForConditionalGeneration, config, seed, attn_implementation, dtype, attention_sharpness)


def build_tiny_llava(
    backbone: str = "llama",
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    attention_sharpness: float = 16.0,
    **config_kwargs,
) -> LlavaForConditionalGeneration:
    """A randomly initialised (seeded) tiny `LlavaForConditionalGeneration` in eval mode."""
    config = tiny_llava_config(backbone, **config_kwargs)
    return _build(LlavaForConditionalGeneration, config, seed, attn_implementation, dtype, attention_sharpness)


TINY_WORDS = (
    "USER: ASSISTANT: what is in the image ? a an of on to and this that color text sign read say says "
    "red green blue black white cat dog car house tree sky small large left right top bottom yes no one two three "
    "four five six seven eight nine ten it there are how many where which word letter number describe picture"
).split()


def _tiny_words() -> list[str]:
    # TINY_WORDS, then fillers up to the tiny vocabulary, so that `<image>` is TINY_IMAGE_TOKEN_ID.
    words = list(dict.fromkeys(TINY_WORDS))
    return words + [f"w{index}" for index in range(TINY_VOCAB_SIZE - 1 - len(_SPECIAL_TOKENS) - len(words))]


def build_tiny_processor(zoom: int = 3, image_size: int = 32, patch_size: int = 4):
    """A `FlexLlavaProcessor` for the tiny model: a word-level tokenizer built in code and a PIL image processor."""
    return word_level_processor(_tiny_words(), zoom, image_size, patch_size)


def build_tiny_next_processor(image_size: int = 32, patch_size: int = 4):
    """A `FlexLlavaNextProcessor` for the tiny LLaVA-NeXT model (`build_tiny_llava_next`): `build_tiny_processor`'s
    tokenizer and LLaVA-NeXT's PIL image processor at `image_size` pixels with `TINY_IMAGE_GRID_PINPOINTS`."""
    from transformers import LlavaNextImageProcessorPil

    from .processing_flex_llava_next import FlexLlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=TINY_IMAGE_GRID_PINPOINTS,
    )
    return FlexLlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=word_level_tokenizer(_tiny_words()),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_tiny_onevision_processor(image_size: int = 32, patch_size: int = 4):
    """A `FlexLlavaOnevisionProcessor` for the tiny LLaVA-OneVision model (`build_tiny_llava_onevision`):
    `build_tiny_processor`'s words with `<video>` (`TINY_VIDEO_TOKEN_ID`) in place of the last filler, `<image>`
    (`TINY_IMAGE_TOKEN_ID`) last, and LLaVA-OneVision's PIL image processor at `image_size` pixels with
    `TINY_IMAGE_GRID_PINPOINTS`; `num_image_tokens` = (image_size / patch_size) ** 2."""
    from transformers import LlavaOnevisionImageProcessorPil

    from .processing_flex_llava_onevision import FlexLlavaOnevisionProcessor

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=TINY_IMAGE_GRID_PINPOINTS
    )
    # The stock OneVision processor takes `video_token_id` from the tokenizer: give it the model's video id.
    return FlexLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=word_level_tokenizer(_tiny_words()[:-1], video_token="<video>"),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
    )


_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def word_level_tokenizer(words: list[str], video_token: str | None = None):
    """A whitespace word-level `PreTrainedTokenizerFast` built in code (no download).

    Token ids: `<pad>`, `<s>`, `</s>`, `<unk>` are 0-3, `words` follow in order, then `video_token` if given
    (`len(words) + 4`, registered as the tokenizer's `video_token`), and `<image>` comes last; prompts are left
    padded.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    media = ["<image>"] if video_token is None else [video_token, "<image>"]
    vocab = {word: index for index, word in enumerate([*_SPECIAL_TOKENS, *words, *media])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"}
        | ({} if video_token is None else {"video_token": video_token}),
    )


def word_level_processor(words: list[str], zoom: int = 3, image_size: int = 32, patch_size: int = 4):
    """A `FlexLlavaProcessor` over `word_level_tokenizer(words)` (`<image>` is `len(words) + 4`) and LLaVA's PIL
    image processor at `image_size` pixels."""
    from transformers import LlavaImageProcessorPil

    from .processing_flex_llava import FlexLlavaProcessor

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return FlexLlavaProcessor(
        image_processor=image_processor,
        tokenizer=word_level_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        zoom=zoom,
    )
