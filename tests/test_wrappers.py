"""Tests for the environment layer (wrappers.py).

A MuJoCo render next to TensorFlow crashes with Mesa's EGL, and pytest imports TF through other test modules, so this
file never renders in the pytest process: real dm_control environments only run inside `wrappers.Async` workers, and
the wrapper tests in this process use a pure-python fake env.
"""

import os
import signal
import sys
import threading
import time


import numpy as np
import pytest
from gymnasium import spaces

import tools
import wrappers

WALKER = dict(task='dmc_walker_walk', action_repeat=2, time_limit=20, seed=0)
WALKER_PROPRIO = ('orientations', 'height', 'velocity')
START_TIMEOUT = 60.0  # Generous for the shared workers: only the hang test relies on a short timeout.


# Fake env -------------------------------------------------------------------------------------------------------------

class FakeEnv:
  """No rendering. The reward of inner step k is k; observations carry k so tests can tell steps apart."""

  def __init__(self, low=(-1.0, -1.0), high=(1.0, 1.0), done_at=None, discount=None):
    self.action_space = spaces.Box(np.array(low, np.float32), np.array(high, np.float32), dtype=np.float32)
    self.observation_space = spaces.Dict({
        'image': spaces.Box(0, 255, (4, 4, 3), dtype=np.uint8),
        'vector': spaces.Box(-np.inf, np.inf, (3,), dtype=np.float64),
    })
    self.done_at = done_at
    self.discount = discount
    self.received = []  # Every action the env was stepped with.
    self.steps = 0

  def _obs(self):
    return {'image': np.full((4, 4, 3), self.steps, np.uint8),
            'vector': np.full(3, self.steps + 0.5, np.float64)}

  def reset(self):
    self.steps = 0
    return self._obs()

  def step(self, action):
    self.received.append(np.array(action, copy=True))
    self.steps += 1
    done = self.done_at is not None and self.steps >= self.done_at
    info = {} if self.discount is None else {'discount': np.float32(self.discount)}
    return self._obs(), float(self.steps), done, info


# ActionRepeat ---------------------------------------------------------------------------------------------------------


class ActionRepeat(wrappers.Wrapper):
  """The reference's action repeat as a wrapper: the oracle for DeepMindControl's own repeat (make_env uses that
  one, which renders once per agent step)."""

  def __init__(self, env, amount):
    super().__init__(env)
    self._amount = amount

  def step(self, action):
    done, total_reward, current_step = False, 0, 0
    while current_step < self._amount and not done:
      obs, reward, done, info = self._env.step(action)
      total_reward += reward
      current_step += 1
    return obs, total_reward, done, info


def test_action_repeat_sums_rewards_over_amount_inner_steps():
  inner = FakeEnv()
  env = ActionRepeat(inner, 3)
  env.reset()
  action = np.array([0.25, -0.5], np.float32)
  obs, reward, done, _ = env.step(action)
  assert inner.steps == 3
  assert reward == 1 + 2 + 3
  assert not done
  assert obs['vector'][0] == 3.5  # The last inner observation.
  for received in inner.received:
    np.testing.assert_array_equal(received, action)
  _, reward, _, _ = env.step(action)
  assert inner.steps == 6
  assert reward == 4 + 5 + 6


def test_action_repeat_stops_early_at_done():
  inner = FakeEnv(done_at=5)
  env = ActionRepeat(inner, 3)
  env.reset()
  _, reward, done, _ = env.step(np.zeros(2, np.float32))
  assert (inner.steps, reward, done) == (3, 6, False)
  obs, reward, done, _ = env.step(np.zeros(2, np.float32))
  assert inner.steps == 5  # Steps 4 and 5 only: no step after the env said done.
  assert reward == 4 + 5
  assert done
  assert obs['vector'][0] == 5.5


# TimeLimit ------------------------------------------------------------------------------------------------------------

def test_time_limit_ends_at_duration_with_discount_one():
  inner = FakeEnv()
  env = wrappers.TimeLimit(inner, 6 / 2)  # make_env passes time_limit / action_repeat, a float.
  env.reset()
  for _ in range(2):
    _, _, done, info = env.step(np.zeros(2, np.float32))
    assert not done
  _, _, done, info = env.step(np.zeros(2, np.float32))
  assert done
  assert inner.steps == 3
  assert info['discount'] == 1.0
  # A new episode after reset runs to the limit again.
  env.reset()
  dones = [env.step(np.zeros(2, np.float32))[2] for _ in range(3)]
  assert dones == [False, False, True]


