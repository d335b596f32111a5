"""Environments and their wrappers. This module never imports TensorFlow.

With Mesa's EGL a MuJoCo render crashes in a process that has imported TF, so the agent runs every environment in
a worker process started as its own program (`python wrappers.py --worker FD`, see `Async`), which imports only this
module. Each wrapper owns one concern and works with the old-style gym API the reference used:
`reset() -> obs`, `step(action) -> (obs, reward, done, info)`.
"""

import functools
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection

import numpy as np
from gymnasium import spaces

if 'MUJOCO_GL' not in os.environ:  # Only when the user has not chosen a GL backend.
  os.environ['MUJOCO_GL'] = 'egl'
os.environ.setdefault('PYGAME_HIDE_SUPPORT_PROMPT', '1')  # No pygame banner from every classic-control worker.

SUITES = ('dmc', 'atari', 'gym')


class TaskError(ValueError):
  """A task name the user gave that does not exist. The message lists what does."""


def dmc_domain(domain):
  return 'ball_in_cup' if domain == 'cup' else domain  # Only domain with multiple words.


def check_dmc_task(name):
  """Raises TaskError naming the valid domains or the domain's tasks."""
  from dm_control import suite
  domain, _, task = name.partition('_')
  domain = dmc_domain(domain)
  tasks = {}
  for d, t in suite.ALL_TASKS:
    tasks.setdefault(d, []).append(t)
  if domain not in tasks:
    names = ', '.join(sorted('cup' if d == 'ball_in_cup' else d for d in tasks))
    raise TaskError(f"Unknown dmc domain '{domain}' in task 'dmc_{name}'. Domains: {names}.")
  if task not in tasks[domain]:
    short = 'cup' if domain == 'ball_in_cup' else domain
    raise TaskError(
        f"Unknown task '{task}' for dmc domain '{domain}'. Tasks: "
        + ', '.join(f'dmc_{short}_{t}' for t in sorted(tasks[domain])) + '.')


class DeepMindControl:

  def __init__(self, name, size=(64, 64), camera=None, seed=None, action_repeat=1):
    from dm_control import suite
    self._action_repeat = action_repeat
    check_dmc_task(name)
    domain, task = name.split('_', 1)
    domain = dmc_domain(domain)
    self._env = suite.load(domain, task, task_kwargs={'random': seed})
    self._size = tuple(size)
    self._camera = dict(quadruped=2).get(domain, 0) if camera is None else camera
    self._view = None  # (physics, model, contexts, dm_control Camera), made by the first render; see render().

  @property
  def observation_space(self):
    obs = {k: spaces.Box(-np.inf, np.inf, v.shape, dtype=np.float32)
           for k, v in self._env.observation_spec().items()}
    obs['image'] = spaces.Box(0, 255, self._size + (3,), dtype=np.uint8)
    return spaces.Dict(obs)

  @property
  def action_space(self):
    spec = self._env.action_spec()
    return spaces.Box(spec.minimum.astype(np.float32), spec.maximum.astype(np.float32), dtype=np.float32)

  def step(self, action):
    """Steps the physics `action_repeat` times (fewer if the episode ends), summing rewards, and renders once.

    The same as ActionRepeat around a single-step env, minus the renders whose images ActionRepeat discards.
    """
    reward = 0
    for _ in range(self._action_repeat):
      time_step = self._env.step(action)
      reward += time_step.reward or 0
      if time_step.last():
        break
    obs = dict(time_step.observation)
    obs['image'] = self.render()
    done = time_step.last()
    info = {'discount': np.array(time_step.discount, np.float32)}
    return obs, reward, done, info

  def reset(self):
    time_step = self._env.reset()
    obs = dict(time_step.observation)
    obs['image'] = self.render()
    return obs

  def render(self, *args, **kwargs):
    """The image of `physics.render(height, width, camera_id=camera)`, pixel for pixel, about 4 ms sooner.

    `physics.render` builds and frees a Camera each call (with a scene for 1000 geoms: about 2 ms with llvmpipe);
    this keeps one per physics, model and rendering context, so it is rebuilt if dm_control reloads the physics.
    The camera returns a view of its own buffer, which the next render overwrites, hence the copy.
    """
    if kwargs.get('mode', 'rgb_array') != 'rgb_array':
      raise ValueError("Only render mode 'rgb_array' is supported.")
    physics = self._env.physics
    view = self._view
    # Reading `physics.contexts` makes the GL context if there is none, so it comes last: a new model first gets its
    # smaller offscreen buffer in _make_view.
    if view is None or view[0] is not physics or view[1] is not physics.model or view[2] is not physics.contexts:
      self._view = view = self._make_view(physics)
    return view[3].render().copy()

  def _make_view(self, physics):
    from dm_control.mujoco import engine
    self._free_view()
    height, width = self._size
    visual = physics.model.vis.global_
    if height <= visual.offheight and width <= visual.offwidth:
      # mjr_render clears the stencil of the whole offscreen buffer (640x480, 4x multisampled) every frame, not just
      # the viewport, and Mesa's llvmpipe clears stencil-only pixel by pixel (about 2 ms). The image is drawn in the
      # buffer's bottom-left corner and is the same in a buffer of its own size. Takes effect when the GL context
      # is made, which `physics.contexts` below does for a new or reloaded model. Larger renders of this physics
      # would then raise dm_control's framebuffer-size ValueError; this wrapper makes none.
      visual.offheight, visual.offwidth = height, width
    contexts = physics.contexts
    return physics, physics.model, contexts, engine.Camera(physics, height, width, self._camera)

  def _free_view(self):
    if self._view is not None:
      self._view[3].scene.free()
      self._view = None

  def close(self):
    self._free_view()
    self._env.close()


