"""The latent cache: every rollout encoded ONCE by V, for M and for the dream environment.

M trains on sequences of V's latents. Re-encoding frames with V at every batch (as the public
PyTorch port does) spends most of M's epoch in V's encoder and re-reads every compressed
frame each epoch (README, Speed: bench_mdrnn.py). Instead, V's posterior (mu, log sigma) of every
frame is computed once and stored with the actions, rewards and terminals; M then samples
z = mu + sigma * eps from it each batch, which is exactly what re-encoding would give.

Format: one uncompressed `L/mdrnn/latents.npz` (~260 bytes per frame for z=32; loads at disk speed):

| key | shape | dtype | meaning |
|---|---|---|---|
| `mu`, `logsigma` | (N, latent) | float32 | V's posterior of every frame, rollouts concatenated |
| `actions` | (N, 3) | float32 | as in the rollout files |
| `rewards` | (N,) | float32 | |
| `terminals` | (N,) | bool | |
| `lengths` | (R,) | int64 | frames of each cached rollout, in `files` order |
| `files` | (R,) | str | each cached rollout's path relative to the dataset root |
| `all_files` | (F,) | str | every usable rollout file found, the list V's split is made over |
| `meta` | () | str | JSON: format version, V and dataset fingerprints, latent size, V's epoch |

The cache is rebuilt when V's `best.pt` changes (sha256 of its bytes) or when the dataset's
file list changes (relative paths and sizes); otherwise it is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.loaders import RolloutBuffer
from data.rollouts import dataset_action_repeat, dataset_paths, split_rollouts
from models.vae import VAE
from utils.checkpoint import BEST, load_model, stage_dir
from utils.cli import stage_command
from utils.errors import BadRolloutError
from utils.files import atomic_write

CACHE_NAME = "latents.npz"
CACHE_VERSION = 1
STEP_KEYS = ("mu", "logsigma", "actions", "rewards", "terminals")  # per-step arrays of a cached rollout


def cache_path(logdir: str | os.PathLike) -> Path:
    return stage_dir(logdir, "mdrnn") / CACHE_NAME


def vae_fingerprint(logdir: str | os.PathLike) -> str:
    """sha256 of V's best.pt: any retraining of V, even to the same epoch count, changes it."""
    digest = hashlib.sha256()
    with open(stage_dir(logdir, "vae") / BEST, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(root: str | os.PathLike, paths: Sequence[Path]) -> str:
    """sha256 of the rollouts' relative paths and sizes: adding, removing or regenerating a
    rollout changes it; moving the whole dataset folder does not."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=str):
        digest.update(f"{_relative(path, root)}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _relative(path: Path, root: str | os.PathLike) -> str:
    return Path(path).relative_to(root).as_posix()


def read_meta(path: str | os.PathLike) -> dict | None:
    """The cache's metadata (reads only that small entry), or None if absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return json.loads(str(archive["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def build_latent_cache(
    logdir: str | os.PathLike,
    dataset: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    buffer_size: int = 8,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Make sure `L/mdrnn/latents.npz` holds V's latents of every rollout under `dataset`.

    Reuses the cache when V's best.pt and the dataset's file list are those it was built
    from; otherwise encodes every rollout with V (reading `buffer_size` rollouts at a time and
    encoding `batch_size` frames at a time, so memory stays bounded whatever the dataset size;
    only the latents, 256 bytes per frame for z=32, are kept) and writes the cache atomically.
    Stops with one line if V or the dataset is missing. Returns the cache's path.
    """
    path = cache_path(logdir)
    # fingerprint before loading: if V changes in between, the cache is merely rebuilt next time
    v_print = vae_fingerprint(logdir) if (stage_dir(logdir, "vae") / BEST).is_file() else None
    vae, state = load_model(VAE, logdir, "vae", device)  # or one line naming trainvae.py
    v_print = v_print or vae_fingerprint(logdir)
    paths, lengths_found = dataset_paths(dataset)  # or one line naming the command that makes them
    action_repeat = dataset_action_repeat(paths, dataset)  # one k per dataset: M models k-frame steps
    d_print = dataset_fingerprint(dataset, paths)
    meta = read_meta(path)
    if (
        not force
        and meta is not None
        and meta.get("version") == CACHE_VERSION
        and meta.get("vae") == v_print
        and meta.get("dataset") == d_print
    ):
        return path

    reason = (
        "no cache yet"
        if meta is None
        else "V's best.pt changed"
        if meta.get("vae") != v_print
        else "the dataset changed"
    )
    if verbose:
        print(
            f"encoding {len(paths)} rollouts with V ({stage_dir(logdir, 'vae') / BEST}, epoch "
            f"{state.get('epoch')}) into {path}: {reason}"
        )

    columns: dict[str, list[np.ndarray]] = {key: [] for key in STEP_KEYS}
    lengths, files = [], []
    buffer = RolloutBuffer(paths, buffer_size)
    groups = [paths[s : s + buffer.buffer_size] for s in range(0, len(paths), buffer.buffer_size)]
    start, frames = time.perf_counter(), 0
    with tqdm(
        total=sum(lengths_found),
        unit="frame",
        unit_scale=True,
        desc="latent cache",
        dynamic_ncols=True,
        disable=not verbose,
    ) as bar:
        for group, chunk in zip(groups, buffer.chunks()):  # chunks() follows `paths` order
            if chunk:
                obs = np.concatenate([r["observations"] for r in chunk])  # (sum T, 64, 64, 3) uint8
                mu, logsigma = vae.encode_frames(obs, batch_size)  # (sum T, latent) each
                columns["mu"].append(mu.float().cpu().numpy())
                columns["logsigma"].append(logsigma.float().cpu().numpy())
                for key in ("actions", "rewards", "terminals"):
                    columns[key].extend(r[key] for r in chunk)
                lengths.extend(len(r["actions"]) for r in chunk)
                # a chunk holds its group's usable files, in order (the buffer notes the skipped ones)
                files.extend(_relative(p, dataset) for p in group if p not in buffer._bad)
                frames += len(obs)
                bar.update(len(obs))
    if not lengths:
        raise BadRolloutError(
            f"no usable rollout under {dataset} (every file was skipped); "
            f"regenerate them with: {stage_command('data', dataset=dataset)}"
        )

    arrays = {key: np.concatenate(parts) for key, parts in columns.items()}
    arrays["lengths"] = np.asarray(lengths, dtype=np.int64)
    arrays["files"] = np.asarray(files, dtype=str)
    arrays["all_files"] = np.asarray([_relative(p, dataset) for p in paths], dtype=str)
    arrays["meta"] = np.asarray(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "vae": v_print,
                "dataset": d_print,
                "latent_size": int(arrays["mu"].shape[1]),
                "vae_epoch": state.get("epoch"),
                "frames": int(arrays["lengths"].sum()),
                "rollouts": len(lengths),
                "action_repeat": action_repeat,
            }
        )
    )
    with atomic_write(path) as handle:  # a file object, so numpy adds no ".npz" suffix
        np.savez(handle, **arrays)
    if verbose:
        elapsed = time.perf_counter() - start
        print(
            f"cached {frames} frames of {len(lengths)} rollouts in {elapsed:.1f}s "
            f"({frames / max(elapsed, 1e-9):.0f} frames/s)"
        )
    return path


def load_latent_cache(logdir: str | os.PathLike, test_fraction: float = 0.1, seed: int = 0) -> list[dict]:
    """The cached rollouts, one dict each: `mu`, `logsigma` (T, latent), `actions` (T, 3),
    `rewards` (T,), `terminals` (T,) as numpy views, plus `file` (str, relative to the
    dataset root) and `test` (bool): whether V's split puts it in the test set.

    The split is `data.rollouts.split_rollouts(files, test_fraction, seed)` over every usable
    rollout file found when the cache was built; pass V's `test_fraction` and `seed` (from its
    checkpoint's config) so that M's (and the dream's) test rollouts are V's test rollouts.
    Stops with one line if there is no readable cache.
    """
    path = cache_path(logdir)
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in (*STEP_KEYS, "lengths", "files", "all_files")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise BadRolloutError(
            f"cannot read the latent cache {path} ({type(error).__name__}); "
            f"run `{stage_command('mdrnn', logdir)}` to build it"
        ) from None
    _, test_files = split_rollouts([Path(f) for f in data["all_files"]], test_fraction, seed)
    test_set = {p.as_posix() for p in test_files}
    bounds = np.cumsum(data["lengths"])[:-1]
    pieces = {key: np.split(data[key], bounds) for key in STEP_KEYS}
    return [
        {key: pieces[key][i] for key in STEP_KEYS} | {"file": str(name), "test": str(name) in test_set}
        for i, name in enumerate(data["files"])
    ]


def split_latents(rollouts: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(train, test) rollouts of `load_latent_cache`, each as a dict of the per-step arrays
    only (no `file`/`test`), ready for `data.loaders.SequenceDataset`."""
    train, test = [], []
    for rollout in rollouts:
        (test if rollout["test"] else train).append({key: rollout[key] for key in STEP_KEYS})
    return train, test