def test_time_limit_keeps_the_envs_discount():
  env = wrappers.TimeLimit(FakeEnv(discount=0.5), 2)
  env.reset()
  env.step(np.zeros(2, np.float32))
  _, _, done, info = env.step(np.zeros(2, np.float32))
  assert done
  assert info['discount'] == pytest.approx(0.5)


def test_time_limit_raises_when_stepped_before_reset():
  inner = FakeEnv()
  env = wrappers.TimeLimit(inner, 5)
  with pytest.raises(RuntimeError, match='^Must reset environment before stepping it.$'):
    env.step(np.zeros(2, np.float32))
  assert inner.steps == 0


# NormalizeActions -----------------------------------------------------------------------------------------------------

def test_normalize_actions_maps_unit_box_to_finite_bounds():
  inner = FakeEnv(low=(-2.0, 0.0, -np.inf), high=(3.0, 10.0, np.inf))
  env = wrappers.NormalizeActions(inner)
  env.reset()
  env.step(np.array([-1.0, 1.0, 5.0], np.float32))
  env.step(np.array([1.0, -1.0, -7.0], np.float32))
  env.step(np.array([0.0, 0.5, 0.25], np.float32))
  np.testing.assert_array_equal(inner.received[0], [-2.0, 10.0, 5.0])
  np.testing.assert_array_equal(inner.received[1], [3.0, 0.0, -7.0])  # Infinite-bound dim passes unchanged.
  np.testing.assert_allclose(inner.received[2], [0.5, 7.5, 0.25], rtol=1e-6)


def test_normalize_actions_space_is_unit_box():
  env = wrappers.NormalizeActions(FakeEnv(low=(-2.0, 0.0, 5.0), high=(3.0, 10.0, 6.0)))
  space = env.action_space
  assert isinstance(space, spaces.Box)
  assert space.shape == (3,)
  np.testing.assert_array_equal(space.low, -1.0)
  np.testing.assert_array_equal(space.high, 1.0)


# Collect --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('bits, dtype', [(16, np.float16), (32, np.float32)])
def test_collect_returns_episode_at_done_and_stored_chooses_the_dtypes(bits, dtype):
  env = wrappers.Collect(FakeEnv(done_at=3))
  obs = env.reset()
  assert obs['vector'].dtype == np.float64  # As the environment gave it.
  assert obs['image'].dtype == np.uint8
  actions = [np.array([0.25, -0.5], np.float32), np.array([1.0, 0.0], np.float32), np.array([-1.0, 0.75], np.float32)]
  for index, action in enumerate(actions):
    obs, _, done, info = env.step(action)
    assert done == (index == 2)
    assert ('episode' in info) == (index == 2)
  assert obs['vector'].dtype == np.float64
  raw = info['episode']
  assert raw['vector'].dtype == raw['reward'].dtype == np.float64 and raw['image'].dtype == np.uint8
  episode = tools.stored(raw, bits)  # The dtypes the loop saves and logs.
  assert set(episode) == {'image', 'vector', 'action', 'reward', 'discount'}
  for key, value in episode.items():
    assert len(value) == 4, key  # Transitions + 1 (the reset entry).
  # Reset entry.
  np.testing.assert_array_equal(episode['action'][0], np.zeros(2))
  assert episode['reward'][0] == 0
  assert episode['discount'][0] == 1
  # Transitions.
  np.testing.assert_array_equal(episode['action'][1:], np.array(actions, dtype))
  np.testing.assert_array_equal(episode['reward'], [0, 1, 2, 3])
  np.testing.assert_array_equal(episode['discount'], [1, 1, 1, 0])  # The env gave no discount: 1 - done.
  np.testing.assert_array_equal(episode['vector'][:, 0], [0.5, 1.5, 2.5, 3.5])
  np.testing.assert_array_equal(episode['image'][:, 0, 0, 0], [0, 1, 2, 3])
  # Dtypes.
  assert episode['image'].dtype == np.uint8
  assert episode['image'].shape == (4, 4, 4, 3)
  for key in ('vector', 'action', 'reward', 'discount'):
    assert episode[key].dtype == dtype, key
  # Converted once from the environment's float64, not through float32: 1 + 2**-11 + 2**-40 rounds up to the next
  # float16, but through float32 (1 + 2**-11, a tie) to even, 1.0.
  value = 1 + 2 ** -11 + 2 ** -40
  assert tools.stored({'reward': np.array([value])}, 16)['reward'][0] == np.float16(value) > 1
  assert tools.stored({'count': np.array([3], np.int64)}, 16)['count'].dtype == np.int16