def atari_games():
  """The game names ale-py ships ROMs for (task `atari_<game>`)."""
  from ale_py import roms
  return sorted(roms.get_all_rom_ids())


def check_atari_game(name):
  """Raises TaskError naming close matches and the available games."""
  import difflib
  games = atari_games()
  if name in games:
    return
  close = difflib.get_close_matches(name, games, n=3)
  hint = f" Did you mean: {', '.join(f'atari_{g}' for g in close)}?" if close else ''
  raise TaskError(f"Unknown Atari game '{name}' in task 'atari_{name}'.{hint} "
                  f"Games ({len(games)}): {', '.join(games)}.")


def resize(image, size):
  """A uint8 image [H, W(, C)] resized bilinearly to `size` (height, width) with PIL (Atari's and Gymnasium's
  frames)."""
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR), np.uint8)  # PIL: (w, h).


class Atari:
  """An Atari game on `ale_py.ALEInterface` with the reference's preprocessing.

  Sticky actions (repeat probability 0.25) live in ALE; the wrapper repeats each action `action_repeat` frames,
  returns the element-wise max of the last two frames resized to `size`, starts every episode with 1..noops
  no-ops, and (with `life_done`) ends the episode on a lost life. Terminals (game over or lost life) carry
  `info['discount'] = 0`; otherwise info has no discount, so TimeLimit marks its cut with discount 1.
  """

  def __init__(self, name, action_repeat=4, size=(64, 64), grayscale=False, noops=30, life_done=True,
               sticky_actions=True, seed=None):
    import ale_py
    check_atari_game(name)
    path = ale_py.roms.get_rom_path(name)
    if path is None:
      raise TaskError(f"ale-py has no ROM file for Atari game '{name}'.")
    if action_repeat < 1 or noops < 0:
      raise ValueError(f'Need action_repeat >= 1 and noops >= 0, got {action_repeat} and {noops}.')
    self._random = np.random.RandomState(seed)
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # No banner in every worker.
    self._ale = ale_py.ALEInterface()
    self._ale.setInt('random_seed', int(self._random.randint(0, 2 ** 31 - 1)))
    self._ale.setFloat('repeat_action_probability', 0.25 if sticky_actions else 0.0)
    self._ale.setInt('frame_skip', 1)  # The wrapper repeats actions itself, to max-pool the last two frames.
    self._ale.loadROM(str(path))
    self._noop = ale_py.Action.NOOP
    self._actions = list(self._ale.getMinimalActionSet())
    self._action_repeat = action_repeat
    self._size = tuple(size)
    self._grayscale = grayscale
    self._noops = noops
    self._life_done = life_done
    self._lives = None
    self._frames = []  # The last (up to) two raw screens, oldest first.
    self.last_noops = None  # How many no-ops the last reset took (for inspection).

  @property
  def observation_space(self):
    shape = self._size + (1 if self._grayscale else 3,)
    return spaces.Dict({'image': spaces.Box(0, 255, shape, dtype=np.uint8)})

  @property
  def action_space(self):
    return spaces.Discrete(len(self._actions))

  @property
  def ale(self):
    return self._ale

  @property
  def lives(self):
    """The game's lives counter (readable through the worker, for inspection)."""
    return self._ale.lives()

  def reset(self):
    self._ale.reset_game()
    self._frames = []
    self._record()
    noops = self._random.randint(1, self._noops + 1) if self._noops else 0
    for _ in range(noops):
      self._ale.act(self._noop)
      if self._ale.game_over():
        self._ale.reset_game()
        self._frames = []
      self._record()
    self.last_noops = noops
    self._lives = self._ale.lives()
    return self._obs()

  def step(self, action):
    if self._lives is None:
      raise RuntimeError('Must reset environment before stepping it.')
    index = int(action)
    if not 0 <= index < len(self._actions):
      raise ValueError(f'Invalid action index {action}; expected 0..{len(self._actions) - 1}.')
    total_reward, terminal = 0.0, False
    for _ in range(self._action_repeat):
      total_reward += self._ale.act(self._actions[index])
      self._record()
      lives = self._ale.lives()
      terminal = self._ale.game_over() or (self._life_done and lives < self._lives)
      self._lives = lives
      if terminal:
        break
    info = {'discount': np.array(0.0, np.float32)} if terminal else {}
    return self._obs(), total_reward, terminal, info

  def render(self, *args, **kwargs):
    if kwargs.get('mode', 'rgb_array') != 'rgb_array':
      raise ValueError("Only render mode 'rgb_array' is supported.")
    return self._ale.getScreenRGB()

  def close(self):
    self._ale = None

  def _record(self):
    screen = self._ale.getScreenGrayscale() if self._grayscale else self._ale.getScreenRGB()
    self._frames = self._frames[-1:] + [screen]

  def _obs(self):
    image = self._frames[-1] if len(self._frames) == 1 else np.maximum(*self._frames)
    image = resize(image, self._size)
    return {'image': image[:, :, None] if self._grayscale else image}


