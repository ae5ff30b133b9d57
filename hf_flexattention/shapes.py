"""Llava configs in the exact shapes of released checkpoints, built in code (random weights, no download).

Time, memory and FLOPs depend on shapes, not on trained weights, so a model built from one of these configs on a GPU
measures what the real checkpoint would cost. `--shape` in the benchmarks and in `python -m hf_flexattention.cost`
takes these names.
"""

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig, MistralConfig


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


# name: Hub id of the LLaVA-NeXT checkpoint whose shapes `shaped_llava_next_config` copies.
NEXT_SHAPES = {"llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf"}


def shaped_llava_next_config(name: str) -> LlavaNextConfig:
    """The `LlavaNextConfig` of a released LLaVA-NeXT checkpoint, by short name (`NEXT_SHAPES`): CLIP-L/14 at 336 px,
    Mistral-7B (32 layers, 4096 wide, 8 kv heads, full attention) and the five 336 px crop grids up to 672 x 672.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in NEXT_SHAPES:
        raise ValueError(f"Unknown LLaVA-NeXT shape {name!r}: use one of {', '.join(NEXT_SHAPES)}.")
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
