"""The CMA-ES search against track luck: more tracks per candidate as it converges, and a final
re-scoring of its best-evaluated means, end to end at toy size (random-init V and M, as in
test_controller_stage.py).

Covers: the tracks per candidate double on schedule and every candidate of a generation plays
the same ones (common random numbers), the first n of one stream whatever n; the fitness told
to CMA-ES is what the candidates return on exactly those tracks; at the end the kept means are
re-scored on fresh tracks of their own range (never the held-out ones) and best.pt is the one
that played best; a rerun does not re-score again, a longer one does.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from test_controller_stage import HIDDEN, LATENT, make_world, read_csv

from agent.population import RealEvaluator, WorkerSpec, init_worker
from agent.search import Search, tracks_per_candidate
from agent.seeds import RESCORE, eval_seeds, holdout_seeds, rescore_seeds, train_seeds
from models.controller import Controller
from pool.local import WorkerPool
from utils import profile
from utils.checkpoint import load_checkpoint
from utils.params import get_flat_params

STEPS = 120  # env frames per episode: long enough for candidates to return differently
FLAGS = ["--pop-size", "4", "--n-samples", "1", "--samples-double-every", "1", "--max-samples", "3"]
FLAGS += ["--max-steps", str(STEPS), "--eval-every", "1", "--eval-episodes", "2", "--sigma0", "2.0"]
FLAGS += ["--rescore-episodes", "3", "--workers", "2"]


def train(logdir, *extra: str) -> None:
    import traincontroller

    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert traincontroller.main(["--logdir", str(logdir), *FLAGS, *extra]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """3 generations of 1, 2, then 3 tracks per candidate, each mean evaluated, then re-scored."""
    logdir = make_world(tmp_path_factory.mktemp("noise"))
    train(logdir, "--generations", "3")
    state = load_checkpoint(logdir / "ctrl" / "last.pt")
    pool = WorkerPool(1, init_worker, (WorkerSpec(str(logdir), state["config"], 4, 4),))
    with pool:
        training = RealEvaluator(pool, STEPS, 4, profile.STALL_FRAMES)  # as the search scores candidates
        yield dict(logdir=logdir, state=state, training=training, real=RealEvaluator(pool, STEPS, 4))


def test_tracks_per_candidate_double_on_schedule():
    assert [tracks_per_candidate(g, 4, 50, 16) for g in (1, 50, 51, 100, 101, 151, 999)] == [
        4,
        4,
        8,
        8,
        16,
        16,
        16,
    ]
    assert [tracks_per_candidate(g, 4, 0, 16) for g in (1, 500)] == [4, 4]  # 0: never
    assert tracks_per_candidate(1, 8, 50, 4) == 8  # --max-samples below --n-samples: never fewer
    assert train_seeds(0, 7, 2) == train_seeds(0, 7, 8)[:2]  # more tracks keep the first ones


def test_every_candidate_of_a_grown_generation_plays_the_same_tracks(run):
    """Replaying the search: each generation's told fitness is exactly its candidates' mean return on
    train_seeds(seed, generation, n) for that generation's n, the same tracks for all of them."""
    state, training = run["state"], run["training"]
    log = read_csv(run["logdir"] / "ctrl" / "log.csv")
    assert [int(r["tracks"]) for r in log] == [1, 2, 3]
    replay = Search(dict(state["config"]), **state["search"])
    for generation, told in enumerate(state["fitness"].numpy(), start=1):
        candidates = replay.ask()
        seeds = train_seeds(0, generation, int(log[generation - 1]["tracks"]))
        scores = training.evaluate(candidates, seeds)
        assert scores.returns.shape == (4, len(seeds))
        np.testing.assert_array_equal(scores.fitness, told)
        replay.tell(candidates, told)
    assert len(set(state["fitness"][-1].tolist())) > 1  # the candidates do return differently


def test_best_pt_is_the_kept_mean_that_plays_best_on_fresh_rescoring_tracks(run):
    logdir, state, real = run["logdir"], run["state"], run["real"]
    rows = read_csv(logdir / "ctrl" / "rescore.csv")
    assert sorted(int(r["generation"]) for r in rows) == [1, 2, 3]  # all 3 evaluations are kept
    tracks = rescore_seeds(0, 3, 3)
    assert all(t // 2**32 == RESCORE for t in tracks)
    used = set(holdout_seeds(0, 1000)) | {
        s for g in (1, 2, 3) for s in train_seeds(0, g, 3) + eval_seeds(0, g, 2)
    }
    assert not set(tracks) & used
    kept = state["kept_means"].numpy()
    played = real.evaluate(list(kept), tracks).fitness  # the kept means on the re-scoring tracks
    by_generation = dict(zip(state["kept_generations"].tolist(), played))
    for row in rows:
        assert float(row["rescore_mean"]) == pytest.approx(by_generation[int(row["generation"])], rel=1e-5)
    assert len(set(np.round(played, 4))) > 1  # a pick that matters
    best = load_checkpoint(logdir / "ctrl" / "best.pt")
    chosen = [int(r["generation"]) for r in rows if r["chosen"] == "1"]
    assert chosen == [best["generation"]] and best["eval_episodes"] == 3
    assert best["eval_return"] == pytest.approx(max(played), rel=1e-5)
    controller = Controller(LATENT, HIDDEN, 3)
    controller.load_state_dict(best["state_dict"])
    np.testing.assert_allclose(get_flat_params(controller), kept[int(np.argmax(played))], atol=1e-6)
    assert state["rescored"] == [3, 3]
    assert state["frames"] == sum(int(r["rescore_frames"]) for r in rows) + _search_frames(logdir)


def _search_frames(logdir) -> int:
    """Real env frames of the generations and their evaluations, from log.csv."""
    return int(read_csv(logdir / "ctrl" / "log.csv")[-1]["env_frames"])


def test_a_rerun_does_not_rescore_again_but_a_longer_search_does(run, tmp_path, capsys):
    import shutil

    logdir = tmp_path / "copy"
    shutil.copytree(run["logdir"], logdir, symlinks=True)
    rescored = (logdir / "ctrl" / "rescore.csv").read_text()
    train(logdir, "--generations", "3")
    assert "nothing to do" in capsys.readouterr().out
    assert (logdir / "ctrl" / "rescore.csv").read_text() == rescored
    train(logdir, "--generations", "4")
    assert "re-scored: best.pt is generation" in capsys.readouterr().out
    state = load_checkpoint(logdir / "ctrl" / "last.pt")
    assert state["rescored"] == [4, 3] and len(state["kept_means"]) == 3
    rows = read_csv(logdir / "ctrl" / "rescore.csv")
    assert len(rows) == 3 and {int(r["generation"]) for r in rows} == set(state["kept_generations"].tolist())
    restored = Search.from_state(state)
    assert [(r, g) for r, g, _ in restored.kept] == list(
        zip(state["kept_returns"].tolist(), state["kept_generations"].tolist())
    )


def test_the_pick_is_the_best_rescored_not_the_best_evaluated(tmp_path):
    from traincontroller import choose_rescored

    rows = [
        dict(generation=g, eval_mean=e, rescore_mean=r, rescore_std=1.0, rescore_frames=10)
        for g, e, r in ((80, 900.0, 850.0), (60, 880.0, 870.0), (70, 860.0, 870.0))
    ]
    assert choose_rescored(tmp_path, rows, "generation")["generation"] == 60  # a tie: the earlier
    logged = read_csv(tmp_path / "rescore.csv")
    assert [(r["generation"], r["chosen"]) for r in logged] == [("80", "0"), ("60", "1"), ("70", "0")]