# Gymnasium ----------------------------------------------------------------------------------------------------------

GYM_EXTRAS = ('classic control (CartPole, Pendulum, ...) needs `pip install "gymnasium[classic-control]"` '
              '(pygame); Box2D (LunarLander, CarRacing, ...) `pip install swig "gymnasium[box2d]"`; MuJoCo '
              '(HalfCheetah, Hopper, ...) and Atari (ALE/...) come with this port\'s requirements')


def _gym_make(name, **kwargs):
  """gymnasium.make for a task's id: a registered `Id`, `module:Id` (gymnasium imports the module, which registers
  Id), `module:Class` (an entry point: the class is made directly), or `ALE/<Game>-v5` (ale-py's own registration).
  Raises TaskError naming the id and what exists."""
  import gymnasium
  import importlib
  if name.startswith('ALE/'):
    import ale_py
    gymnasium.register_envs(ale_py)
  try:
    return gymnasium.make(name, **kwargs)
  except gymnasium.error.UnregisteredEnv as e:
    module, _, attr = name.rpartition(':')
    if module and hasattr(importlib.import_module(module), attr):  # An entry point rather than a registered id.
      return gymnasium.make(gymnasium.envs.registration.EnvSpec(id=attr, entry_point=name), **kwargs)
    import difflib
    ids = sorted(gymnasium.registry)
    close = difflib.get_close_matches(name, ids, n=3)
    hint = f" Did you mean: {', '.join(f'gym_{i}' for i in close)}?" if close else ''
    raise TaskError(f"Unknown Gymnasium id '{name}' in task 'gym_{name}' ({e}).{hint} Registered ids "
                    f"({len(ids)}): {', '.join(ids)}. A custom environment: register it with gymnasium.register in "
                    f"a module and pass gym_<module>:<Id>, or pass its entry point gym_<module>:<Class>.") from None
  except ImportError as e:
    raise TaskError(f"Task 'gym_{name}': cannot import what it names ({e}). {GYM_EXTRAS}.") from None
  except gymnasium.error.DependencyNotInstalled as e:
    raise TaskError(f"Task 'gym_{name}' needs a package that is not installed: {e}. {GYM_EXTRAS}.") from None