def test_collect_starts_a_fresh_episode_on_reset_and_keeps_env_discount():
  env = wrappers.Collect(FakeEnv(done_at=2, discount=0.5))
  for _ in range(2):
    env.reset()
    env.step(np.zeros(2, np.float32))
    _, _, done, info = env.step(np.ones(2, np.float32))
    assert done
    episode = info['episode']
    assert len(episode['reward']) == 3
    np.testing.assert_array_equal(episode['discount'], np.array([1.0, 0.5, 0.5], np.float32))


# RewardObs ------------------------------------------------------------------------------------------------------------

def test_reward_obs_adds_reward_to_observations():
  env = wrappers.RewardObs(FakeEnv())
  obs = env.reset()
  assert obs['reward'] == 0.0
  assert 'image' in obs and 'vector' in obs
  obs, reward, _, _ = env.step(np.zeros(2, np.float32))
  assert reward == 1.0
  assert obs['reward'] == 1.0
  obs, reward, _, _ = env.step(np.zeros(2, np.float32))
  assert obs['reward'] == reward == 2.0
  assert set(env.observation_space.spaces) == {'image', 'vector', 'reward'}


# Real dm_control through workers --------------------------------------------------------------------------------------

@pytest.fixture
def make_async(request):
  """Starts a worker that the test's teardown closes."""

  def make(name, kwargs, timeout=START_TIMEOUT):
    env = wrappers.Async(name, kwargs, 'process', timeout)
    request.addfinalizer(env.close)
    return env

  return make


@pytest.fixture(scope='module')
def walker(request):
  env = wrappers.Async('walker shared', WALKER, 'process', START_TIMEOUT)
  request.addfinalizer(env.close)
  return env


@pytest.fixture(scope='module')
def walker_trio(request):
  """Seeds 0, 0 and 1. Every test using it must make the same calls on all three (it compares them)."""
  envs = []
  for index, seed in enumerate((0, 0, 1)):
    env = wrappers.Async(f'walker trio {index}', dict(WALKER, seed=seed), 'process', START_TIMEOUT)
    request.addfinalizer(env.close)
    envs.append(env)
  return envs


def random_actions(count, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (count, 6)).astype(np.float32)


def test_dmc_action_space(walker):
  space = walker.action_space
  assert isinstance(space, spaces.Box)
  assert space.shape == (6,)
  np.testing.assert_array_equal(space.low, -1.0)
  np.testing.assert_array_equal(space.high, 1.0)


def test_dmc_reset_observation(walker):
  obs = walker.reset(blocking=True)
  assert set(obs) == set(WALKER_PROPRIO) | {'image', 'reward'}
  assert obs['image'].dtype == np.uint8
  assert obs['image'].shape == (64, 64, 3)
  assert obs['reward'] == 0
  assert obs['orientations'].shape == (14,)
  assert obs['velocity'].shape == (9,)
  for key in WALKER_PROPRIO:
    assert obs[key].dtype == np.float64, key  # As dm_control gives them: the loop chooses the stored dtype.
  obs, reward, _, _ = walker.step(np.zeros(6, np.float32), blocking=True)
  assert obs['reward'] == reward


def test_dmc_episode_ends_at_time_limit(walker):
  walker.reset(blocking=True)
  actions = random_actions(20)
  rewards = []
  for index, action in enumerate(actions):
    obs, reward, done, info = walker.step(action, blocking=True)
    rewards.append(reward)
    if done:
      break
    assert 'episode' not in info
  assert done
  assert index + 1 == 10  # time_limit 20 / action_repeat 2.
  episode = tools.stored(info['episode'], 16)  # As the loop stores it at --precision 16.
  assert set(episode) == set(WALKER_PROPRIO) | {'image', 'action', 'reward', 'discount'}
  for key, value in episode.items():
    assert len(value) == 11, key
  assert episode['discount'][-1] == 1.0  # The time limit is not terminal.
  assert episode['reward'][0] == 0
  assert episode['discount'][0] == 1
  np.testing.assert_array_equal(episode['action'][0], np.zeros(6))
  np.testing.assert_array_equal(episode['action'][1:], actions[:10].astype(np.float16))
  np.testing.assert_allclose(episode['reward'][1:].astype(np.float32), rewards, rtol=1e-2, atol=1e-3)
  assert episode['image'].dtype == np.uint8
  assert episode['image'].shape == (11, 64, 64, 3)
  assert episode['action'].dtype == np.float16


