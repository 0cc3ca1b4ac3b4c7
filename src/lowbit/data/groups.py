"""User-given groups for the subgroup audit (``lowbit.eval.audit``): a CSV file of sample id -> group.

The file has a header row naming an ``id`` and a ``group`` column (other columns are ignored); ids are
compared as text with surrounding spaces removed (``7`` for the 8th test image, ``cat.jpg`` for a file).
Every sample of the data needs a group and every id must be a sample of the data: anything else is an
error naming the ids, so an audit never runs on a partial or mismatched grouping.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from lowbit.core.errors import LowbitError


def _examples(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:3])
    return f"{len(ids)} (e.g. {shown})"


def read_groups(path: str | os.PathLike, ids: Sequence[object]) -> list[str]:
    """The group of each sample of ``ids`` (in that order) from CSV ``path``; ``LowbitError`` naming the
    problem for a missing or empty file, a header without ``id`` and ``group``, an empty group, an id given
    twice with two groups, ids the data does not have, or samples the file leaves without a group."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"groups file {path}: cannot read it ({e.__class__.__name__})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise LowbitError(
            f"groups file {path} is empty: it needs a header row 'id,group' and one row per sample"
        )
    header = [h.strip().lower() for h in rows[0]]
    if "id" not in header or "group" not in header:
        raise LowbitError(
            f"groups file {path}: the header must name an 'id' and a 'group' column, got {rows[0]}"
        )
    col_id, col_group = header.index("id"), header.index("group")
    mapping: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(col_id, col_group) or not row[col_group].strip():
            raise LowbitError(
                f"groups file {path}, line {line}: no group for id {row[col_id] if row else ''!r}"
            )
        key, group = row[col_id].strip(), row[col_group].strip()
        if mapping.get(key, group) != group:
            raise LowbitError(f"groups file {path}, line {line}: id {key!r} is in two groups, "
                              f"{mapping[key]!r} and {group!r}")  # fmt: skip
        mapping[key] = group
    wanted = [str(i).strip() for i in ids]
    unknown = sorted(set(mapping) - set(wanted))
    if unknown:
        raise LowbitError(f"groups file {path}: ids the data does not have: {_examples(unknown)}")
    missing = [i for i in wanted if i not in mapping]
    if missing:
        raise LowbitError(f"groups file {path}: samples without a group: {_examples(missing)}")
    return [mapping[i] for i in wanted]