def _mujoco_warnings_to_stderr():
  """MuJoCo's warnings (e.g. the deprecated `settotalmass` of Gymnasium's MuJoCo models) go to stderr, once each,
  instead of MuJoCo's default of stdout plus a MUJOCO_LOG.TXT file in the working directory."""
  import mujoco
  seen = set()

  def warn(message):
    if message not in seen:
      seen.add(message)
      print(f'MuJoCo warning: {message}', file=sys.stderr)

  mujoco.set_mju_user_warning(warn)


def _has_tracking_camera(env):
  """Whether a Gymnasium env is a MuJoCo one whose model has a camera named `track`."""
  model = getattr(env.unwrapped, 'model', None)
  if model is None or not hasattr(env.unwrapped, 'mujoco_renderer'):
    return False
  import mujoco
  return mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, 'track') >= 0


class Gym:
  """A Gymnasium environment seen through its rendered frames: `gymnasium.make(id, render_mode='rgb_array')`.

  The observation is the image alone (`{'image': uint8 [H, W, 3]}`, the env's frame resized to `size` with PIL where
  the env cannot render at that size; MuJoCo models with a `track` camera render from it); the env's own observation
  (a proprioceptive vector) stays out of the model, as for DMC. Box actions (1-D) and Discrete ones (offset by the
  space's `start`) pass through; the stack normalizes or one-hot encodes them. The first reset seeds the env
  (`reset(seed=seed)`), later resets continue its random stream. Each action is repeated `action_repeat` times
  (rewards summed, stopping at the episode's end) and one frame is rendered per agent step. A termination carries
  `info['discount'] = 0`, a truncation (the env's own time limit, set to `time_limit` env steps when given)
  `info['discount'] = 1`.
  """

  def __init__(self, name, size=(64, 64), action_repeat=1, seed=None, time_limit=None):
    _mujoco_warnings_to_stderr()
    self._name = name
    self._size = tuple(size)
    self._action_repeat = action_repeat
    self._seed = seed
    limit = {} if time_limit is None else dict(max_episode_steps=int(time_limit))
    try:  # MuJoCo's Gymnasium envs render at any size; most others (classic control) at their own.
      size = dict(width=self._size[1], height=self._size[0])
      self._env = _gym_make(name, render_mode='rgb_array', **size, **limit)
    except TypeError:
      size = {}
      self._env = _gym_make(name, render_mode='rgb_array', **limit)
    self.camera = None  # The env's own default view.
    if _has_tracking_camera(self._env):
      # The default view of MuJoCo's locomotion tasks (HalfCheetah, Ant, Swimmer, ...) stays where the body started,
      # which soon runs out of the picture; their models' `track` camera follows it, as DMC's cameras do.
      self._env.close()
      self._env = _gym_make(name, render_mode='rgb_array', camera_name='track', **size, **limit)
      self.camera = 'track'
    modes = self._env.metadata.get('render_modes', [])
    if 'rgb_array' not in modes:
      self._env.close()
      raise TaskError(f"Gymnasium env '{name}' cannot render rgb_array frames (its render modes: "
                      f"{', '.join(modes) or 'none'}); Dreamer learns from images, so it needs one that can.")
    space = self._env.action_space
    if isinstance(space, spaces.Discrete):
      self._start = int(space.start)
      self._action_space = spaces.Discrete(int(space.n))
    elif (isinstance(space, spaces.Box) and len(space.shape) == 1
          and np.issubdtype(space.dtype, np.floating)):
      self._start = None
      self._action_space = spaces.Box(space.low, space.high, dtype=np.float32)
    else:
      self._env.close()
      raise TaskError(f"Gymnasium env '{name}' has the action space {space}, which the agent cannot use: allowed "
                      'are Box (a float vector) and Discrete.')
    self._first = True
    self._done = True

  @property
  def observation_space(self):
    return spaces.Dict({'image': spaces.Box(0, 255, self._size + (3,), dtype=np.uint8)})

  @property
  def action_space(self):
    return self._action_space

  @property
  def max_episode_steps(self):
    """The env's own time limit in env steps (None without one)."""
    spec = self._env.spec
    return spec.max_episode_steps if spec is not None else None

  def reset(self):
    seed, self._first = (self._seed if self._first else None), False
    self._env.reset(seed=None if seed is None else int(seed))
    self._done = False
    return self._obs()

  def step(self, action):
    if self._done:
      raise RuntimeError('Must reset environment before stepping it.')
    if self._start is not None:
      action = int(action) + self._start
    total_reward, terminated, truncated = 0.0, False, False
    for _ in range(self._action_repeat):
      _, reward, terminated, truncated, _ = self._env.step(action)
      total_reward += float(reward)
      if terminated or truncated:
        break
    self._done = terminated or truncated
    info = {'discount': np.array(0.0 if terminated else 1.0, np.float32)} if self._done else {}
    return self._obs(), total_reward, self._done, info

  def render(self, *args, **kwargs):
    if kwargs.get('mode', 'rgb_array') != 'rgb_array':
      raise ValueError("Only render mode 'rgb_array' is supported.")
    return self._obs()['image']

  def close(self):
    self._env.close()

  def _obs(self):
    frame = self._env.render()
    if frame is None:
      raise TaskError(f"Gymnasium env '{self._name}' returned no frame from render() in rgb_array mode.")
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
      raise TaskError(f"Gymnasium env '{self._name}' renders frames of shape {frame.shape}; need [H, W, 3].")
    frame = frame.astype(np.uint8)
    return {'image': frame if frame.shape[:2] == self._size else resize(frame, self._size)}


