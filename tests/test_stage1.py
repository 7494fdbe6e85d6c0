"""Stage 1: rollout generation (determinism, resume, errors) and the two loaders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.carracing import BROWNIAN_DT, random_actions
from data.loaders import FrameDataset, SequenceDataset
from data.rollouts import (
    NoRolloutsError,
    dataset_paths,
    load_rollout,
    rollout_path,
    save_rollout,
    split_rollouts,
)
from envs.carracing import make_env, to_model_frame
from utils.files import is_temp_file, temp_name

ROOT = Path(__file__).resolve().parents[1]
GENERATE = [sys.executable, str(ROOT / "data" / "generation_script.py")]


def generate(rootdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        GENERATE + ["--rootdir", str(rootdir), *args], capture_output=True, text=True, timeout=300
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def files_by_index(rootdir: Path) -> dict[int, bytes]:
    return {int(p.stem.split("_")[1]): p.read_bytes() for p in rootdir.rglob("rollout_*.npz")}


def temporaries(rootdir: Path) -> list[Path]:
    """The hidden temporaries of atomic writes under `rootdir` (`.NAME.PID.tmpSUFFIX`, utils.files)."""
    return [p for p in rootdir.rglob("*") if is_temp_file(p)]


def dead_pid() -> int:
    """The pid of a process that has ended (a killed writer's, as far as its temporary is concerned)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- frames and env ---------------------------------------------------------------------
def test_to_model_frame_is_area_average():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    small = to_model_frame(frame)
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8
    # output pixel (0, 0) covers input rows/cols 0 and half of 1: weights 2/3, 1/3 per axis
    w = np.array([2, 1]) / 3
    expected = np.einsum("i,j,ijc->c", w, w, frame[:2, :2].astype(float))
    assert np.all(np.abs(small[0, 0] - expected) <= 0.5 + 1e-9)
    batch = np.stack([frame, frame[::-1]])
    assert np.array_equal(to_model_frame(batch)[1], to_model_frame(frame[::-1]))
    with pytest.raises(ValueError):
        to_model_frame(np.zeros((64, 64, 3), np.uint8))


def test_make_env_api():
    env = make_env()
    obs, info = env.reset(seed=3)
    assert obs.shape == (96, 96, 3) and obs.dtype == np.uint8
    obs, reward, terminated, truncated, info = env.step(np.array([0.0, 1.0, 0.0], np.float32))
    assert isinstance(reward, float) and not terminated and not truncated
    assert env.spec.max_episode_steps == 1000
    env.close()


# -- policies -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["brown", "white"])
def test_policies_stay_in_action_box(policy):
    low, high = np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32)
    actions = random_actions(policy, 2000, low, high, np.random.default_rng(1))
    assert actions.shape == (2000, 3) and actions.dtype == np.float32
    assert np.all(actions >= low) and np.all(actions <= high)
    step = np.abs(np.diff(actions, axis=0)).mean()
    if policy == "brown":  # a walk with N(0, dt) increments: small, correlated moves
        assert step < 2 * np.sqrt(BROWNIAN_DT)
    else:  # independent uniform draws: consecutive actions far apart on average
        assert step > 0.3


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError):
        random_actions("pink", 10, np.zeros(3), np.ones(3), np.random.default_rng(0))


