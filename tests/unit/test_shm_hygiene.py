"""The end-of-session clean-up removes only what killed servers left: new, of a known kind,
and used by no live process (real files, real /proc)."""
import mmap
import os

from tests.shm_hygiene import names_in_use, remove_orphans


def test_only_new_unused_segments_of_the_known_kinds_are_removed(tmp_path):
    def make(name: str, size: int = 4096):
        path = tmp_path / name
        path.write_bytes(b"\0" * size)
        return path

    make("psm_from_before")  # there when the session started: not ours
    before = {"psm_from_before"}
    make("psm_orphan")
    make("triton_python_backend_shm_region_orphan")
    make("sem.mp-orphan")
    make("someone_elses")  # not a kind the servers make
    mapped = make("psm_mapped")
    held = make("sem.mp-held")
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 0) as view:
        fd = os.open(held, os.O_RDONLY)
        try:
            assert {"psm_mapped", "sem.mp-held"} <= names_in_use(tmp_path)
            removed = remove_orphans(before, tmp_path)
        finally:
            os.close(fd)
        view[0] = 1  # still mapped and writable: the clean-up left it alone
    assert removed == ["psm_orphan", "sem.mp-orphan", "triton_python_backend_shm_region_orphan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psm_from_before", "psm_mapped", "sem.mp-held",
                                                          "someone_elses"]


def test_nothing_new_means_nothing_read_or_removed(tmp_path):
    (tmp_path / "psm_old").write_bytes(b"x")
    assert remove_orphans({"psm_old"}, tmp_path) == []
    assert remove_orphans(set(), tmp_path / "missing") == []  # no such folder: nothing to do
