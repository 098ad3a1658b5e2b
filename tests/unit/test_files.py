"""ManifestDir: a directory's files and their SHA-256 manifest, published whole or not at all.

The hashes are computed here with hashlib, independently of the code under test. Failures are
injected at the os level (``os.fsync``, ``os.replace``), not by patching the helper's internals.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from lmdistill.core.files import MANIFEST, ManifestDir, file_record


class SimulatedCrash(BaseException):
    """Stands for the process dying: not an Exception, so nothing may swallow it."""


def fd_name(fd: int) -> str:
    """The name of the file an open descriptor refers to (Linux: through /proc)."""
    return Path(os.readlink(f"/proc/self/fd/{fd}")).name


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to name descriptors")


def expected_records(directory: Path, names: list[str]) -> dict[str, dict]:
    return {
        name: {
            "size": (directory / name).stat().st_size,
            "sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest(),
        }
        for name in names
    }


def publish_three(final: Path, **fields) -> dict:
    """Publish a directory of three files, written the three ways the helper offers."""
    with ManifestDir(final) as out:
        out.write("a.bin", b"\x00\x01" * 1000)
        out.write("b.txt", lambda f: f.write(b"written through the open file\n"))
        out.save("c.bin", lambda path: Path(path).write_bytes(b"written by name"))
        return out.publish({"format_version": 1, **fields})


def test_a_published_directory_holds_every_file_and_a_manifest_whose_hashes_match(tmp_path: Path) -> None:
    final = tmp_path / "published"
    returned = publish_three(final, step=7)
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest == returned
    assert sorted(os.listdir(final)) == sorted(["a.bin", "b.txt", "c.bin", MANIFEST])
    assert manifest["files"] == expected_records(final, ["a.bin", "b.txt", "c.bin"])
    assert manifest["format_version"] == 1 and manifest["step"] == 7
    assert (final / "c.bin").read_bytes() == b"written by name"
    assert sorted(os.listdir(tmp_path)) == ["published"]  # no staging directory left


def test_the_manifest_format_is_the_callers(tmp_path: Path) -> None:
    final = tmp_path / "store"
    names = ["z.bin", "a.bin"]
    with ManifestDir(
        final,
        staging=tmp_path / "store.tmp-1",
        names=names,
        record=lambda path: {"dtype": "uint8", **file_record(path, size_key="bytes")},
        records_key="chunks",
        sort_keys=False,
    ) as out:
        for name in names:
            out.write(name, name.encode())
        records = out.records()
        manifest = out.publish({"b": 1, "chunks": records, "a": 2})
    text = (final / MANIFEST).read_text()
    assert text == json.dumps(manifest, indent=2) + "\n"
    assert list(json.loads(text)) == ["b", "chunks", "a"] and list(json.loads(text)["chunks"]) == names
    assert json.loads(text)["chunks"]["a.bin"] == {
        "dtype": "uint8",
        "bytes": 5,
        "sha256": hashlib.sha256(b"a.bin").hexdigest(),
    }


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), SimulatedCrash()])
def test_a_failure_mid_write_publishes_nothing_and_leaves_no_staging_directory(
    tmp_path: Path, failure: BaseException
) -> None:
    final = tmp_path / "published"

    def fail(f):
        f.write(b"half")
        raise failure

    with pytest.raises(type(failure)), ManifestDir(final) as out:
        out.write("a.bin", b"first")
        out.write("b.bin", fail)
        out.publish({})
    assert os.listdir(tmp_path) == []


@needs_proc
def test_a_failure_writing_the_manifest_publishes_nothing(tmp_path: Path, monkeypatch) -> None:
    real_fsync = os.fsync

    def full_disk_at_the_manifest(fd: int) -> None:
        if fd_name(fd) == MANIFEST:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_at_the_manifest)
    with pytest.raises(OSError, match="No space left"):
        publish_three(tmp_path / "published")
    assert os.listdir(tmp_path) == []


@needs_proc
def test_every_file_is_fsynced_then_the_manifest_then_the_directory_then_it_is_renamed(
    tmp_path: Path, monkeypatch
) -> None:
    final = tmp_path / "published"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", fd_name(fd)))

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("rename", f"{Path(src).name}->{Path(dst).name}"))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with ManifestDir(final) as out:
        out.write("a.bin", b"a")
        (out.path / "by-the-caller.bin").write_bytes(b"not synced by whoever wrote it")
        staging = out.path.name
        out.publish({})

    manifest_at = events.index(("fsync", MANIFEST))
    synced_files = {name for kind, name in events[:manifest_at] if kind == "fsync"}
    assert synced_files == {"a.bin", "by-the-caller.bin"}
    assert events[manifest_at + 1 :] == [
        ("fsync", staging),
        ("rename", f"{staging}->published"),
        ("fsync", tmp_path.name),
    ]


def test_publishing_over_an_existing_directory_replaces_it_whole(tmp_path: Path) -> None:
    final = tmp_path / "published"
    publish_three(final)
    (final / "stale.bin").write_bytes(b"only in the old directory")
    with ManifestDir(final) as out:
        out.write("new.bin", b"new")
        out.publish({"format_version": 2})
    assert sorted(os.listdir(final)) == sorted(["new.bin", MANIFEST])
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest == {"format_version": 2, "files": expected_records(final, ["new.bin"])}
    assert os.listdir(tmp_path) == ["published"]  # neither staging nor the old copy left


def test_a_failed_rename_keeps_the_old_directory(tmp_path: Path, monkeypatch) -> None:
    final = tmp_path / "published"
    publish_three(final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    real_replace = os.replace

    def refuse_the_new_one(src, dst):
        if Path(src).name.startswith(".published.tmp-"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_one)
    with pytest.raises(OSError, match="Input/output error"), ManifestDir(final) as out:
        out.write("new.bin", b"new")
        out.publish({})
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert os.listdir(tmp_path) == ["published"]


def test_an_adopted_staging_directory_keeps_what_others_wrote_and_trusts_their_records(tmp_path: Path) -> None:
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "shard-0").write_bytes(b"written by another process")
    (staging / "shard-1").write_bytes(b"and another")
    measured = expected_records(staging, ["shard-0", "shard-1"])
    known = {
        "shard-0": {**measured["shard-0"], "sha256": "0" * 64},  # taken as it is: measured elsewhere
        "shard-1": {"size": 1, "sha256": "1" * 64},  # the size differs: measured again
    }
    with ManifestDir(tmp_path / "final", staging=staging, adopt=True) as out:
        out.write("own.bin", b"own")
        manifest = out.publish({}, known=known)
    assert manifest["files"]["shard-0"] == known["shard-0"]
    assert manifest["files"]["shard-1"] == measured["shard-1"]
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_a_directory_published_in_place_keeps_its_files_when_a_write_fails(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "lock").write_text("not recorded")
    in_place = ManifestDir(cache, in_place=True, names=["a.bin", "b.bin"])
    in_place.save("a.bin", lambda path: Path(path).write_bytes(b"a"))

    def crash(path):
        Path(path).write_bytes(b"half")
        raise SimulatedCrash

    with pytest.raises(SimulatedCrash):
        in_place.save("b.bin", crash)
    assert sorted(os.listdir(cache)) == ["a.bin", "lock"]  # the finished file stays, the temporary goes
    in_place.save("b.bin", lambda path: Path(path).write_bytes(b"b"))
    manifest = in_place.publish({"format_version": 1})
    assert json.loads((cache / MANIFEST).read_text()) == manifest
    assert manifest["files"] == expected_records(cache, ["a.bin", "b.bin"])
    assert sorted(os.listdir(cache)) == sorted(["a.bin", "b.bin", "lock", MANIFEST])


def test_fields_that_hold_other_records_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="records"), ManifestDir(tmp_path / "final") as out:
        out.write("a.bin", b"a")
        out.publish({"files": {"a.bin": {"size": 0}}})
    assert os.listdir(tmp_path) == []
