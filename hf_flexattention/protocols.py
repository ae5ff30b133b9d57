"""How a Llava model answers the benchmarks' questions: prompts, option likelihoods, generation, letter parsing.

Two protocols, batched and padded:

- **Likelihood** (V* Bench as its authors and the FlexAttention authors score it): each option is appended to the
  prompt as the answer and scored by its log-likelihood under teacher forcing. All options of a batch of questions
  go through **one** forward, right-padded, with `labels` on the answer tokens, so in a FlexAttention model exactly
  the answer-predicting rows attend to high-res tokens (each with its own selection), as in training.
- **Generation** (TextVQA, MagnifierBench, and V* Bench's letter variant): greedy `generate` on a left-padded batch.

The selection statistics come from the model's own `flex_trace` (a forward pre-hook hands a fresh list to every
forward call, `generate`'s decode steps included), so nothing is added to the attention's path.
"""

import contextlib
import random
import re

import torch
from PIL import Image
from transformers.utils import logging

from .modeling_flex import IGNORE_INDEX
from .patching import is_patched
from .processing_flex_llava import FlexLlavaProcessor


logger = logging.get_logger(__name__)

# LLaVA-1.5's "llava_v1" conversation, as the FlexAttention authors' evaluation scripts write it out.
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
PROMPT_FORMATS = ("llava_v1", "chat_template")
HIGH_RES_KEYS = ("high_res_pixel_values", "original_image_sizes")


def build_prompt(processor: FlexLlavaProcessor, text: str, prompt_format: str = "llava_v1") -> str:
    """The prompt asking `text` about one image: LLaVA-1.5's `llava_v1` format (system prompt, "USER: <image>\\n...
    ASSISTANT:"), as the authors evaluated, or the processor's chat template.

    Raises:
        ValueError: for an unknown format, or `"chat_template"` with a processor that has none.
    """
    if prompt_format == "llava_v1":
        return f"{SYSTEM_PROMPT} USER: {processor.image_token}\n{text} ASSISTANT:"
    if prompt_format == "chat_template":
        if not processor.chat_template:
            raise ValueError("--prompt-format chat_template needs a processor with a chat template; use llava_v1.")
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    raise ValueError(f"Unknown prompt format {prompt_format!r}: use one of {list(PROMPT_FORMATS)}.")


def letters(count: int) -> list[str]:
    """The option letters "A", "B", ... of `count` options."""
    return [chr(ord("A") + index) for index in range(count)]


def multiple_choice_text(question: str, options: list[str]) -> str:
    """`question`, one "A. option" line per option, and LLaVA's instruction to answer with the letter."""
    lines = [f"{letter}. {option}" for letter, option in zip(letters(len(options)), options, strict=True)]
    return "\n".join([question, *lines, LETTER_ANSWER])


def option_order(item_id: str, count: int) -> list[int]:
    """A permutation of `range(count)` fixed by `item_id` (the same in every run and Python process).

    V* Bench publishes the correct option first: shown in that order, "A" would always be right. The letter
    protocol shows the options in this order instead.
    """
    order = list(range(count))
    random.Random(f"option order of {item_id}").shuffle(order)
    return order


def parse_choice(text: str, options: list[str]) -> int | None:
    """The option index a generated answer names, or None when it names none (or several).

    In order: the answer is just a letter ("B", "(b)", "B."); "the answer is B" / "Answer: B" / "option B"; a
    leading letter with a delimiter ("B. red", "(B) red"); a single letter in parentheses anywhere; the text of
    exactly one option. A capital "A" used as an article ("A red car") is not read as a letter.
    """
    valid = letters(len(options))
    answer = text.strip()
    whole = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?", answer)
    if whole and whole.group(1).upper() in valid:
        return valid.index(whole.group(1).upper())
    for pattern in (
        r"(?i:answer|option|choice)(?:\s+is)?\s*[:]?\s*[(\[]?([A-Z])\b",
        r"^[(\[]?([A-Z])[)\].:,](?:\s|$)",
    ):
        match = re.search(pattern, answer)
        if match and match.group(1) in valid:
            return valid.index(match.group(1))
    in_parentheses = {letter for letter in re.findall(r"\(([A-Z])\)", answer) if letter in valid}
    if len(in_parentheses) == 1:
        return valid.index(in_parentheses.pop())

    def plain(value: str) -> str:
        return " ".join(re.sub(r"[^\w\s]", " ", value.lower()).split())

    said = f" {plain(answer)} "
    named = [index for index, option in enumerate(options) if plain(option) and f" {plain(option)} " in said]
    return named[0] if len(named) == 1 else None


