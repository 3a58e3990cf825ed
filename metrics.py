"""
OCR metrics: character-level normalised edit distance, Fox-style word precision / recall / F1, exact match.

Fox's scorer (ucaslcl/Fox eval_tools/eval_ocr_test.py) calls cal_per_metrics(pred=ann["label"], gt=ann["answer"]):
the ground truth goes in as `pred` and the model output as `gt`. Its nltk calls then make
  precision = |distinct words of output & ground truth| / |distinct words of the ground truth|
  recall    = |distinct words of output & ground truth| / |distinct words of the output|
fox_scores() reproduces that exactly (English: whitespace words; Fox uses jieba for Chinese, which is not here).
"""
import numpy as np


def edit_distance(a, b):
    """Levenshtein distance (insert, delete, substitute: cost 1), a row of the DP table at a time in numpy."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    b_codes = np.array([ord(c) for c in b])
    offsets = np.arange(len(b) + 1)
    row = offsets.copy()
    for i, ch in enumerate(a, start=1):
        cost = (b_codes != ord(ch)).astype(np.int64)
        new = np.empty_like(row)
        new[0] = i
        new[1:] = np.minimum(row[1:] + 1, row[:-1] + cost)  # deletion, substitution
        row = np.minimum.accumulate(new - offsets) + offsets  # insertion: new[j] = min(new[j], new[j-1] + 1)
    return int(row[-1])


def normalized_edit_distance(prediction, truth):
    """edit distance / length of the longer string (Fox and OmniDocBench's normalisation); 0 for two empty strings."""
    longest = max(len(prediction), len(truth))
    return edit_distance(prediction, truth) / longest if longest else 0.0


def exact_match(prediction, truth):
    return prediction.strip() == truth.strip()


def fox_scores(prediction, truth):
    """Fox's page-OCR scores for one page, with its argument convention (see the module docstring)."""
    reference = set(prediction.split())   # Fox's `gt` argument: the model output
    hypothesis = set(truth.split())       # Fox's `pred` argument: the ground truth
    common = len(reference & hypothesis)
    precision = common / len(hypothesis) if hypothesis else 0.0
    recall = common / len(reference) if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return dict(precision=precision, recall=recall, f1=f1, edit_dist=normalized_edit_distance(truth, prediction))
