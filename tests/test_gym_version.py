"""Outside the gymnasium versions the fast renderer was verified against, make_env warns once
and builds gymnasium's own CarRacing, which then plays like the fast env would have.

The installed gymnasium is inside the range (1.0-1.4); its version string is replaced here,
the way an upgrade would change it.
"""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.envs.box2d.car_racing import CarRacing

import envs.fast_carracing as fc
from envs.carracing import ActionRepeat, make_env
from envs.fast_carracing import FastCarRacing


@pytest.mark.parametrize("version", ["1.5.0", "0.29.1"])
def test_unverified_gymnasium_warns_once_and_uses_gymnasiums_env(monkeypatch, version):
    assert isinstance(make_env().unwrapped, FastCarRacing)  # the installed, verified version
    monkeypatch.setattr(gymnasium, "__version__", version)
    monkeypatch.setattr(fc, "_warned_unsupported", False)  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        envs = [make_env(), make_env(action_repeat=4), make_env(fast=True, action_repeat=2)]
    assert [type(env.unwrapped) for env in envs] == [CarRacing] * 3
    assert isinstance(envs[1], ActionRepeat) and envs[1].action_repeat == 4
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages  # once per process, however many envs
    assert version in messages[0] and "upstream" in messages[0]

    # gymnasium's env plays the same steps the fast one gives inside the range
    monkeypatch.setattr(gymnasium, "__version__", "1.4.0")
    fast = make_env(action_repeat=4)
    assert isinstance(fast.unwrapped, FastCarRacing)
    actions = np.random.default_rng(0).uniform([-1, 0, 0], [1, 1, 1], (12, 3)).astype(np.float32)
    for env in (envs[1], fast):
        env.reset(seed=7)
    for action in actions:
        slow_step, fast_step = envs[1].step(action), fast.step(action)
        assert np.array_equal(slow_step[0], fast_step[0]) and slow_step[1:4] == fast_step[1:4]
    for env in (*envs, fast):
        env.close()
