"""study/atomic.py: atomic_path publishes a file only when its writer finishes, and leaves nothing on failure."""

import pytest

from study.atomic import atomic_path


def test_success_renames_onto_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".csv" and tmp != target
        tmp.write_text("a,b\n1,2\n")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_failure_keeps_the_old_result_and_removes_the_temp(tmp_path):
    target = tmp_path / "fit.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash midway")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["fit.csv"]
