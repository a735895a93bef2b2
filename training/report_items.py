"""Report items: split an itemised report into its findings, put them back, shuffle them.

Reports come in two forms: itemised, one finding per numbered line ("1. ...\\n2. ..."; a single
abnormal finding is still "1. ..."), or one unnumbered text for normal studies ("Normal brain MRI for
age."). The numbers carry no meaning, so the paper's CLIP augmentation presents a report's items in a
random order, renumbered: :func:`shuffle_items`.

Rules (they make ``join_items(split_items(r), numbered=is_itemised(r)) == r`` for every report the
synthetic engine writes):

- a report is itemised when its first non-blank line starts with a number, a dot and a space;
- in an itemised report each numbered line starts an item and any other line continues the item before
  it (joined to it with a newline), so a wrapped finding moves as one;
- an unnumbered report is one item: its non-blank lines joined by newlines;
- blank lines and the spaces around lines are dropped everywhere.

Item lists alone cannot tell "1. X" from "X", so :func:`join_items` is told which form to write.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

ITEM_LINE = re.compile(r"(\d+)\.\s+(\S.*)")  # "12. finding": the number, then the finding's text


def _lines(report: str) -> list[str]:
    return [line.strip() for line in report.splitlines() if line.strip()]


def is_itemised(report: str) -> bool:
    """Whether ``report`` is a numbered list, i.e. its first non-blank line is "<n>. ..."."""
    lines = _lines(report)
    return bool(lines) and ITEM_LINE.fullmatch(lines[0]) is not None


def split_items(report: str) -> list[str]:
    """The findings of a report without their numbers, in order.

    Returns:
        one string per numbered line of an itemised report (with its continuation lines), the whole
        text as one item for an unnumbered report, ``[]`` for a blank one.
    """
    lines = _lines(report)
    if not lines or ITEM_LINE.fullmatch(lines[0]) is None:
        return ["\n".join(lines)] if lines else []
    items: list[str] = []
    for line in lines:
        match = ITEM_LINE.fullmatch(line)
        if match:
            items.append(match.group(2))
        else:
            items[-1] += "\n" + line
    return items


def join_items(items: Sequence[str], numbered: bool = True) -> str:
    """A report from its findings: "1. ..." lines numbered from 1, or the single unnumbered text.

    Args:
        items: the findings, as :func:`split_items` returns them.
        numbered: write a numbered list; False writes a single item as it is (an unnumbered report
            has exactly one item).

    Raises:
        ValueError: an item is blank, or ``numbered`` is False with more than one item.
    """
    if any(not item.strip() for item in items):
        raise ValueError(f"report items must not be blank, got {list(items)!r}")
    if numbered:
        return "\n".join(f"{number}. {item}" for number, item in enumerate(items, start=1))
    if len(items) > 1:
        raise ValueError(f"an unnumbered report is a single item, got {len(items)}")
    return items[0] if items else ""


def shuffle_items(report: str, rng: np.random.Generator) -> str:
    """The report's items in a random order, renumbered from 1 (the CLIP augmentation of the paper).

    An unnumbered report is one item and comes back unchanged; an itemised report comes back in the
    normal form :func:`join_items` writes even when the order drawn is the original one.

    Args:
        report: report text.
        rng: the draw's source; the same generator state gives the same order.
    """
    if not is_itemised(report):
        return report
    items = split_items(report)
    return join_items([items[i] for i in rng.permutation(len(items))])
