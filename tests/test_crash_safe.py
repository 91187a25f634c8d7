"""Crash-safe extraction: real SIGKILLs, resume, corrupt images, unwritable or full disks.

The kill tests run ``python -m fusion extract tiny --weights random ...`` as a real
subprocess, poll the output folder and send SIGKILL once ``k`` shard entries exist
(shard size 1, so every image is its own shard and the kill points are precise to
one image). After each kill the folder must hold only complete files under their
final names (entries parse, every shard they name loads); after the last resume the
features must equal an uninterrupted run's exactly, with every image present once.

Unwritable output folders: the tests run as root, and root ignores ``chmod``, so a
read-only folder is made three other ways: a path under a regular file
(``file/sub``: NotADirectoryError), ``/sys`` (refuses new files even to root; skipped
where it does not), and a monkeypatched ``tempfile.mkstemp`` that raises ``EROFS``
for the output folder only. A full disk is a monkeypatched ``shutil.disk_usage``
(up front) or a ``save_file`` that raises ``ENOSPC`` on the second shard (mid-run).
"""
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fusion.extract
from fusion.cli import main

REPO = Path(__file__).resolve().parents[1]
N_GOOD = 12  # + 2 bad images = 14 one-image shards: room for kill points and a margin after
BAD = {"broken.jpg": "not an image", "truncated.jpg": "truncated"}


def make_images(folder: Path) -> list:
    """``N_GOOD`` small PNGs of different sizes, a non-image ``.jpg`` and a truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        arr = rng.integers(0, 256, (40 + 7 * i, 80 - 3 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    return sorted(p.name for p in folder.iterdir())


def extract_args(images: Path, out: Path) -> list:
    return ["extract", "tiny", "--weights", "random", "--images", str(images), "--out", str(out),
            "--shard-size", "1", "--batch-size", "1", "--no-progress"]


@contextlib.contextmanager
def one_thread():
    """Run in-process extractions with one torch thread, like the subprocesses: the same
    thread count gives bitwise-identical features (and 2-core CI machines are not
    oversubscribed by spinning OpenMP threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    with one_thread():
        yield


def entries(out: Path) -> list:
    return sorted((out / "manifest").glob("shard-*.json")) if (out / "manifest").is_dir() else []


def run_and_kill(args: list, out: Path, after_entries: int, delay: float = 0.0, timeout: float = 240) -> int:
    """Start ``python -m fusion`` + args; SIGKILL it once ``after_entries`` entries exist (plus
    ``delay`` seconds). Returns the number of entries at the kill, or -1 if it finished first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as one_thread(): same numerics, no thread contention
    proc = subprocess.Popen([sys.executable, "-m", "fusion", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while len(entries(out)) < after_entries:
            if proc.poll() is not None:
                return -1
            if time.monotonic() > deadline:
                raise TimeoutError(f"extraction made no progress in {timeout} s")
            time.sleep(0.002)
        if delay:
            time.sleep(delay)
        if proc.poll() is not None:
            return -1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return len(entries(out))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_consistent(out: Path) -> None:
    """Only complete files under final names: each entry parses and each shard it names loads
    with exactly the images the entry lists."""
    for entry_path in entries(out):
        entry = json.loads(entry_path.read_text())
        if entry["shard"]:
            assert sorted(load_file(str(out / entry["shard"]))) == entry["images"]


def read_features(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    feats, seen = {}, []
    for shard, names in manifest["shards"].items():
        tensors = load_file(str(out / shard))
        assert sorted(tensors) == sorted(names)
        seen.extend(names)
        feats.update(tensors)
    assert len(seen) == len(set(seen)), "an image is stored twice"
    return feats, manifest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The images and an uninterrupted in-process run over them (the reference)."""
    root = tmp_path_factory.mktemp("crash")
    names = make_images(root / "images")
    ref = root / "reference"
    with one_thread():
        assert main(extract_args(root / "images", ref)) == 1  # 1: two images were skipped
    feats, manifest = read_features(ref)
    assert sorted(feats) == [n for n in names if n not in BAD]
    assert sorted(manifest["failed"]) == sorted(BAD)
    return root / "images", feats, manifest


def check_resumed_output(out: Path, reference) -> None:
    _, ref_feats, ref_manifest = reference
    feats, manifest = read_features(out)
    assert sorted(feats) == sorted(ref_feats), "an image is missing"
    for name, t in ref_feats.items():
        assert torch.equal(feats[name], t), f"{name}: features differ from the uninterrupted run"
    assert manifest["failed"] == ref_manifest["failed"]
    assert manifest["num_images"] == N_GOOD
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_sigkill_at_several_points_then_resume_matches_uninterrupted(dataset, tmp_path, capsys):
    images, _, _ = dataset
    out = tmp_path / "out"
    args = extract_args(images, out)
    killed_at = []
    for k in (1, 8):  # two real SIGKILLs, the second in a resumed run: after 1 and 8 shard entries appeared
        at = run_and_kill(args, out, k)
        assert at != -1, "the run finished before the kill point"
        killed_at.append(at)
        assert_consistent(out)
    assert killed_at == sorted(killed_at) and killed_at[-1] < N_GOOD + len(BAD)
    capsys.readouterr()
    with one_thread():
        assert main(args) == 1  # the last resume, in-process; non-zero: two images were skipped
    captured = capsys.readouterr()
    assert "2 skipped" in captured.out and f"{killed_at[-1]} shards already done" in captured.out
    for name in BAD:
        assert f"skipped {name}:" in captured.err
    check_resumed_output(out, dataset)


@pytest.mark.slow
def test_sigkill_at_random_times_then_resume_matches_uninterrupted(dataset, tmp_path):
    images, _, _ = dataset
    out = tmp_path / "out"
    args = extract_args(images, out)
    rng = random.Random(1234)
    for _ in range(6):  # kill at a random moment after a random number of entries
        if run_and_kill(args, out, rng.randrange(0, N_GOOD), delay=rng.uniform(0, 0.4)) == -1:
            break
        assert_consistent(out)
    with one_thread():
        assert main(args) == 1
    check_resumed_output(out, dataset)


# ----------------------------------------------------------------------------- corrupt images


def test_corrupt_images_are_recorded_with_reasons_and_counted(tmp_path, capsys):
    folder = tmp_path / "images"
    make_images(folder)
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    assert main(extract_args(folder, out)) == 1
    captured = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    failed = manifest["failed"]
    assert sorted(failed) == ["broken.jpg", "empty.png", "truncated.jpg"]
    assert "not an image file" in failed["broken.jpg"] and "not an image file" in failed["empty.png"]
    assert "truncated" in failed["truncated.jpg"]
    assert "broken.jpg" in failed["broken.jpg"]  # the reason names the file
    assert "3 skipped" in captured.out
    assert all(f"skipped {name}:" in captured.err for name in failed)
    assert manifest["num_images"] == N_GOOD


# ----------------------------------------------------------------------------- unwritable / full disk


def test_out_under_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    make_images(folder)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr("fusion.cli._build", lambda args: pytest.fail("the tower was built before the check"))
    assert main(extract_args(folder, blocker / "sub")) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker / "sub") in err and "writable" in err and "NotADirectoryError" in err


