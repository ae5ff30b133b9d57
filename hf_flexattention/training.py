"""Fine-tuning helpers: the high-res blend ramp's callback for `Trainer` and the LoRA target regex.

FlexAttention layers blend the plain and the hierarchical attention output of every high-res row while training,
`out = (1 - alpha) * plain + alpha * hierarchical` with `alpha = min(1, epoch * config.flex_high_res_ramp)` (the
official code's `warmup`; with the released 10, alpha reaches 1 after the first 10% of the epoch; not to be confused
with the learning-rate warmup of `TrainingArguments.warmup_steps`). The model reads the
fractional epoch from its `flex_training_progress` attribute; [`HighResRampCallback`] sets it from
`TrainerState.epoch` before every optimizer step. Without the callback (or outside `model.train()`), alpha is 1.

Example:

```python
>>> from peft import LoraConfig, get_peft_model
>>> model = patch_model(LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf"), n_fa=23)
>>> lora = LoraConfig(r=16, target_modules=lora_target_modules(), modules_to_save=["hr_k_proj", "hr_v_proj"])
>>> model = get_peft_model(model, lora)  # patch first, then LoRA
>>> trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
...                   callbacks=[HighResRampCallback()])
```
"""

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .modeling_flex_llava import FlexLlavaForConditionalGeneration
from .patching import is_patched


logger = logging.get_logger(__name__)

PROGRESS_ATTRIBUTE = "flex_training_progress"
HIGH_RES_PROJECTION_NAMES = ("hr_k_proj", "hr_v_proj")
_LANGUAGE_MODEL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_target_modules(include_high_res: bool = False) -> str:
    """A PEFT `target_modules` regex for the attention projections of the language model only.

    PEFT `re.fullmatch`es a string against full module names (`model.language_model.layers.3.self_attn.q_proj`),
    so the regex never reaches the vision tower's own `q_proj`/`k_proj`/`v_proj` (a list of names would: PEFT
    matches list entries as suffixes). With `include_high_res=True` it also wraps the FlexAttention layers'
    `hr_k_proj`/`hr_v_proj` with LoRA; otherwise train them in full with `modules_to_save=["hr_k_proj",
    "hr_v_proj"]` (the official recipe trains them in full), or leave them frozen.
    """
    names = _LANGUAGE_MODEL_PROJECTIONS + (HIGH_RES_PROJECTION_NAMES if include_high_res else ())
    return rf".*language_model.*\.({'|'.join(names)})"


def find_flex_model(model: torch.nn.Module) -> FlexLlavaForConditionalGeneration:
    """The patched model inside `model`: itself, or the one wrapped by PEFT, DDP, FSDP, DeepSpeed or accelerate.

    Every such wrapper holds the model as a submodule, so walking `model.modules()` finds it whatever the nesting.
    """
    for module in model.modules():
        if is_patched(module):
            return module
    raise ValueError(
        f"No FlexAttention model inside {type(model).__name__}: call `patch_model(model, n_fa=...)` on the Llava "
        "model before wrapping it (get_peft_model, Trainer)."
    )


def set_training_progress(model: torch.nn.Module, progress: float | None) -> None:
    """Set the fractional epoch the high-res blend alpha is computed from (None: no ramp, alpha 1)."""
    setattr(find_flex_model(model), PROGRESS_ATTRIBUTE, None if progress is None else float(progress))


class HighResRampCallback(TrainerCallback):
    """Drives the high-res blend ramp from the `Trainer`'s fractional epoch, and logs its alpha (`high_res_alpha`).

    Before every optimizer step (all gradient-accumulation micro-batches of a step share one alpha) it sets
    `flex_training_progress = state.epoch` on the patched model, unwrapping PEFT/DDP/accelerate wrappers; the model
    then blends its high-res rows with `alpha = min(1, epoch * config.flex_high_res_ramp)`: 0 at the first step,
    linear, 1 from epoch `1 / flex_high_res_ramp` on. `state.epoch` is saved in Trainer checkpoints, so a run
    resumed with `resume_from_checkpoint` continues the same ramp. At the end of training the attribute is cleared
    (alpha 1).

    Example:

    ```python
    >>> trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
    ...                   callbacks=[HighResRampCallback()])
    ```
    """

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        if model is None:
            return
        ramp = find_flex_model(model).config.flex_high_res_ramp
        epochs = state.num_train_epochs or args.num_train_epochs
        final = min(1.0, ramp * epochs)
        if final < 1.0:
            logger.warning(
                f"flex_high_res_ramp={ramp:g} over {epochs:g} epoch(s): alpha only reaches {final:.3g} by the end of "
                "training, so the high-res path barely contributes. The release uses 10 (alpha 1 after a tenth of an "
                "epoch); drop the callback for alpha = 1 throughout."
            )
        set_training_progress(model, state.epoch or 0.0)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        if model is not None:
            # `state.epoch` is the epoch reached after the last optimizer step: 0 before the first one.
            set_training_progress(model, state.epoch or 0.0)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, model=None, **kwargs
    ):
        if logs is None or model is None or "loss" not in logs:
            return
        flex_model = find_flex_model(model)
        alpha = flex_model._flex_alpha() if flex_model.training else 1.0
        # The Trainer has already put `logs` in its history: the alpha of the step goes there too (and so into
        # trainer_state.json), and to the callbacks after this one.
        logs["high_res_alpha"] = alpha
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1]["high_res_alpha"] = alpha

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        if model is not None:
            set_training_progress(model, None)


__all__ = [
    "HighResRampCallback",
    "find_flex_model",
    "lora_target_modules",
    "set_training_progress",
]