# -- generation script --------------------------------------------------------------------
def test_generation_makes_valid_files_and_same_bytes_whatever_the_threads(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    result = generate(two, "--rollouts", "4", "--threads", "2", "--max-steps", "30", "--seed", "5")
    assert "generated 4 rollouts" in result.stdout
    assert sorted(p.relative_to(two).as_posix() for p in two.rglob("*.npz")) == [
        "thread_0/rollout_0.npz",
        "thread_0/rollout_2.npz",
        "thread_1/rollout_1.npz",
        "thread_1/rollout_3.npz",
    ]
    for path in two.rglob("*.npz"):
        arrays = load_rollout(path)
        assert (
            arrays is not None and len(arrays["actions"]) == 8
        )  # ceil(30 / 4): agent steps at the default k
        assert arrays["terminals"][-1] and not arrays["terminals"][:-1].any()
    generate(one, "--rollouts", "4", "--threads", "1", "--max-steps", "30", "--seed", "5")
    assert files_by_index(one) == files_by_index(two)  # byte-identical, whatever the thread count
    other = tmp_path / "other"
    generate(other, "--rollouts", "1", "--threads", "1", "--max-steps", "30", "--seed", "6")
    assert files_by_index(other)[0] != files_by_index(one)[0]


def test_white_policy_rollout_recorded(tmp_path):
    generate(tmp_path, "--rollouts", "1", "--threads", "1", "--max-steps", "20", "--policy", "white")
    with np.load(tmp_path / "thread_0" / "rollout_0.npz") as archive:
        assert str(archive["policy"]) == "white"
        assert np.abs(np.diff(archive["actions"], axis=0)).mean() > 0.3


def test_resume_skips_complete_rollouts_and_ignores_partial_files(tmp_path):
    generate(tmp_path, "--rollouts", "2", "--threads", "2", "--max-steps", "20")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("rollout_*.npz")}
    # what a kill inside a write leaves behind: the hidden temporary, under the name atomic_write
    # gives it (.rollout_2.npz.PID.tmp.npz), never matched by readers
    stale = temp_name(rollout_path(tmp_path, 2, thread=0), pid=dead_pid())
    assert stale.name.startswith(".rollout_2.npz.") and stale.name.endswith(".tmp.npz")
    stale.write_bytes(b"half a file")
    assert temporaries(tmp_path) == [stale]
    assert len(dataset_paths(tmp_path)[0]) == 2
    result = generate(tmp_path, "--rollouts", "4", "--threads", "2", "--max-steps", "20")
    assert "generated 2 rollouts" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # untouched
    assert not stale.exists()
    assert sorted(files_by_index(tmp_path)) == [0, 1, 2, 3]
    assert "nothing to do" in generate(tmp_path, "--rollouts", "4", "--max-steps", "20").stdout


