"""Answer scoring for VQA-style tasks: each metric maps (prediction, references) to a score in [0, 1].

- relaxed_accuracy (ChartQA): numbers match within 5% relative error, anything else exactly after normalisation.
- exact_match: equal after normalisation.
- anls (DocVQA): 1 - normalised Levenshtein distance to the closest reference, 0 below the 0.5 threshold.
- vqa_accuracy (VQAv2): min(#references equal to the prediction / 3, 1).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower-case, trim, drop a trailing full stop, articles and surrounding punctuation; squeeze spaces."""
    text = text.strip().lower()
    text = re.sub(r"[\"'`]", "", text)
    text = re.sub(r"\s+", " ", text).strip(" .,;:!?")
    words = [w for w in text.split(" ") if w not in _ARTICLES]
    return " ".join(words)


def to_number(text: str) -> float | None:
    """A number written as '1,234.5', '12%', '$3', '-0.5' or '1e3'; None if the text is not one number."""
    t = text.strip().lower().replace(",", "").replace("$", "").replace("€", "").replace("£", "")
    percent = t.endswith("%")
    t = t.rstrip("%").strip().rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    return value / 100 if percent else value


def _numbers_close(prediction: float, target: float, tolerance: float = 0.05) -> bool:
    if target == 0:
        return prediction == 0
    return abs(prediction - target) / abs(target) <= tolerance


def relaxed_accuracy(prediction: str, references: Sequence[str]) -> float:
    """ChartQA's relaxed accuracy: numeric answers within 5%, strings exactly (after normalisation)."""
    for ref in references:
        p, r = to_number(prediction), to_number(ref)
        if p is not None and r is not None:
            # "12%" vs "12": ChartQA labels drop the percent sign as often as not; accept either reading.
            candidates = {p, p * 100} if prediction.strip().endswith("%") else {p}
            if any(_numbers_close(c, r) for c in candidates):
                return 1.0
        elif normalize(prediction) == normalize(ref) and normalize(ref):
            return 1.0
    return 0.0


def exact_match(prediction: str, references: Sequence[str]) -> float:
    p = normalize(prediction)
    return float(bool(p) and any(p == normalize(r) for r in references))


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA): the best over references."""
    p = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ref in references:
        r = " ".join(ref.strip().lower().split())
        if not p and not r:
            return 1.0
        distance = _levenshtein(p, r) / max(len(p), len(r))
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 accuracy: an answer given by 3 or more of the (usually 10) annotators counts fully."""
    p = normalize(prediction)
    if not p:
        return 0.0
    return min(sum(p == normalize(r) for r in references) / 3.0, 1.0)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
    "anls": anls,
    "vqa_accuracy": vqa_accuracy,
}

#: The metric each data format is scored with by default.
DEFAULT_METRIC = {"chartqa": "relaxed_accuracy", "vqa": "vqa_accuracy", "docvqa": "anls",
                  "preference": "relaxed_accuracy"}  # against the chosen reply
