import pytest

from ufo.atomic import atomic_dir, atomic_file


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "f.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "b").write_text("half")
            raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["a"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["out"]