@functools.cache  # Once per process: the flags ask twice (their defaults and their check).
def describe_gym(name):
  """What the flags need to know of a Gymnasium task before training: its action kind and the env's own time limit.
  Made in a TF-free process of its own (`python wrappers.py --describe ID`: an env may render when it is made),
  which makes the env, resets and renders it once: a bad id, a missing package or a frame it cannot render stops
  here with TaskError. Returns dict(kind='discrete'|'continuous', max_episode_steps=int or None)."""
  import json
  result = subprocess.run([sys.executable, os.path.abspath(__file__), '--describe', name],
                          capture_output=True, text=True, timeout=300)
  lines = result.stdout.strip().splitlines()
  try:
    reply = json.loads(lines[-1])
  except (IndexError, ValueError):
    raise TaskError(f"Task 'gym_{name}': making the environment failed (exit code {result.returncode}):\n"
                    f"{result.stderr[-3000:]}") from None
  if 'error' in reply:
    raise TaskError(reply['error'])
  return reply


def _describe(name):
  import json
  try:
    env = Gym(name)
    env.reset()
    kind = 'discrete' if isinstance(env.action_space, spaces.Discrete) else 'continuous'
    reply = dict(kind=kind, max_episode_steps=env.max_episode_steps)
    env.close()
  except TaskError as e:
    reply = dict(error=str(e))
  except Exception as e:  # The env's own code failed: a TaskError for the user, with what it raised.
    reply = dict(error=f"Task 'gym_{name}': making, resetting or rendering the environment raised "
                       f"{type(e).__name__}: {e}")
  print(json.dumps(reply), flush=True)


class Wrapper:
  """Forwards everything it does not override to the wrapped env."""

  def __init__(self, env):
    self._env = env

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return getattr(self._env, name)

  def step(self, action):
    return self._env.step(action)

  def reset(self):
    return self._env.reset()


