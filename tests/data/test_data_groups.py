"""Groups CSV for the audit: every sample gets its group; every mismatch is named."""

import pytest

from lowbit.core.errors import LowbitError
from lowbit.data.groups import read_groups
from lowbit.eval.audit import audit


def _write(tmp_path, text):
    path = tmp_path / "groups.csv"
    path.write_text(text)
    return path


def test_groups_in_data_order_other_columns_ignored(tmp_path):
    path = _write(tmp_path, "note,ID,group\nx, 2 ,b\ny,0,a\n\nz,1,a\n")
    assert read_groups(path, [0, 1, 2]) == ["a", "a", "b"]
    assert read_groups(path, ["2", "0", "1"]) == ["b", "a", "a"]


def test_groups_feed_the_audit(tmp_path):
    path = _write(tmp_path, "id,group\n" + "".join(f"{i},{'odd' if i % 2 else 'even'}\n" for i in range(40)))
    groups = read_groups(path, range(40))
    ref = [1.0] * 40
    q = [0.0 if i % 2 else 1.0 for i in range(40)]  # every odd sample lost
    assert audit(ref, q, groups).flagged == ["odd"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "is empty"),
        ("sample,label\n0,a\n", "must name an 'id' and a 'group' column"),
        ("id,group\n0,a\n1,\n", "line 3: no group for id '1'"),
        ("id,group\n0,a\n0,b\n1,a\n", "line 3: id '0' is in two groups, 'a' and 'b'"),
        ("id,group\n0,a\n1,a\n7,b\n9,b\n", r"ids the data does not have: 2 \(e.g. '7', '9'\)"),
        ("id,group\n0,a\n", r"samples without a group: 1 \(e.g. '1'\)"),
    ],
    ids=["empty", "header", "no-group", "two-groups", "unknown-ids", "missing"],
)
def test_bad_groups_file(tmp_path, text, match):
    with pytest.raises(LowbitError, match=match):
        read_groups(_write(tmp_path, text), [0, 1])


def test_missing_file(tmp_path):
    with pytest.raises(LowbitError, match="cannot read it"):
        read_groups(tmp_path / "nope.csv", [0])
