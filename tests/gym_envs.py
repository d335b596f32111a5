"""Small Gymnasium environments for the gym suite's tests (`--task gym_gym_envs:<Class>`, with this folder on the
path of the process that makes them). No rendering library: frames are drawn with numpy. Importing the module
registers `Count-v0` (a registered id, `gym_gym_envs:Count-v0`, made from the class Counter)."""

import gymnasium
import numpy as np
from gymnasium import spaces


class Counter(gymnasium.Env):
  """Discrete(3, start=2) actions; the frame's pixels are 40 x the last action taken (0 after a reset), so a test
  can read the action the env received from the image. Terminates after 5 steps with action 4, reward = action."""

  metadata = {'render_modes': ['rgb_array'], 'render_fps': 30}

  def __init__(self, render_mode=None):
    self.render_mode = render_mode
    self.action_space = spaces.Discrete(3, start=2)
    self.observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
    self._last = 0
    self._fours = 0

  def reset(self, seed=None, options=None):
    super().reset(seed=seed)
    self._last, self._fours = 0, 0
    return np.zeros(1, np.float32), {}

  def step(self, action):
    assert self.action_space.contains(action), action
    self._last = int(action)
    self._fours += int(action == 4)
    return np.zeros(1, np.float32), float(action), self._fours >= 5, False, {}

  def render(self):
    return np.full((64, 64, 3), 40 * self._last, np.uint8)


class _Frames(gymnasium.Env):
  metadata = {'render_modes': ['rgb_array'], 'render_fps': 30}
  observation_space = spaces.Box(0, 1, (1,), np.float32)

  def __init__(self, render_mode=None):
    self.render_mode = render_mode

  def reset(self, seed=None, options=None):
    super().reset(seed=seed)
    return np.zeros(1, np.float32), {}

  def step(self, action):
    return np.zeros(1, np.float32), 0.0, False, False, {}

  def render(self):
    return np.zeros((64, 64, 3), np.uint8)


class MultiDiscreteActions(_Frames):
  action_space = spaces.MultiDiscrete([2, 3])


class DictActions(_Frames):
  action_space = spaces.Dict({'move': spaces.Box(-1, 1, (2,), np.float32), 'fire': spaces.Discrete(2)})


class NoFrames(_Frames):
  """Renders only for a human: no rgb_array frames to learn from."""
  metadata = {'render_modes': ['human'], 'render_fps': 30}
  action_space = spaces.Box(-1, 1, (2,), np.float32)


gymnasium.register(id='Count-v0', entry_point='gym_envs:Counter', max_episode_steps=40)