class SelectionTrace(contextlib.AbstractContextManager):
    """Collects `flex_trace` from every forward call of a FlexAttention `model` (prefill and decode steps).

    `calls[c]` is the trace of the c-th call: `(layer_index, counts)` per FlexAttention layer, `counts` the
    `(batch, rows)` number of high-res tokens each high-res row selected (see `FlexLlavaForConditionalGeneration`).
    """

    def __init__(self, model):
        self.model = model
        self.calls: list[list] = []
        self._handle = None

    def _hand_over(self, module, args, kwargs):
        self.calls.append([])
        kwargs["flex_trace"] = self.calls[-1]
        return args, kwargs

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._hand_over, with_kwargs=True)
        return self

    def __exit__(self, *exc_info):
        self._handle.remove()
        return None


def _model_inputs(model, inputs, high_res: bool) -> dict:
    inputs = inputs.to(model.device, dtype=model.dtype)
    return {key: value for key, value in inputs.items() if high_res or key not in HIGH_RES_KEYS}


def _expanded(processor: FlexLlavaProcessor, prompt: str) -> str:
    return prompt.replace(processor.image_token, processor.image_token * processor.num_image_tokens)


_warned_boundary = False


def score_options(
    model,
    processor: FlexLlavaProcessor,
    prompts: list[str],
    options: list[list[str]],
    images: list[Image.Image],
    *,
    high_res: bool = True,
) -> tuple[list[list[tuple[float, int]]], list[float | None]]:
    """Log-likelihood of each option as the answer to its prompt, all options of all prompts in one forward.

    Each sequence is `prompt + " " + option` (right-padded; positions are then those of the unpadded sequence), with
    `labels` equal to the option's tokens and -100 elsewhere: in a FlexAttention model each row that predicts an
    option token attends to its own high-res selection. The score of an option is the **sum** of its tokens'
    log-probabilities, returned with its token count, so callers can rank by the mean, as V* Bench's script and the
    FlexAttention authors do (they take the argmin of the model's mean cross-entropy over the option's tokens), or by
    the sum. Cost: the model's own loss on the labels is computed and discarded (one extra `(sequences, length,
    vocab)` float32 buffer).

    Args:
        model: a Llava model (stock or FlexAttention).
        processor: its `FlexLlavaProcessor`.
        prompts: `n` prompts, each holding one image placeholder and ending where the answer starts.
        options: `n` lists of candidate answers.
        images: `n` RGB images.
        high_res: pass the high-res inputs (False: the stock path; also for an unpatched model).

    Returns:
        `(scores, selected)`: `scores[i][k] = (sum of log-probabilities in nats, token count)` of option `k` of
        prompt `i`; `selected[i]` the mean fraction of high-res tokens selected per FlexAttention layer and answer row
        over prompt `i`'s options (None without high-res inputs).

    Raises:
        ValueError: if an option adds no token to its prompt.
    """
    global _warned_boundary
    texts, owner = [], []
    for index, (prompt, choices) in enumerate(zip(prompts, options, strict=True)):
        texts += [f"{prompt} {choice}" for choice in choices]
        owner += [index] * len(choices)
    inputs = processor(
        images=[images[index] for index in owner], text=texts, padding=True, padding_side="right", return_tensors="pt"
    )
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"].bool()
    prompt_ids = [processor.tokenizer(_expanded(processor, prompt))["input_ids"] for prompt in prompts]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, index in enumerate(owner):
        start = len(prompt_ids[index])
        if input_ids[row, :start].tolist() != prompt_ids[index]:
            # The tokenizer merged the prompt's end with the option's start: score from the first differing token.
            same = (input_ids[row, :start] == torch.tensor(prompt_ids[index])).int().cumprod(0)
            start = int(same.sum())
            if not _warned_boundary:
                logger.warning("An option's first token merges with the prompt's last one; scoring from the merge.")
                _warned_boundary = True
        labels[row, start:] = input_ids[row, start:]
    labels[~attention_mask] = IGNORE_INDEX
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    token_counts = answer.sum(dim=1)
    if bool((token_counts == 0).any()):
        empty = [texts[row] for row in (token_counts == 0).nonzero()[:, 0].tolist()]
        raise ValueError(f"These options add no token to their prompt: {empty[:3]}")

    model_inputs = _model_inputs(model, inputs, high_res and is_patched(model))
    trace = SelectionTrace(model) if "high_res_pixel_values" in model_inputs else contextlib.nullcontext()
    with torch.inference_mode(), trace:
        logits = model(**model_inputs, labels=labels.to(model.device)).logits
    rows = logits[:, :-1][answer.to(logits.device)].float().log_softmax(dim=-1)
    token_logprobs = rows.gather(-1, targets[answer].to(rows.device)[:, None]).squeeze(-1).cpu()
    sums = torch.zeros(len(texts), dtype=torch.float64).index_add_(0, answer.nonzero()[:, 0], token_logprobs.double())

    scores = [[] for _ in prompts]
    for row, index in enumerate(owner):
        scores[index].append((float(sums[row]), int(token_counts[row])))
    selected: list[float | None] = [None] * len(prompts)
    if isinstance(trace, SelectionTrace):
        # Packed high-res rows: sequence b's first token_counts[b] rows are its answer rows, the rest padding.
        per_layer = torch.stack([counts.float() for _, counts in trace.calls[0]])  # layers, sequences, rows
        valid = torch.arange(per_layer.shape[-1]) < token_counts[:, None]
        chosen = (per_layer * valid).sum(dim=(0, 2))
        tokens = model.config.high_res_grid**2 * per_layer.shape[0]
        owner_tensor = torch.tensor(owner)
        for index in range(len(prompts)):
            mine = owner_tensor == index
            selected[index] = float(chosen[mine].sum() / (tokens * token_counts[mine].sum()))
    return scores, selected