class NormalizeActions(Wrapper):
  """The agent acts in [-1, 1] wherever the env's bounds are finite."""

  def __init__(self, env):
    super().__init__(env)
    space = env.action_space
    self._mask = np.logical_and(np.isfinite(space.low), np.isfinite(space.high))
    self._low = np.where(self._mask, space.low, -1)
    self._high = np.where(self._mask, space.high, 1)

  @property
  def action_space(self):
    low = np.where(self._mask, -np.ones_like(self._low), self._low)
    high = np.where(self._mask, np.ones_like(self._low), self._high)
    return spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)

  def step(self, action):
    original = (action + 1) / 2 * (self._high - self._low) + self._low
    original = np.where(self._mask, original, action)
    return self._env.step(original)


class OneHotBox(spaces.Box):
  """Box(0, 1, (n,)) whose `sample()` draws a one-hot float32 vector from the space's own seeded generator.

  A module-level class (not a patched bound method) so it pickles from the worker to the parent process;
  `seed()` reseeds it like any gymnasium space.
  """

  def __init__(self, n, seed=None):
    super().__init__(0.0, 1.0, (int(n),), dtype=np.float32, seed=seed)

  def sample(self, mask=None, probability=None):
    if mask is not None or probability is not None:
      raise NotImplementedError('OneHotBox.sample takes no mask or probability.')
    action = np.zeros(self.shape, np.float32)
    action[self.np_random.integers(self.shape[0])] = 1.0
    return action

  def contains(self, x):
    x = np.asarray(x)
    return x.shape == self.shape and bool(np.all((x == 0) | (x == 1))) and int(np.sum(x == 1)) == 1

  def __repr__(self):
    return f'OneHotBox({self.shape[0]})'


class OneHotAction(Wrapper):
  """The agent acts with one-hot vectors; the wrapped env receives the index."""

  def __init__(self, env, seed=None):
    super().__init__(env)
    space = env.action_space
    if not isinstance(space, spaces.Discrete):
      raise TypeError(f'OneHotAction needs a Discrete action space, got {space}.')
    if int(space.start) != 0:
      raise TypeError(f'OneHotAction needs a Discrete space starting at 0, got start {space.start}.')
    self._n = int(space.n)
    self._space = OneHotBox(self._n, seed)

  @property
  def action_space(self):
    return self._space

  def step(self, action):
    array = np.asarray(action)
    valid = array.shape == (self._n,) and np.issubdtype(array.dtype, np.number)
    if valid:
      index = int(np.argmax(array))
      reference = np.zeros(self._n, np.float32)
      reference[index] = 1
      valid = np.allclose(reference, array.astype(np.float32))
    if not valid:
      text = np.array2string(array, max_line_width=10 ** 6, precision=4, separator=', ').replace('\n', '')
      raise ValueError(f'Invalid one-hot action: {text} (shape {array.shape}, dtype {array.dtype}); '
                       f'expected a one-hot vector of length {self._n}.')
    return self._env.step(index)


class TimeLimit(Wrapper):
  """Ends the episode after `duration` steps; the cut is not terminal (discount 1 unless the env gave one)."""

  def __init__(self, env, duration):
    super().__init__(env)
    self._duration = duration
    self._step = None

  def step(self, action):
    if self._step is None:
      raise RuntimeError('Must reset environment before stepping it.')
    obs, reward, done, info = self._env.step(action)
    self._step += 1
    if self._step >= self._duration:
      done = True
      if 'discount' not in info:
        info['discount'] = np.array(1.0).astype(np.float32)
      self._step = None
    return obs, reward, done, info

  def reset(self):
    self._step = 0
    return self._env.reset()


