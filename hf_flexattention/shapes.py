"""Llava configs in the exact shapes of released checkpoints, built in code (random weights, no download).

Time, memory and FLOPs depend on shapes, not on trained weights, so a model built from one of these configs on a GPU
measures what the real checkpoint would cost. `--shape` in the benchmarks and in `python -m hf_flexattention.cost`
takes these names.
"""

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)


def _clip_vit_large_336() -> CLIPVisionConfig:
    """CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336), LLaVA-1.5's vision tower."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def _vicuna(hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32064,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    )


# name: (Hub id of the checkpoint whose shapes it copies, language model (hidden, MLP, layers, heads))
SHAPES = {
    "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", (4096, 11008, 32, 32)),
    "llava-1.5-13b": ("llava-hf/llava-1.5-13b-hf", (5120, 13824, 40, 40)),
}


def shaped_llava_config(name: str) -> LlavaConfig:
    """The `LlavaConfig` of a released checkpoint, by short name (`SHAPES`).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in SHAPES:
        raise ValueError(f"Unknown shape {name!r}: use one of {', '.join(SHAPES)}.")
    _, text = SHAPES[name]
    return LlavaConfig(
        vision_config=_clip_vit_large_336(),
        text_config=_vicuna(*text),
        image_token_index=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


# name: Hub id of the any-resolution checkpoint whose shapes `shaped_llava_next_config` copies.
NEXT_SHAPES = {
    "llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-onevision-qwen2-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
}


def _onevision_qwen2_7b() -> LlavaOnevisionConfig:
    """SigLIP-so400m/14 at 384 px, Qwen2-7B (28 layers, 3584 wide, 4 kv heads) and every 384 px crop grid up to
    2304 x 2304 (36 pinpoints), `anyres_max_9`."""
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=152128,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        sliding_window=None,
        rms_norm_eps=1e-6,
    )
    sides = range(384, 2305, 384)
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=151646,
        video_token_index=151647,
        image_grid_pinpoints=[[height, width] for height in sides for width in sides],
        vision_aspect_ratio="anyres_max_9",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )


def shaped_llava_next_config(name: str) -> LlavaNextConfig | LlavaOnevisionConfig:
    """The config of a released any-resolution checkpoint, by short name (`NEXT_SHAPES`). `llava-v1.6-mistral-7b`:
    CLIP-L/14 at 336 px, Mistral-7B (32 layers, 4096 wide, 8 kv heads, full attention) and the five 336 px crop
    grids up to 672 x 672; `llava-onevision-qwen2-7b`: `_onevision_qwen2_7b`.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in NEXT_SHAPES:
        raise ValueError(f"Unknown any-resolution shape {name!r}: use one of {', '.join(NEXT_SHAPES)}.")
    if name == "llava-onevision-qwen2-7b":
        return _onevision_qwen2_7b()
    text = MistralConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        sliding_window=None,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    )
    return LlavaNextConfig(
        vision_config=_clip_vit_large_336(),
        text_config=text,
        image_token_index=32000,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
