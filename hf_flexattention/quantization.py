"""High-res projections of quantized language models: which quantized bases FlexAttention serves, and how.

`patch_model` gives each FlexAttention layer `hr_k_proj` / `hr_v_proj`, initialised as copies of its `k_proj` /
`v_proj`. On a model loaded with a bitsandbytes `BitsAndBytesConfig`, `k_proj` / `v_proj` hold packed 4-bit
(nf4/fp4) or int8 weights: copying those bytes into an `nn.Linear` would give a projection of nothing. So a
quantized source is dequantised (with bitsandbytes' own `dequantize_4bit` / `int8_vectorwise_dequant`) into a plain
`nn.Linear` in the dtype of the language model's unquantised weights, the dtype its hidden states and the high-res
features flow in. The copies are therefore trainable in full (PEFT `modules_to_save`, the official recipe) or with
LoRA, like the rest of a QLoRA setup, and they compute what `k_proj` / `v_proj` compute up to the rounding of the
matmul (4-bit: the same dequantised weight; 8-bit: LLM.int8 also quantises activations, the copy does not).

Memory: the copies are full-precision, `2 * n_fa * hidden * kv_dim` values: 772M for LLaVA-1.5-7B with `n_fa=23`,
1.44 GiB in bf16/fp16 (2.9 GiB in fp32), on top of a 4-bit language model of about 3.5 GiB. Quantised copies would
take a quarter of that but could not be trained in full; `hf_flexattention.cost` prices both setups.

Other quantisation methods (GPTQ, AWQ, HQQ, torchao, fp8, compressed-tensors, ...) are refused with a `ValueError`:
their kernels and packing differ, and nothing here has been tested on them.

Shipped as remote code with saved checkpoints: torch, transformers and the standard library only; bitsandbytes is
imported only when a bitsandbytes module is met.
"""

import torch
from torch import nn


SUPPORTED_QUANTIZATION = (
    "no quantisation, or bitsandbytes (`BitsAndBytesConfig(load_in_4bit=True)` with nf4 or fp4, with or without "
    "double quantisation, or `BitsAndBytesConfig(load_in_8bit=True)`)"
)
_BITSANDBYTES_LINEARS = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")


def quantization_method(model: nn.Module) -> str | None:
    """The `quant_method` a transformers model was loaded with (`"bitsandbytes"`, `"gptq"`, ...), or None.

    Read from `model.config.quantization_config` (a `QuantizationConfigMixin`, or a dict in a saved config), else
    from the `hf_quantizer` transformers attaches to a quantized model.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None and getattr(model, "hf_quantizer", None) is not None:
        config = model.hf_quantizer.quantization_config
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method))


def check_quantization(model: nn.Module) -> None:
    """Refuse a model quantized with a method FlexAttention cannot build hr projections for.

    Raises:
        ValueError: for any `quant_method` other than `"bitsandbytes"` (the message names what works).
    """
    method = quantization_method(model)
    if method not in (None, "bitsandbytes"):
        raise ValueError(
            f"FlexAttention cannot build hr_k_proj/hr_v_proj from a {method!r}-quantized model: it supports "
            f"{SUPPORTED_QUANTIZATION}. Load the checkpoint unquantized or with a BitsAndBytesConfig, then patch it."
        )


def _is_bitsandbytes(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in _BITSANDBYTES_LINEARS


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The `(out_features, in_features)` floating-point weight a bitsandbytes linear layer multiplies by.

    4-bit (`Linear4bit`): `bitsandbytes.functional.dequantize_4bit` of the packed weight and its quant state (nf4
    or fp4 code times the block's absmax, itself dequantised under double quantisation), in the dtype the weight
    had when it was quantised. 8-bit (`Linear8bitLt`): `int8_vectorwise_dequant`, `CB * SCB / 127` row by row
    (LLM.int8, Dettmers et al. 2022, Sec. 3), in fp32; a layer kept with `llm_int8_has_fp16_weights` returns its
    weight.

    Raises:
        ValueError: for a module that is not a bitsandbytes linear layer.
    """
    import bitsandbytes as bnb

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = weight.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel at the first no-grad eval
            # forward; dequantize_4bit reads only the original layout, so undo the repacking first (bitsandbytes
            # does the same before saving a state dict).
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
            weight.data, weight.quant_state = data, state
            module.quant_state = state
        return bnb.functional.dequantize_4bit(data, state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        if weight.dtype != torch.int8:  # has_fp16_weights: the layer keeps its floating-point weight
            return weight.data
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))
    raise ValueError(f"{type(module).__name__} is not a bitsandbytes linear layer.")


def high_res_projection(source: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A new `nn.Linear` computing what the projection `source` (a `k_proj` or `v_proj`) computes.

    Args:
        source: an `nn.Linear` (copied exactly, in its own dtype) or a bitsandbytes 4-bit/8-bit linear layer
            (dequantised, see `dequantized_weight`, and cast to `dtype`).
        dtype: the dtype of a copy of a quantized `source`: the language model's, the dtype of its hidden states.
            Ignored for an `nn.Linear` source.

    Returns:
        An `nn.Linear(source.in_features, source.out_features)` on `source`'s device, with `source`'s bias, whose
        weight requires a gradient when `source`'s does (a frozen or quantized base gives a frozen copy). A source
        on the meta device gives an uninitialised projection on the meta device.

    Raises:
        ValueError: for any other kind of module (GPTQ/AWQ/HQQ/torchao layers, ...), naming what is supported.
    """
    quantized = _is_bitsandbytes(source)
    if not quantized and type(source) is not nn.Linear:
        raise ValueError(
            f"Cannot build a FlexAttention hr projection from a {type(source).__module__}.{type(source).__name__} "
            f"k_proj/v_proj: FlexAttention supports {SUPPORTED_QUANTIZATION} (plain `nn.Linear` projections). Load "
            "the checkpoint unquantized or with a BitsAndBytesConfig, and patch it before wrapping it (PEFT, FSDP, "
            "DeepSpeed)."
        )
    device = source.weight.device
    dtype = (dtype or torch.get_default_dtype()) if quantized else source.weight.dtype
    bias = source.bias is not None
    projection = nn.Linear(source.in_features, source.out_features, bias=bias, device=device, dtype=dtype)
    if device.type != "meta":
        with torch.no_grad():
            weight = dequantized_weight(source) if quantized else source.weight
            projection.weight.copy_(weight.reshape(projection.weight.shape))
            if bias:
                projection.bias.copy_(source.bias)
    projection.weight.requires_grad_(not quantized and source.weight.requires_grad)
    if bias:
        projection.bias.requires_grad_(source.bias.requires_grad)
    return projection


__all__ = [
    "SUPPORTED_QUANTIZATION",
    "check_quantization",
    "dequantized_weight",
    "high_res_projection",
    "quantization_method",
]