class Collect(Wrapper):
  """Records the episode; when it ends, returns it in `info['episode']`, each value an array of the dtype the
  environment gave (the main process chooses the on-disk dtypes where it saves episodes: tools.stored)."""

  def __init__(self, env):
    super().__init__(env)
    self._episode = None

  def step(self, action):
    obs, reward, done, info = self._env.step(action)
    transition = obs.copy()
    transition['action'] = action
    transition['reward'] = reward
    transition['discount'] = info.get('discount', np.array(1 - float(done)))
    self._episode.append(transition)
    if done:
      info['episode'] = {k: np.array([t[k] for t in self._episode]) for k in self._episode[0]}
    return obs, reward, done, info

  def reset(self):
    obs = self._env.reset()
    transition = obs.copy()
    transition['action'] = np.zeros(self._env.action_space.shape)
    transition['reward'] = 0.0
    transition['discount'] = 1.0
    self._episode = [transition]
    return obs


class RewardObs(Wrapper):

  @property
  def observation_space(self):
    obs = dict(self._env.observation_space.spaces)
    assert 'reward' not in obs
    obs['reward'] = spaces.Box(-np.inf, np.inf, (), dtype=np.float32)
    return spaces.Dict(obs)

  def step(self, action):
    obs, reward, done, info = self._env.step(action)
    obs['reward'] = reward
    return obs, reward, done, info

  def reset(self):
    obs = self._env.reset()
    obs['reward'] = 0.0
    return obs


def make_env(task, action_repeat=2, time_limit=1000, seed=None, size=(64, 64), life_done=True):
  """The reference's wrapper stack for a task name `<suite>_<task>` (runs inside the worker). `life_done`: a lost
  life ends the episode (Atari only)."""
  suite, _, name = task.partition('_')
  if suite == 'dmc':
    env = DeepMindControl(name, size, seed=seed, action_repeat=action_repeat)  # Renders once per agent step.
    env = NormalizeActions(env)
  elif suite == 'atari':
    env = Atari(name, action_repeat, size, grayscale=False, life_done=life_done, sticky_actions=True, seed=seed)
    env = OneHotAction(env, seed=seed)
  elif suite == 'gym':  # Its settings (flags.py) follow the action space, as Atari's do.
    env = Gym(name, size, action_repeat, seed=seed, time_limit=time_limit)
    env = OneHotAction(env, seed=seed) if isinstance(env.action_space, spaces.Discrete) else NormalizeActions(env)
  else:
    raise TaskError(f"Unknown suite '{suite}' in task '{task}'. Suites: {', '.join(SUITES)} "
                    "(e.g. dmc_walker_walk, atari_pong, gym_HalfCheetah-v5).")
  env = TimeLimit(env, time_limit / action_repeat)
  env = Collect(env)
  env = RewardObs(env)
  return env


# Worker processes ---------------------------------------------------------------------------------------------------

class WorkerError(RuntimeError):
  """An environment worker crashed, hung, or raised."""


_clock = time.monotonic  # Read through the module, so that a test can stop this process's clock.


