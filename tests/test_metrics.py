"""Metric functions on hand-made cases, edge cases of each included."""

import pytest

from finetune.evaluation.metrics import anls, exact_match, normalize, relaxed_accuracy, to_number, vqa_accuracy


@pytest.mark.parametrize("text,value", [
    ("1,234.5", 1234.5), ("12%", 0.12), ("$3", 3.0), ("-0.5", -0.5), ("1e3", 1000.0), ("7.", 7.0),
    ("red", None), ("", None), ("1 2", None),
])
def test_to_number(text, value):
    assert to_number(text) == value


@pytest.mark.parametrize("prediction,references,score", [
    ("1.0", ["1"], 1.0),                # "1.0" vs "1"
    ("1", ["1.0"], 1.0),
    ("104", ["100"], 1.0),              # within 5%
    ("106", ["100"], 0.0),              # outside 5%
    ("1,050", ["1000"], 1.0),           # thousands separator
    ("12%", ["12"], 1.0),               # percent sign on the prediction
    ("12", ["12%"], 0.0),               # the label says 0.12
    ("0.12", ["12%"], 1.0),
    ("0", ["0"], 1.0), ("0.01", ["0"], 0.0),   # no relative tolerance around zero
    ("Red", ["red"], 1.0), ("red.", ["Red"], 1.0),
    ("dark red", ["red"], 0.0),
    ("", ["red"], 0.0), ("", [""], 0.0),       # empty predictions never score
    ("Yes", ["No", "yes"], 1.0),               # any reference
])
def test_relaxed_accuracy(prediction, references, score):
    assert relaxed_accuracy(prediction, references) == score


@pytest.mark.parametrize("prediction,references,score", [
    ("The Cat", ["cat"], 1.0), ("cat!", ["a cat"], 1.0), ("cats", ["cat"], 0.0), ("", ["cat"], 0.0),
    ("1", ["1.0"], 0.0),  # exact match does not read numbers
])
def test_exact_match(prediction, references, score):
    assert exact_match(prediction, references) == score


def test_anls():
    assert anls("hello", ["hello"]) == 1.0
    assert anls("Hello ", ["hello"]) == 1.0                    # case and outer space ignored
    assert anls("helo", ["hello"]) == pytest.approx(0.8)        # one edit in five characters
    assert anls("abc", ["xyz"]) == 0.0                          # below the 0.5 threshold
    assert anls("hallo", ["nope", "hello"]) == pytest.approx(0.8)  # best reference
    assert anls("", ["hello"]) == 0.0


def test_vqa_accuracy():
    refs = ["2", "2", "2", "two", "3", "2", "2", "2", "2", "2"]
    assert vqa_accuracy("2", refs) == 1.0
    assert vqa_accuracy("3", refs) == pytest.approx(1 / 3)
    assert vqa_accuracy("two", refs) == pytest.approx(1 / 3)
    assert vqa_accuracy("4", refs) == 0.0
    assert vqa_accuracy("", refs) == 0.0
    assert vqa_accuracy("Yes.", ["yes", "yes"]) == pytest.approx(2 / 3)


def test_normalize():
    assert normalize("  The  Red bar. ") == "red bar"
    assert normalize("\"blue\"") == "blue"