def test_dmc_step_after_episode_end_raises_and_worker_survives(walker):
  walker.reset(blocking=True)
  for _ in range(10):
    _, _, done, _ = walker.step(np.zeros(6, np.float32), blocking=True)
  assert done
  with pytest.raises(wrappers.WorkerError) as excinfo:
    walker.step(np.zeros(6, np.float32), blocking=True)
  message = str(excinfo.value)
  assert 'walker shared' in message and 'step' in message
  assert 'reset' in message  # The worker's own error is passed on.
  obs = walker.reset(blocking=True)  # The worker is still usable.
  assert obs['image'].shape == (64, 64, 3)


def test_dmc_images_change_as_the_walker_moves(walker):
  obs = walker.reset(blocking=True)
  images = [obs['image']]
  heights = [float(obs['height'])]
  for action in random_actions(6, seed=1):
    obs, _, _, _ = walker.step(action, blocking=True)
    images.append(obs['image'])
    heights.append(float(obs['height']))
  assert len({image.tobytes() for image in images}) > 1
  assert len(set(heights)) > 1
  assert all(image.std() > 0 for image in images)  # Not blank renders.


def test_dmc_same_seed_is_deterministic_and_other_seed_differs(walker_trio):
  first = [env.reset(blocking=True) for env in walker_trio]
  np.testing.assert_array_equal(first[0]['image'], first[1]['image'])
  assert not np.array_equal(first[0]['image'], first[2]['image'])
  for action in random_actions(5, seed=2):
    results = [env.step(action, blocking=True) for env in walker_trio]
  obs = [result[0] for result in results]
  for key in WALKER_PROPRIO + ('image',):
    np.testing.assert_array_equal(obs[0][key], obs[1][key], err_msg=key)
  assert results[0][1] == results[1][1]
  assert any(not np.array_equal(obs[0][key], obs[2][key]) for key in WALKER_PROPRIO)
  assert not np.array_equal(obs[0]['image'], obs[2]['image'])


def test_non_blocking_calls_return_promises(walker_trio):
  promises = [env.reset(blocking=False) for env in walker_trio]
  assert all(callable(promise) for promise in promises)
  first = [promise() for promise in promises]
  assert all(obs['image'].shape == (64, 64, 3) for obs in first)
  for action in random_actions(3, seed=3):
    promises = [env.step(action, blocking=False) for env in walker_trio]
    assert all(callable(promise) for promise in promises)
    results = [promise() for promise in promises]
  for obs, reward, done, info in results:
    assert obs['image'].shape == (64, 64, 3)
    assert obs['reward'] == reward
    assert not done
    assert isinstance(info, dict)
  # Each promise answered for its own env: the two seed-0 envs agree, the seed-1 env does not.
  np.testing.assert_array_equal(results[0][0]['image'], results[1][0]['image'])
  assert not np.array_equal(results[0][0]['image'], results[2][0]['image'])


def test_dmc_cup_alias(make_async):
  env = make_async('cup', dict(WALKER, task='dmc_cup_catch'))
  obs = env.reset(blocking=True)
  assert set(obs) == {'position', 'velocity', 'image', 'reward'}
  assert obs['image'].shape == (64, 64, 3)
  assert env.action_space.shape == (2,)
  obs, _, _, _ = env.step(np.zeros(2, np.float32), blocking=True)
  assert obs['image'].shape == (64, 64, 3)


def test_dmc_quadruped_renders(make_async):
  env = make_async('quadruped', dict(WALKER, task='dmc_quadruped_walk'))
  obs = env.reset(blocking=True)
  assert obs['image'].shape == (64, 64, 3)
  assert obs['image'].dtype == np.uint8
  obs, _, _, _ = env.step(np.zeros(env.action_space.shape, np.float32), blocking=True)
  assert obs['image'].shape == (64, 64, 3)
  assert obs['image'].std() > 0