def test_killed_run_leaves_only_complete_files_and_rerun_finishes(tmp_path):
    """kill -9 of the script and its worker at any moment (here: once the first rollout is on
    disk, mid-rollout), then kill -9 inside a rollout's write (utils/files.py's fault hook):
    only complete rollouts under their names, the write's temporary hidden, and the rerun
    finishes the dataset and removes the temporary."""
    args = ["--rootdir", str(tmp_path), "--rollouts", "3", "--threads", "1", "--max-steps", "400"]
    process = subprocess.Popen(
        GENERATE + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.rglob("rollout_*.npz")) and time.monotonic() < deadline:
            time.sleep(0.1)  # (waiting for the file, with slack for a busy machine)
        assert list(tmp_path.rglob("rollout_*.npz")), "no rollout written in 240 s"
        os.killpg(process.pid, signal.SIGKILL)  # the script and its worker, mid-rollout
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL  # killed, not finished: 2 rollouts of 400 steps were left
    assert 1 <= len(files_by_index(tmp_path)) < 3
    for path in tmp_path.rglob("rollout_*.npz"):
        assert load_rollout(path) is not None

    # now killed inside the write of the next rollout, after its temporary is written
    hook = {"WORLD_MODELS_KILL_AT_WRITE": "1", "WORLD_MODELS_KILL_COUNTER": str(tmp_path / "writes")}
    done = set(files_by_index(tmp_path))
    killed = subprocess.run(
        GENERATE + args, env=os.environ | hook, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = temporaries(tmp_path)
    assert len(left) == 1, left
    index = min(set(range(3)) - done)  # the next rollout: its write was the one killed
    writer = int(left[0].name.rsplit(".tmp", 1)[0].rsplit(".", 1)[1])  # the worker's pid
    assert left[0] == temp_name(rollout_path(tmp_path, index, thread=0), pid=writer)
    assert set(files_by_index(tmp_path)) == done  # readers never see the temporary
    assert len(dataset_paths(tmp_path)[0]) == len(done)

    generate(tmp_path, *args[2:])
    assert sorted(files_by_index(tmp_path)) == [0, 1, 2]
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize(
    "flag,value", [("--rollouts", "0"), ("--threads", "-1"), ("--policy", "pink"), ("--max-steps", "x")]
)
def test_bad_cli_values_exit_2(tmp_path, flag, value):
    args = ["--rollouts", "1", flag, value]
    result = generate(tmp_path, *args, check=False)
    assert result.returncode == 2 and "error" in result.stderr and "Traceback" not in result.stderr


def test_worker_error_exits_non_zero_with_its_message(tmp_path):
    (tmp_path / "thread_0").write_text("a file where the worker wants a folder")
    result = generate(tmp_path, "--rollouts", "1", "--max-steps", "5", check=False)
    assert result.returncode == 1  # a stage that failed while running
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "a worker failed" in lines[0] and "thread_0" in lines[0], result.stderr
    assert "Traceback" in (tmp_path / "worker_error.log").read_text()


# -- loaders ------------------------------------------------------------------------------
def test_corrupt_truncated_and_misshapen_files_are_skipped_with_a_warning(tiny_dataset, tmp_path):
    good = sorted(tiny_dataset.rglob("rollout_*.npz"))[:2]
    for path in good:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "rollout_7.npz").write_bytes(good[0].read_bytes()[:4000])  # truncated
    (tmp_path / "rollout_8.npz").write_bytes(b"not a zip at all")
    arrays = load_rollout(good[0])
    arrays["observations"] = arrays["observations"][:, :32, :32]
    save_rollout(tmp_path / "rollout_9.npz", arrays)  # wrong frame size
    with pytest.warns(UserWarning) as caught:
        paths, lengths = dataset_paths(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert all(f"rollout_{i}.npz" in messages for i in (7, 8, 9))
    assert [p.name for p in paths] == [p.name for p in good]
    assert lengths == [len(load_rollout(p)["rewards"]) for p in good]


def test_a_file_corrupt_inside_is_skipped_when_read(tiny_dataset, tmp_path):
    path = sorted(tiny_dataset.rglob("rollout_*.npz"))[0]
    data = bytearray(path.read_bytes())
    data[200:3000] = bytes(2800)  # zeros in the middle of the compressed frames
    bad = tmp_path / "rollout_0.npz"
    bad.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rollout_0.npz"):
        assert load_rollout(bad) is None


def test_no_usable_rollouts_is_one_clear_error(tmp_path):
    with pytest.raises(NoRolloutsError, match="generation_script.py"):
        dataset_paths(tmp_path / "missing")
    (tmp_path / "rollout_0.npz").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(NoRolloutsError, match="none of the 1"):
        dataset_paths(tmp_path)


def test_split_is_by_rollout_deterministic_and_disjoint(tiny_dataset):
    paths, _ = dataset_paths(tiny_dataset)
    train, test = split_rollouts(paths, test_fraction=0.34, seed=0)
    assert (train, test) == split_rollouts(list(reversed(paths)), test_fraction=0.34, seed=0)
    assert len(test) == 2 and len(train) == 4 and not set(train) & set(test)
    assert split_rollouts(paths[:1]) == (paths[:1], [])


def test_frame_dataset_yields_every_frame_once_with_bounded_buffer(tiny_dataset):
    paths, lengths = dataset_paths(tiny_dataset)
    data = FrameDataset(paths, batch_size=16, shuffle=True, buffer_size=2, seed=0)
    loaded_sizes = []
    original = data.buffer._load_chunk
    data.buffer._load_chunk = lambda chunk: loaded_sizes.append(len(chunk)) or original(chunk)
    batches = list(data)
    assert max(loaded_sizes) <= 2  # never more than buffer_size rollouts in one chunk
    frames = torch.cat(batches)
    assert frames.dtype == torch.uint8 and frames.shape == (sum(lengths), 64, 64, 3)
    assert all(len(b) == 16 for b in batches[:-1])
    reference = np.concatenate([load_rollout(p)["observations"] for p in paths])
    # same multiset of frames: compare sorted per-frame checksums
    checksum = lambda x: np.sort(
        np.asarray(x, dtype=np.int64).reshape(len(x), -1).sum(1) * 7919 + np.asarray(x)[:, 10, 10, 0]
    )
    assert np.array_equal(checksum(frames.numpy()), checksum(reference))
    assert not torch.equal(frames, torch.from_numpy(reference))  # shuffled
    data.set_epoch(0)
    assert torch.equal(torch.cat(list(data)), frames)  # same epoch, same order
    data.set_epoch(1)
    assert not torch.equal(torch.cat(list(data)), frames)
    fixed = FrameDataset(paths, batch_size=16, shuffle=False, buffer_size=2)
    assert torch.equal(torch.cat(list(fixed)), torch.from_numpy(reference))


def test_sequence_dataset_windows_next_frames_and_masks(tiny_dataset):
    paths, lengths = dataset_paths(tiny_dataset)
    assert sorted(lengths) == [25, 25, 25, 25, 40, 40]
    seq_len = 30  # longer than the short rollouts: they are padded and masked
    data = SequenceDataset(paths, seq_len=seq_len, batch_size=4, shuffle=False, buffer_size=3)
    rollouts = [load_rollout(p) for p in paths]
    batches = list(data)
    total_steps = sum(int(b["mask"].sum()) for b in batches)
    assert total_steps >= sum(lengths)  # every step covered (long rollouts overlap a little)
    first = batches[0]
    assert first["observations"].shape == (4, seq_len, 64, 64, 3)
    assert first["next_observations"].shape == (4, seq_len, 64, 64, 3)
    assert first["actions"].shape == (4, seq_len, 3) and first["rewards"].shape == (4, seq_len)
    # the first window of the first rollout: next frames are the frames shifted by one
    r0 = rollouts[0]
    n = min(seq_len, len(r0["rewards"]))
    assert torch.equal(first["observations"][0, :n], torch.from_numpy(r0["observations"][:n]))
    assert torch.equal(first["next_observations"][0, : n - 1], torch.from_numpy(r0["observations"][1:n]))
    for b in batches:  # masks: next_mask is mask minus each rollout's last step
        assert torch.all(b["next_mask"] <= b["mask"])
        ends = b["mask"].sum(1)
        assert torch.all(b["terminals"][torch.arange(len(ends)), ends - 1] | (ends == seq_len))
        assert torch.all(b["observations"][~b["mask"]] == 0)
    short = [b for b in batches if (b["mask"].sum(1) == 25).any()]
    assert short, "short rollouts appear as padded windows"
    for b in short:
        rows = b["mask"].sum(1) == 25
        assert torch.all(b["next_mask"][rows].sum(1) == 24)
        assert torch.all(b["terminals"][rows, 24])


def test_sequence_dataset_in_memory_source_and_shuffle():
    rng = np.random.default_rng(0)
    source = [
        {"mu": rng.standard_normal((n, 4)).astype(np.float32), "rewards": np.arange(n, dtype=np.float32)}
        for n in (12, 5, 9)
    ]
    data = SequenceDataset(source, seq_len=4, batch_size=2, shuffle=True, next_keys=("mu",), seed=1)
    batches = list(data)
    assert len(data) <= len(batches) <= len(data) + len(source)
    assert len(list(SequenceDataset(source, seq_len=4, batch_size=2, shuffle=False))) == len(data)
    for b in batches:
        assert b["mu"].shape == (len(b["mask"]), 4, 4) and b["next_mu"].shape == b["mu"].shape
        # reward of step t is its index in the rollout: windows are contiguous
        valid = b["mask"]
        diffs = b["rewards"][:, 1:] - b["rewards"][:, :-1]
        assert torch.all(diffs[valid[:, 1:]] == 1)