def generate_answers(
    model,
    processor: FlexLlavaProcessor,
    prompts: list[str],
    images: list[Image.Image],
    *,
    max_new_tokens: int,
    high_res: bool = True,
) -> tuple[list[str], list[float | None]]:
    """Greedy answers to `prompts` about `images`, one left-padded `generate` call.

    Returns:
        `(answers, selected)`: the decoded new text of each prompt (special tokens dropped, stripped), and the mean
        fraction of high-res tokens each FlexAttention layer selected for the rows that produced it, up to and
        including its end-of-sequence token (None without high-res inputs).
    """
    inputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    model_inputs = _model_inputs(model, inputs, high_res and is_patched(model))
    trace = SelectionTrace(model) if "high_res_pixel_values" in model_inputs else contextlib.nullcontext()
    tokenizer = processor.tokenizer
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    with torch.inference_mode(), trace:
        output = model.generate(**model_inputs, **kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1] :].cpu()
    answers = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    selected: list[float | None] = [None] * len(prompts)
    if isinstance(trace, SelectionTrace) and trace.calls:
        eos = model.generation_config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=new_tokens.dtype)
        is_end = torch.isin(new_tokens, eos)
        # Rows that produced a token up to the first end-of-sequence; later steps only pad finished sequences.
        produced = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1) + 1, new_tokens.shape[1])
        steps = min(len(trace.calls), new_tokens.shape[1])
        per_step = torch.stack(
            [torch.stack([counts[:, 0].float() for _, counts in call]) for call in trace.calls[:steps]]
        )  # steps, layers, sequences
        valid = torch.arange(steps)[:, None] < produced[None]
        chosen = (per_step * valid[:, None]).sum(dim=(0, 1))
        layers = per_step.shape[1]
        for index in range(len(prompts)):
            rows = int(min(produced[index], steps))
            selected[index] = float(chosen[index] / (model.config.high_res_grid**2 * layers * rows))
    return answers, selected