# Errors ---------------------------------------------------------------------------------------------------------------

def child_pids():
  pids = set()
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == os.getpid() and fields[0] != 'Z':
      pids.add(int(entry))
  return pids


def task_error_message(task):
  """Starts a worker for `task`, expecting TaskError; returns its message. The exception is dropped on return."""
  try:
    wrappers.Async(f'bad {task}', dict(WALKER, task=task), 'process', START_TIMEOUT)
  except wrappers.TaskError as e:
    return str(e)
  pytest.fail(f'No TaskError for {task}')


def test_unknown_dmc_domain_names_valid_domains():
  message = task_error_message('dmc_nosuch_walk')
  assert 'nosuch' in message
  assert 'walker' in message and 'cheetah' in message


def test_unknown_dmc_task_lists_the_domains_tasks():
  message = task_error_message('dmc_walker_fly')
  assert 'fly' in message
  assert 'dmc_walker_walk' in message and 'dmc_walker_run' in message


def test_unknown_suite_mentions_dmc():
  message = task_error_message('foo_bar')
  assert 'foo' in message and 'dmc' in message
  with pytest.raises(wrappers.TaskError, match='dmc'):
    wrappers.make_env('foo_bar')  # Raises before dm_control is imported, so safe in this process.


def test_failed_creation_leaves_no_worker():
  before = child_pids()
  task_error_message('dmc_walker_fly')
  deadline = time.time() + 10
  while child_pids() - before and time.time() < deadline:
    time.sleep(0.1)
  assert not child_pids() - before


def test_unknown_strategy_raises():
  with pytest.raises(ValueError, match='strategy'):
    wrappers.Async('walker', WALKER, 'fork', START_TIMEOUT)


def test_killed_worker_raises_worker_error(make_async):
  env = make_async('walker killed 1', WALKER)
  env.reset(blocking=True)
  os.kill(env._process.pid, signal.SIGKILL)
  start = time.time()
  with pytest.raises(wrappers.WorkerError) as excinfo:
    env.step(np.zeros(6, np.float32), blocking=True)
  assert time.time() - start < 5
  message = str(excinfo.value)
  assert 'walker killed 1' in message
  assert 'step' in message


def test_hung_worker_times_out(make_async):
  env = make_async('walker hung 1', WALKER, timeout=3)
  env.reset(blocking=True)
  os.kill(env._process.pid, signal.SIGSTOP)
  start = time.time()
  with pytest.raises(wrappers.WorkerError) as excinfo:
    env.step(np.zeros(6, np.float32), blocking=True)
  elapsed = time.time() - start
  assert 2.5 < elapsed < 3 + 4
  message = str(excinfo.value)
  assert 'walker hung 1' in message
  assert 'step' in message
  assert '3 s' in message  # Names the timeout.
  env.close()
  assert env._process.poll() is not None


def test_a_pause_of_the_whole_run_is_not_charged_to_the_worker(make_async, monkeypatch):
  """A run paused with SIGSTOP (its workers and itself) for ten minutes, then continued: the step in flight is
  answered, not timed out. The pause of this process is simulated by its clock jumping 600 s while the worker is
  stopped for two seconds."""
  env = make_async('walker paused', WALKER, timeout=5)
  env.reset(blocking=True)
  real = time.monotonic
  start = real()
  monkeypatch.setattr(wrappers, '_clock', lambda: real() + (600 if real() - start > 1 else 0))
  os.kill(env._process.pid, signal.SIGSTOP)
  threading.Timer(2.0, os.kill, (env._process.pid, signal.SIGCONT)).start()
  obs, _, _, _ = env.step(np.zeros(6, np.float32), blocking=True)
  assert obs['image'].shape == (64, 64, 3) and real() - start > 1.9
  env.close()


def test_close_is_idempotent_and_ends_the_process(make_async):
  env = make_async('walker closed', WALKER)
  env.reset(blocking=True)
  process = env._process
  assert process.poll() is None
  env.close()
  env.close()
  assert process.poll() is not None
  assert process.pid not in child_pids()


def test_close_with_a_call_in_flight_shuts_the_worker_down_cleanly(make_async):
  # As when simulate() is interrupted (or another env raised) while step promises are pending, and the agent's
  # `finally` closes the envs. The worker should exit quietly, not crash on the closed socket.
  env = make_async('walker in flight', WALKER)
  env.reset(blocking=True)
  env.step(np.zeros(6, np.float32), blocking=False)  # Not awaited.
  env.close()
  assert env._process.returncode == 0