def test_out_in_sys_fails_before_any_work(tmp_path, capsys, monkeypatch):
    target = Path("/sys/fusion-tower-test")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys accepts new folders here")
    folder = tmp_path / "images"
    make_images(folder)
    monkeypatch.setattr("fusion.cli._build", lambda args: pytest.fail("the tower was built before the check"))
    assert main(extract_args(folder, target)) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(target) in err and "writable" in err


def test_read_only_folder_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """A folder that exists but refuses new files (EROFS, as on a read-only mount)."""
    folder = tmp_path / "images"
    make_images(folder)
    out = tmp_path / "readonly"
    out.mkdir()
    (out / "manifest").mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and Path(dir).resolve().is_relative_to(out.resolve()):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr("fusion.cli._build", lambda args: pytest.fail("the tower was built before the check"))
    assert main(extract_args(folder, out)) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(out) in err and "Read-only file system" in err


def test_too_little_free_space_fails_before_encoding(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    make_images(folder)
    out = tmp_path / "out"

    class Usage:
        total, used, free = 10**9, 10**9 - 1000, 1000

    monkeypatch.setattr(fusion.extract.shutil, "disk_usage", lambda path: Usage)
    monkeypatch.setattr("fusion.tower.MultiEncoderTower.forward",
                        lambda *a, **k: pytest.fail("images were encoded before the space check"))
    assert main(extract_args(folder, out)) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err and str(out) in err and "need about" in err
    assert not list(out.glob("*.safetensors")) and not entries(out)


def test_disk_full_mid_run_keeps_finished_shards_and_resumes(dataset, tmp_path, capsys, monkeypatch):
    images, _, _ = dataset
    out = tmp_path / "out"
    real_save = fusion.extract.save_file
    calls = []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:  # half a file, then the disk is full
                f.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path)

    monkeypatch.setattr(fusion.extract, "save_file", save_file)
    with one_thread():
        assert main(extract_args(images, out)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same command to resume" in err and str(out) in err
    # shard 0 is broken.jpg (nothing to save), shard 1 img00.png (saved), shard 2 failed
    assert [p.name for p in entries(out)] == ["shard-00000.json", "shard-00001.json"]
    assert (out / "shard-00001.safetensors").is_file() and not (out / "shard-00002.safetensors").exists()
    assert not list(out.rglob("*.tmp"))
    assert_consistent(out)
    monkeypatch.setattr(fusion.extract, "save_file", real_save)
    with one_thread():
        assert main(extract_args(images, out)) == 1
    check_resumed_output(out, dataset)


def test_resume_with_other_shard_size_is_refused(dataset, tmp_path, capsys):
    images, _, _ = dataset
    out = tmp_path / "out"
    args = extract_args(images, out)
    assert main(args) == 1
    args[args.index("--shard-size") + 1] = "3"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--shard-size" in err and "new --out" in err and "shard-00000.json" in err


def test_resume_with_another_tower_is_refused(dataset, tmp_path, capsys):
    images, _, _ = dataset
    out = tmp_path / "out"
    args = extract_args(images, out)
    with one_thread():
        assert main(args) == 1
        assert main(args + ["fusion.grid=3"]) == 2
        assert main(args + ["--seed", "1"]) == 2
        assert main(args) == 1  # the same settings resume (nothing left to do)
    err = capsys.readouterr().err
    assert "fusion.grid: 4 there, 3 now" in err and "seed: 0 there, 1 now" in err and "new --out" in err
