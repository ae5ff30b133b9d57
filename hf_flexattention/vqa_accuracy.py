"""The standard VQA accuracy, as TextVQA is scored (LLaVA-1.5, and the FlexAttention authors, use this scorer).

Two parts, re-implemented from their specification (the VQA challenge's evaluation, Antol et al. 2015, in the form
the TextVQA / EvalAI evaluator applies it: every answer, predicted or human, is normalised the same way):

1. `normalize_answer`: lower-case; drop commas and question marks and split "'s" off its word; treat the other
   punctuation marks (a mark touching a space, or any mark in a text holding a digit-comma-digit number, is deleted;
   otherwise it becomes a space); delete periods not followed by a digit; map number words ("none", "zero" to
   "ten") to digits; drop the articles "a", "an", "the"; restore the apostrophe of common contractions written
   without it ("dont" -> "don't").
2. `vqa_accuracy`: with the `n` human answers (10 in VQA and TextVQA), a prediction scores
   `min(#humans who gave it / 3, 1)` within each of the `n` subsets of `n - 1` answers (the "10 choose 9" subsets),
   averaged. So out of 10 humans, 4 or more matching give 1.0, 3 give 0.9, 2 give 0.6, 1 gives 0.3.
"""

import itertools
import re


# The marks the VQA normaliser treats; "'" and "." are not among them (apostrophes stay, periods are ruled apart).
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period is deleted unless a digit follows it ("3.5" keeps it, "end." loses it).
_PERIOD = re.compile(r"\.(?!\d)")

# The contractions the VQA normaliser knows, written correctly. Any spelling with some of the apostrophes left out
# maps to the correct one (so "couldntve", "couldnt've" and "couldn'tve" all become "couldn't've"). The specification
# also lists "I'm", "I've" and "I'd've", with a capital I: after lower-casing they never match, so they are left out.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't shouldn't've "
    "somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've"
).split()


def _spellings_without_apostrophes(word: str) -> list[str]:
    """`word` with every non-empty subset of its apostrophes removed."""
    pieces = word.split("'")
    spellings = []
    for keep in itertools.product((True, False), repeat=len(pieces) - 1):
        if all(keep):
            continue
        spelling = pieces[0]
        for kept, piece in zip(keep, pieces[1:], strict=True):
            spelling += ("'" if kept else "") + piece
        spellings.append(spelling)
    return spellings


CONTRACTIONS = {spelling: word for word in _CONTRACTIONS for spelling in _spellings_without_apostrophes(word)}


def _process_punctuation(text: str) -> str:
    has_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The decision looks at the text as given, the replacement at the text being built (as the specification).
        if f"{mark} " in text or f" {mark}" in text or has_digit_comma_digit:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _process_digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The VQA / TextVQA normal form of an answer string (see the module docstring for the rules).

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("The Coca-Cola")
    'coca cola'
    """
    if not isinstance(answer, str):
        raise TypeError(f"An answer must be a string, got {type(answer).__name__}.")
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of `prediction` against the human `answers`, in [0, 1].

    `min(#matches / 3, 1)` in each of the `n` leave-one-out subsets of the `n` answers, averaged (both sides
    normalised with `normalize_answer`). With 10 answers that is the standard "10 choose 9" average. With fewer the
    same formula applies to `n - 1` of `n`; a single answer leaves empty subsets, so every prediction scores 0.

    Raises:
        ValueError: if `answers` is empty (nothing to score against).
        TypeError: if the prediction or an answer is not a string.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer; this question has none.")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    total = sum(matches)
    # Leaving out a matching answer removes one match from the subset; leaving out another keeps them all.
    return sum(min((total - left_out) / 3, 1.0) for left_out in matches) / len(matches)
