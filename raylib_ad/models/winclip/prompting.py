"""WinCLIP's compositional prompt ensemble (paper section 3.2, anomalib's prompting.py).

Every state word is combined with every template: 7 x 21 prompts describe a normal object, 4 x 21 an
anomalous one. Their text embeddings are averaged per class into one normal and one anomalous vector.
"""

from __future__ import annotations

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

# anomalib's list holds "a jpeg corrupted photo of the {}." twice; kept, since it weighs the average.
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(class_name: str) -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts) for `class_name`, state-major as in anomalib."""

    def expand(states: tuple[str, ...]) -> list[str]:
        return [template.format(state.format(class_name)) for state in states for template in TEMPLATES]

    return expand(NORMAL_STATES), expand(ANOMALOUS_STATES)
