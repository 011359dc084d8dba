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


def test_a_killed_writes_leftovers_are_removed_by_the_next_write_of_that_directory(tmp_path):
    import os

    from ufo.atomic import atomic_dir

    out = tmp_path / "subnet"
    dead = tmp_path / ".subnet.tmp-999999"  # a kill -9 during an export left it
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".subnet.tmp-{os.getppid()}"  # another process still writing
    alive.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not dead.exists() and alive.is_dir() and (out / "config.json").is_file()
