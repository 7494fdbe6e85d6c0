"""A real episode beside M's imagination of it, as one GIF: what the dream-to-real gap looks like.

    python -m reporting.dream_gif --logdir pretrained/carracing-k4-imagine --out dream_vs_real.gif

C (L/ctrl/best.pt, with its own M when it carries one) drives held-out test track `--episode`
in the real env; on the left, the frames V sees; on the right, what M imagines from the same
first frame over as many steps, C acting on the imagined frames, decoded by V
(`agent.imagine.dream_beside_real`). Every other step, at twice V's 64 x 64.
"""

from __future__ import annotations

import numpy as np
import torch

from agent.imagine import save_dream_gif
from agent.policy import Agent, record_episode
from agent.seeds import holdout_seeds
from agent.world import load_best_controller, load_world
from envs.carracing import MAX_EPISODE_STEPS, make_env
from models.actor_critic import Actor
from utils.checkpoint import BEST, require_checkpoint
from utils.cli import ArgumentParser, int_in, run_script, writable_file


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", required=True, help="folder holding vae/, mdrnn/ and ctrl/best.pt")
    parser.add_argument("--out", type=writable_file, required=True, help="the GIF to write")
    parser.add_argument("--episode", type=int_in(0, 100_000), default=0, help="held-out track (default 0)")
    parser.add_argument(
        "--max-steps", type=int_in(2, MAX_EPISODE_STEPS), default=MAX_EPISODE_STEPS, help="env frames"
    )
    args = parser.parse_args(argv)
    best = require_checkpoint(args.logdir, "ctrl", BEST)
    vae, mdrnn, config = load_world(args.logdir, mdrnn_state=best.get("mdrnn"))
    controller, _ = load_best_controller(args.logdir, config)
    k = int(best.get("action_repeat", 1))
    env = make_env(action_repeat=k)
    track = holdout_seeds(0, args.episode + 1)[args.episode]
    played = record_episode(
        env, Agent(vae, mdrnn, controller), track, 0, np.zeros(config["action_size"]), args.max_steps
    )
    env.close()
    actor = Actor(config["latent_size"], config["hidden_size"], config["action_size"])
    actor.controller.load_state_dict(controller.state_dict())
    torch.manual_seed(0)
    save_dream_gif(args.out, vae, mdrnn, actor, played["observations"], k)
    print(
        f"{args.out}: {len(played['actions'])} steps of track {args.episode}, "
        f"real return {played['rewards'].sum():.1f}"
    )
    return 0


if __name__ == "__main__":
    run_script(main)