def test_dmc_repeat_inside_matches_action_repeat_wrapper_and_renders_once():
  """DeepMindControl(action_repeat=2) must equal ActionRepeat(DeepMindControl(), 2) and render once per step.
  Runs in a TF-free subprocess, since rendering next to TF crashes."""
  import inspect
  import subprocess
  import textwrap
  code = 'import numpy as np, wrappers\n' + inspect.getsource(ActionRepeat) + textwrap.dedent('''
      inner = wrappers.DeepMindControl('walker_walk', seed=3, action_repeat=2)
      outer = ActionRepeat(wrappers.DeepMindControl('walker_walk', seed=3), 2)
      renders = {'n': 0}
      render = inner.render
      def counting(*a, **k):
        renders['n'] += 1
        return render(*a, **k)
      inner.render = counting
      a, b = inner.reset(), outer.reset()
      rng = np.random.RandomState(0)
      for step in range(30):
        action = rng.uniform(-1, 1, 6)
        (o1, r1, d1, i1), (o2, r2, d2, i2) = inner.step(action), outer.step(action)
        assert r1 == r2 and d1 == d2 and i1['discount'] == i2['discount'], step
        for key in o1:
          np.testing.assert_array_equal(o1[key], o2[key], err_msg=key)
      assert renders['n'] == 1 + 30, renders
      print('OK')
  ''')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]


def test_dmc_render_matches_physics_render_pixel_for_pixel():
  """DeepMindControl.render (one cached Camera, an offscreen buffer of the image's size) must return exactly what
  dm_control's own `physics.render(height, width, camera_id=...)` returns for the same state: over steps, across
  resets, after a physics reload, and for quadruped's camera 2. Runs in a TF-free subprocess."""
  import subprocess
  import textwrap
  code = textwrap.dedent('''
      import numpy as np, wrappers
      from dm_control import suite
      from dm_control.suite import walker

      def check(env, reference, camera, where):
        image = env.render()
        expected = reference.physics.render(64, 64, camera_id=camera)
        assert image.dtype == expected.dtype == np.uint8 and image.shape == expected.shape == (64, 64, 3), where
        assert np.array_equal(image, expected), where
        np.testing.assert_array_equal(env._env.physics.get_state(), reference.physics.get_state(), err_msg=where)
        return image

      for task, domain, name, camera in (('walker_walk', 'walker', 'walk', 0), ('quadruped_walk', 'quadruped',
                                                                               'walk', 2)):
        env = wrappers.DeepMindControl(task, seed=7)
        reference = suite.load(domain, name, task_kwargs={'random': 7})
        rng = np.random.RandomState(0)
        spec = reference.action_spec()
        images, cameras = [], set()
        for episode in range(2):
          obs = env.reset()
          reference.reset()
          first = check(env, reference, camera, (task, episode, 'reset'))
          assert np.array_equal(obs['image'], first), (task, episode)
          for step in range(8):
            action = rng.uniform(spec.minimum, spec.maximum)
            env._env.step(action)
            reference.step(action)
            image = check(env, reference, camera, (task, episode, step))
            images.append((image, image.copy()))
            cameras.add(id(env._view[3]))
        assert len(cameras) == 1, 'the camera should be made once and reused'
        assert env._env.physics.model.vis.global_.offwidth == 64
        # Returned images are copies: later renders do not overwrite them.
        assert len({image.tobytes() for image, _ in images}) > 1
        for index, (image, snapshot) in enumerate(images):
          assert np.array_equal(image, snapshot), index
        if domain == 'walker':
          # A reloaded physics (new model and GL context) gets a new camera and still renders the same pixels.
          for physics in (env._env.physics, reference.physics):
            physics.reload_from_xml_string(*walker.get_model_and_assets())
          old = env._view[3]
          env.reset()
          reference.reset()
          for step in range(3):
            action = rng.uniform(spec.minimum, spec.maximum)
            env._env.step(action)
            reference.step(action)
            check(env, reference, camera, (task, 'reloaded', step))
          assert env._view[3] is not old
          assert env._env.physics.model.vis.global_.offwidth == 64
        env.close()
      print('OK')
  ''')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]
