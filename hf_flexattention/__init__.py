"""FlexAttention (ECCV'24) for Hugging Face Llava, LLaVA-NeXT and LLaVA-OneVision models.

>>> from hf_flexattention import patch_model
>>> model = patch_model(model, n_fa=23, threshold=48 / 255)
"""

from ._version_check import check_transformers_version


check_transformers_version()

from .configuration_flex_llava import FlexLlavaConfig  # noqa: E402
from .configuration_flex_llava_next import FlexLlavaNextConfig  # noqa: E402
from .configuration_flex_llava_onevision import FlexLlavaOnevisionConfig  # noqa: E402
from .modeling_flex_llava import FlexLlavaForConditionalGeneration  # noqa: E402
from .modeling_flex_llava_next import FlexLlavaNextForConditionalGeneration  # noqa: E402
from .modeling_flex_llava_onevision import FlexLlavaOnevisionForConditionalGeneration  # noqa: E402
from .patching import is_patched, patch_model, unpatch_model  # noqa: E402
from .processing_flex_llava import FlexLlavaProcessor  # noqa: E402
from .processing_flex_llava_next import FlexLlavaNextProcessor  # noqa: E402
from .processing_flex_llava_onevision import FlexLlavaOnevisionProcessor  # noqa: E402


__version__ = "0.1.0"

__all__ = [
    "FlexLlavaConfig",
    "FlexLlavaForConditionalGeneration",
    "FlexLlavaNextConfig",
    "FlexLlavaNextForConditionalGeneration",
    "FlexLlavaNextProcessor",
    "FlexLlavaOnevisionConfig",
    "FlexLlavaOnevisionForConditionalGeneration",
    "FlexLlavaOnevisionProcessor",
    "FlexLlavaProcessor",
    "__version__",
    "is_patched",
    "patch_model",
    "unpatch_model",
]
