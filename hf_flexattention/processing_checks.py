"""Input checks shared by the FlexAttention processors: one image per sample.

FlexAttention keeps one high-res pool per sample, so every processor refuses a sample with several images (nested
lists) or a prompt with several image placeholders, before the stock checks run.

Shipped as remote code with saved checkpoints: stdlib only.
"""


def check_one_image_per_sample(images, text, image_token: str | None) -> None:
    """Refuse more than one image per sample.

    Args:
        images: the processor's `images` (an image, a flat list, or per-sample nested lists), or None.
        text: the processor's `text` (a string or a list of strings), or None.
        image_token: the placeholder string (`"<image>"`); None skips the prompt check.

    Raises:
        ValueError: a nested per-sample list holding more than one image, or a prompt with more than one
            `image_token`.
    """
    if images is not None and isinstance(images, (list, tuple)):
        for item in images:
            if isinstance(item, (list, tuple)) and len(item) > 1:
                raise ValueError(
                    f"A sample has {len(item)} images, but FlexAttention supports one image per sample: split it."
                )
    if text is not None and image_token is not None:
        per_sample = [sample.count(image_token) for sample in ([text] if isinstance(text, str) else text)]
        if any(count > 1 for count in per_sample):
            raise ValueError(
                f"Each prompt may hold at most one {image_token!r} (one image per sample), got {per_sample}."
            )
