"""The output folder is published as one set: lock, recovery, refusal, staging, signals, disk
full, and the file sets of ``gif train``."""

import errno
import fcntl
import os
import signal

import pytest

from gifcli import outputs
from gifcli.errors import GifError
from gifcli.outputs import (
    Interrupted,
    check_output_file,
    claim_output_dir,
    claim_output_files,
    write_text,
)

NAMES = ("model.safetensors", "report.json")


@pytest.fixture(autouse=True)
def fresh_history():
    outputs.forget_history()


def publish(directory, contents, *, force=True, **kwargs):
    """One run: claim ``directory`` and publish ``contents`` ({name: text}) as its set."""
    with (
        claim_output_dir(directory, force=force, names=NAMES, **kwargs) as claim,
        claim.stage() as staging,
    ):
        for name, text in contents.items():
            write_text(staging / name, text)


def listing(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def beside(directory):
    """What lies in the parent folder besides ``directory`` itself."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name != directory.name)


def test_a_set_is_published_whole_and_replaces_the_old_set_whole(tmp_path):
    out = tmp_path / "a" / "out"
    publish(out, {"model.safetensors": "new", "report.json": "r1"}, force=False)
    assert listing(out) == {"model.safetensors": "new", "report.json": "r1"}
    publish(out, {"model.safetensors": "newer"})
    assert listing(out) == {"model.safetensors": "newer"}, "no file of the old set survives"
    assert beside(out) == [], "no lock, staging or old folder is left beside it"
    assert "the outputs were already written" in outputs.outcome()


def test_the_two_rename_publish_gives_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    publish(out, {"model.safetensors": "old"})
    publish(out, {"model.safetensors": "new", "report.json": "r"})
    assert listing(out) == {"model.safetensors": "new", "report.json": "r"}
    assert beside(out) == []


@pytest.mark.parametrize(
    "make,force,message",
    [
        (lambda out: (out / "report.json").write_text("x"), False, "already exists; pass --force"),
        (lambda out: (out / "notes.txt").write_text("mine"), True, "not an output gif writes"),
        (lambda out: (out / "model.safetensors").mkdir(), True, "not an output gif writes"),
        (
            lambda out: (out / "report.json").symlink_to(out / "nowhere"),
            False,
            "already exists",
        ),
        (
            lambda out: (out / "report.json").symlink_to(out / "nowhere"),
            True,
            "not an output gif writes",
        ),
    ],
    ids=["exists", "foreign file", "folder named like an output", "dangling link", "link+force"],
)
def test_a_folder_the_run_may_not_replace_is_refused_first(tmp_path, make, force, message):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = sorted(os.listdir(out))
    with pytest.raises(GifError, match=message):
        publish(out, {"model.safetensors": "new"}, force=force)
    assert sorted(os.listdir(out)) == before
    assert beside(out) == []


def test_a_link_or_a_file_at_the_output_path_is_refused(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(GifError, match="is a symbolic link"):
        publish(tmp_path / "link", {"model.safetensors": "x"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(GifError, match="is not a folder"):
        publish(tmp_path / "file", {"model.safetensors": "x"})


def test_a_second_run_fails_at_once_naming_the_lock(tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / "out.lock"
    other = os.open(lock, os.O_RDWR | os.O_CREAT)  # another open file: another flock holder
    os.write(other, b"4242\n")
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        with pytest.raises(GifError, match=r"in use by another gif run \(pid 4242\).*out\.lock"):
            publish(out, {"model.safetensors": "x"})
    finally:
        os.close(other)
    assert not out.exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out.lock").write_text("999999\n")
    notes = []
    publish(out, {"model.safetensors": "x"}, note=notes.append)
    assert any("pid 999999" in n for n in notes), notes
    assert beside(out) == []


def test_claims_nest_in_one_process(tmp_path):
    out = tmp_path / "out"
    with claim_output_dir(out, force=False, names=NAMES):
        publish(out, {"model.safetensors": "x"}, force=False)
        assert (tmp_path / "out.lock").read_text().strip() == str(os.getpid())
    assert listing(out) == {"model.safetensors": "x"}
    assert not (tmp_path / "out.lock").exists()


def test_a_killed_publish_is_recovered_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.gif-old-123"  # moved aside, the new set never moved in
    old.mkdir()
    (old / "model.safetensors").write_text("old")
    staging = tmp_path / ".out.gif-staging-123"
    staging.mkdir()
    (staging / "model.safetensors").write_text("half")
    notes = []
    with claim_output_dir(out, force=True, names=NAMES, note=notes.append):
        assert listing(out) == {"model.safetensors": "old"}
        assert beside(out) == ["out.lock"]
    assert any("put back" in n for n in notes)


def test_a_moved_aside_set_beside_a_complete_folder_is_removed(tmp_path):
    out = tmp_path / "out"
    publish(out, {"model.safetensors": "new"})
    (tmp_path / ".out.gif-old-7").mkdir()
    publish(out, {"model.safetensors": "newer"})
    assert listing(out) == {"model.safetensors": "newer"}
    assert beside(out) == []


def test_a_failed_write_leaves_the_old_set_and_nothing_beside(tmp_path):
    out = tmp_path / "out"
    publish(out, {"model.safetensors": "old"})
    with (
        pytest.raises(RuntimeError),
        claim_output_dir(out, force=True, names=NAMES) as claim,
        claim.stage() as staging,
    ):
        write_text(staging / "model.safetensors", "new")
        raise RuntimeError("the report failed")
    assert listing(out) == {"model.safetensors": "old"}
    assert beside(out) == []


def test_folders_made_for_a_failed_run_are_removed(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), claim_output_dir(out, force=False, names=NAMES):
        assert (tmp_path / "a" / "b").is_dir()
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["staging folder", "temporary file", "write", "fsync", "rename"])
def test_disk_full_anywhere_names_the_folder_and_keeps_the_old_set(tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    publish(out, {"model.safetensors": "old", "report.json": "r"})
    outputs.forget_history()

    def write(path, text):
        if where == "write":
            _disk_full()
        write_text(path, text)

    with claim_output_dir(out, force=True, names=NAMES) as claim:
        patches = {
            "staging folder": (outputs.Path, "mkdir"),
            "temporary file": (outputs.tempfile, "mkstemp"),
            "fsync": (outputs.os, "fsync"),
            "rename": (outputs.os, "rename"),
        }
        if where in patches:
            monkeypatch.setattr(*patches[where], _disk_full)
        if where == "rename":
            monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
        if where == "fsync":  # fsync is best effort on folders: fail it on the files' replace
            monkeypatch.setattr(outputs.os, "replace", _disk_full)
        with pytest.raises(GifError) as info, claim.stage() as staging:
            write(staging / "model.safetensors", "new")
        monkeypatch.undo()
    message = str(info.value)
    assert message.startswith(f"no space left on device in {out}; nothing was written"), message
    assert f"the outputs already in {out} are unchanged" in message
    assert listing(out) == {"model.safetensors": "old", "report.json": "r"}
    assert beside(out) == []


def test_sigterm_during_a_claim_cleans_up_and_exits_143(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Interrupted) as info, claim_output_dir(out, force=False, names=NAMES):
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_during_the_renames_waits_for_the_publish(tmp_path, monkeypatch):
    out = tmp_path / "out"
    publish(out, {"model.safetensors": "old"})
    exchange = outputs._exchange

    def interrupted_exchange(a, b):
        os.kill(os.getpid(), signal.SIGINT)  # lands while the renames run
        return exchange(a, b)

    monkeypatch.setattr(outputs, "_exchange", interrupted_exchange)
    with pytest.raises(Interrupted):
        publish(out, {"model.safetensors": "new"})
    assert listing(out) == {"model.safetensors": "new"}
    assert beside(out) == []
    assert outputs.outcome() == f"the outputs were already written ({out})"


def test_files_and_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o077)
    try:
        publish(tmp_path / "out", {"model.safetensors": "x"})
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o600
    previous = os.umask(0o022)
    try:
        publish(tmp_path / "out", {"model.safetensors": "x"})
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------- file sets


def test_a_file_set_is_written_together_and_refused_when_it_exists(tmp_path):
    paths = [tmp_path / "m.safetensors", tmp_path / "m.report.json"]
    (tmp_path / ".m.safetensors.abc.gif-tmp").write_text("left by a killed run")
    with claim_output_files(paths, force=False) as staged:
        for path, tmp in staged.items():
            tmp.write_text(path.name)
        assert not paths[0].exists()
    assert [p.read_text() for p in paths] == ["m.safetensors", "m.report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.report.json", "m.safetensors"]
    with pytest.raises(GifError, match="already exists; pass --force"):
        claim_output_files(paths, force=False).__enter__()


def test_a_file_set_that_fails_writes_nothing(tmp_path):
    paths = [tmp_path / "m.safetensors", tmp_path / "m.report.json"]
    with (
        pytest.raises(GifError, match="no space left on device"),
        claim_output_files(paths, force=False) as staged,
    ):
        staged[paths[0]].write_text("x")
        _disk_full()
    assert list(tmp_path.iterdir()) == []


def test_an_output_file_path_that_is_a_folder_or_a_dangling_link_is_refused(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(GifError, match="is a folder"):
        check_output_file(tmp_path / "dir.safetensors", force=True)
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "nowhere")
    with pytest.raises(GifError, match="already exists"):
        check_output_file(tmp_path / "link.safetensors", force=False)
    check_output_file(tmp_path / "link.safetensors", force=True)