class Async:
  """An environment in its own TF-free process, reached over a socket pair.

  `strategy` keeps the reference's flag: 'process' and 'thread' step all envs concurrently (non-blocking calls that
  `simulate` collects), 'none' steps one after another. The env itself always lives in a worker process, because
  rendering next to TF crashes with Mesa GL. Every reply is awaited with a timeout, and a dead worker is reported
  with the env's name and the call it was serving.
  """

  def __init__(self, name, kwargs, strategy='process', timeout=120.0):
    if strategy not in ('none', 'thread', 'process'):
      raise ValueError(f"Unknown parallel strategy '{strategy}'. Choose none, thread or process.")
    self._name = name
    self._strategy = strategy
    self._timeout = timeout
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env.pop('TF_CONFIG', None)
    self._process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--worker', str(theirs.fileno())],
        pass_fds=(theirs.fileno(),), env=env, close_fds=True)
    theirs.close()
    self._conn = Connection(ours.detach())
    self._closed = False
    self._obs_space = None
    self._action_space = None
    try:
      self._send(('make', kwargs), 'creating the environment')
      self._receive('creating the environment', max(timeout, 120.0))
    except BaseException:
      self.close()
      raise

  @property
  def observation_space(self):
    if self._obs_space is None:
      self._obs_space = self.call('__getattr__', 'observation_space')
    return self._obs_space

  @property
  def action_space(self):
    if self._action_space is None:
      self._action_space = self.call('__getattr__', 'action_space')
    return self._action_space

  def call(self, name, *args, blocking=True):
    if not blocking and self._strategy == 'none':
      return lambda: self.call(name, *args)  # Sent only when the promise is called: one env after another.
    what = f'{name}()' if name != '__getattr__' else f'reading {args[0]}'
    self._send(('call', (name, args)), what)
    promise = lambda: self._receive(what, self._timeout)
    return promise() if blocking else promise

  def step(self, action, blocking=True):
    return self.call('step', action, blocking=blocking)

  def reset(self, blocking=True):
    return self.call('reset', blocking=blocking)

  def close(self):
    if self._closed:
      return
    self._closed = True
    try:
      self._conn.send(('close', None))
      self._conn.close()
    except OSError:
      pass
    try:
      self._process.wait(10)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()

  def _send(self, message, what):
    try:
      self._conn.send(message)
    except OSError as e:
      raise WorkerError(self._died(what, e)) from None

  def _receive(self, what, timeout):
    """The worker's reply, waited for up to `timeout` seconds of this process's own time: a wait of 0.5 s that took
    much longer means this process was stopped meanwhile (SIGSTOP to pause a run, a suspended machine), most likely
    with its workers, and that pause is not charged to the worker."""
    waited, last = 0.0, _clock()
    while not self._conn.poll(0.5):
      if self._process.poll() is not None:
        raise WorkerError(self._died(what))
      now = _clock()
      waited, last = waited + min(now - last, 1.0), now
      if waited > timeout:
        self._process.kill()
        raise WorkerError(
            f"Environment worker '{self._name}' (pid {self._process.pid}) did not answer within {timeout:.0f} s "
            f"while {what}; it was killed.")
    try:
      kind, payload = self._conn.recv()
    except (EOFError, OSError) as e:
      raise WorkerError(self._died(what, e)) from None
    if kind == 'result':
      return payload
    error, message, stack = payload
    if error == 'TaskError':
      raise TaskError(message)
    raise WorkerError(f"Environment worker '{self._name}' raised while {what}:\n{stack}")

  def _died(self, what, error=None):
    code = self._process.poll()
    status = f'exit code {code}' if code is not None else str(error)
    return (f"Environment worker '{self._name}' (pid {self._process.pid}) died while {what} ({status}). "
            'If it crashed in rendering, check MUJOCO_GL (egl on a headless machine).')

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass


def _worker(fd):
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the agent's to handle; it closes the workers.
  conn = Connection(fd)
  env = None
  while True:
    try:
      message, payload = conn.recv()
    except (EOFError, OSError, KeyboardInterrupt):
      break
    if message == 'close':
      break
    try:
      if message == 'make':
        env = make_env(**payload)
        result = None
      elif message == 'call':
        name, args = payload
        result = getattr(env, args[0]) if name == '__getattr__' else getattr(env, name)(*args)
      else:
        raise KeyError(f'Unknown message {message}')
      reply = ('result', result)
    except Exception as e:
      reply = ('error', (type(e).__name__, str(e), ''.join(traceback.format_exc())))
    try:
      conn.send(reply)
    except OSError:
      break  # The agent closed its end (it is shutting down).
  if env is not None and hasattr(env, 'close'):
    try:
      env.close()
    except Exception:
      pass
  conn.close()


if __name__ == '__main__':
  if len(sys.argv) == 3 and sys.argv[1] == '--worker':
    # Serve from this file imported under its module name, not from `__main__`: objects of classes defined here
    # (e.g. OneHotBox, read by the parent as `action_space`) then pickle as `wrappers.<Class>`, which the parent can
    # load. The script's directory is sys.path[0], so this imports this very file.
    import wrappers
    wrappers._worker(int(sys.argv[2]))
  elif len(sys.argv) == 3 and sys.argv[1] == '--describe':
    import wrappers
    wrappers._describe(sys.argv[2])
  else:
    sys.exit('usage: python wrappers.py --worker FD | --describe GYM_ID (started by the agent, not by hand)')
