"""The gym suite (`--task gym_<id>`): real Gymnasium environments (MuJoCo's through the worker, since a MuJoCo
render next to TensorFlow crashes with Mesa's EGL; classic control's, drawn by pygame, also in this process), the
flags they set, the inputs that stop before training, and tiny runs end to end."""

import json
import os
import pathlib
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
from PIL import Image

import flags
import tools
import wrappers
from helpers import ROOT, run_cli

TESTS = pathlib.Path(__file__).parent
START_TIMEOUT = 120.0


@pytest.fixture
def custom_envs(monkeypatch):
  """tests/gym_envs.py importable here and in the processes this one starts (describe, the workers)."""
  monkeypatch.syspath_prepend(str(TESTS))
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(TESTS), os.environ.get('PYTHONPATH')])))


def worker(request, task, **kwargs):
  env = wrappers.Async(task, dict(dict(action_repeat=2, time_limit=1000, seed=0), task=task, **kwargs), 'process',
                       START_TIMEOUT)
  request.addfinalizer(env.close)
  return env


def play(env, actions):
  """Resets `env` and steps it with `actions` until done: (observations, rewards, dones, infos)."""
  obs, rewards, dones, infos = [env.reset()], [], [], []
  for action in actions:
    o, r, d, i = env.step(action)
    obs.append(o), rewards.append(r), dones.append(d), infos.append(i)
    if d:
      break
  return obs, rewards, dones, infos


# Environments ---------------------------------------------------------------------------------------------------------

def test_mujoco_task_renders_normalized_continuous_control_through_the_worker(request, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # The workers' working directory.
  envs = [worker(request, 'gym_HalfCheetah-v5', time_limit=20, seed=seed) for seed in (0, 0, 1)]
  space = envs[0].action_space
  assert space.shape == (6,) and np.all(space.low == -1) and np.all(space.high == 1)
  assert envs[0].call('__getattr__', 'camera') == 'track'  # The camera that follows the cheetah.
  actions = np.random.RandomState(0).uniform(-1, 1, (20, 6)).astype(np.float32)
  runs = [play(env, actions) for env in envs]
  obs, rewards, dones, infos = runs[0]
  assert set(obs[0]) == {'image', 'reward'}  # The image alone (no proprioceptive vector) and RewardObs's reward.
  assert obs[0]['image'].shape == (64, 64, 3) and obs[0]['image'].dtype == np.uint8
  assert len(rewards) == 10 and dones[-1] and not any(dones[:-1])  # 20 env steps at action repeat 2.
  assert infos[-1]['discount'] == 1.0  # Cut by the time limit: not a terminal.
  episode = infos[-1]['episode']
  assert episode['image'].shape == (11, 64, 64, 3) and episode['action'].shape == (11, 6)
  assert len({frame.tobytes() for frame in episode['image']}) > 5  # The cheetah moves.
  same = [np.array([o['image'] for o in run[0]]) for run in runs]
  np.testing.assert_array_equal(same[0], same[1])  # Seeded through reset(seed=...).
  assert runs[0][1] == runs[1][1]
  assert runs[0][1] != runs[2][1]  # Another seed starts from another state.
  assert not list(tmp_path.iterdir())  # MuJoCo's warnings go to stderr, not to a MUJOCO_LOG.TXT here.


def test_classic_control_terminal_has_discount_zero_and_truncation_one(request):
  env = worker(request, 'gym_CartPole-v1', time_limit=500)
  assert env.call('__getattr__', 'camera') is None  # Not MuJoCo: the env's own view.
  space = env.action_space
  assert space.shape == (2,) and isinstance(space, wrappers.OneHotBox)
  left = np.array([1, 0], np.float32)
  _, rewards, dones, infos = play(env, [left] * 200)  # Pushing one way drops the pole within a few dozen steps.
  assert dones[-1] and len(rewards) < 50
  assert infos[-1]['discount'] == 0.0 and list(infos[-1]['episode']['discount'][:-1]) == [1.0] * len(rewards)
  short = worker(request, 'gym_CartPole-v1', time_limit=6)
  alternate = [np.eye(2, dtype=np.float32)[i % 2] for i in range(10)]
  _, rewards, dones, infos = play(short, alternate)
  assert len(rewards) == 3 and rewards == [2.0, 2.0, 2.0]  # gymnasium's own limit, set to 6 env steps.
  assert infos[-1]['discount'] == 1.0


def test_frames_are_the_envs_own_render_resized_and_seeded_by_reset():
  env = wrappers.Gym('CartPole-v1', seed=3, action_repeat=1)  # pygame draws without GL: safe in this process.
  raw = gymnasium.make('CartPole-v1', render_mode='rgb_array')
  raw.reset(seed=3)
  assert raw.render().shape == (400, 600, 3)
  resize = lambda frame: np.asarray(Image.fromarray(frame).resize((64, 64), Image.BILINEAR))
  start = resize(raw.render())
  np.testing.assert_array_equal(env.reset()['image'], start)
  raw.step(1)
  np.testing.assert_array_equal(env.step(1)[0]['image'], resize(raw.render()))
  # A later reset continues the seeded stream (another start); a new env with the same seed starts the same.
  assert not np.array_equal(env.reset()['image'], start)
  np.testing.assert_array_equal(wrappers.Gym('CartPole-v1', seed=3).reset()['image'], start)
  with pytest.raises(RuntimeError, match='reset'):
    wrappers.Gym('CartPole-v1').step(0)


def test_discrete_actions_start_where_the_space_starts(custom_envs):
  for task in ('gym_gym_envs:Counter', 'gym_gym_envs:Count-v0'):  # An entry point and a registered id.
    env = wrappers.make_env(task, action_repeat=1, time_limit=100, seed=0)
    assert env.action_space.shape == (3,)
    env.reset()
    for index in range(3):
      obs, reward, done, _ = env.step(np.eye(3, dtype=np.float32)[index])
      assert reward == index + 2 and np.all(obs['image'] == 40 * (index + 2))  # Index 0 is action 2.
    four = np.eye(3, dtype=np.float32)[2]
    dones = [env.step(four)[2] for _ in range(4)]
    assert dones == [False, False, False, True]  # The fifth 4 terminates.
  assert wrappers.describe_gym('gym_envs:Count-v0') == dict(kind='discrete', max_episode_steps=40)
  assert wrappers.describe_gym('gym_envs:Counter') == dict(kind='discrete', max_episode_steps=None)


def test_the_worker_and_the_describe_process_never_import_tensorflow():
  script = (
      'import sys, numpy as np, wrappers\n'
      'env = wrappers.make_env("gym_CartPole-v1", time_limit=10, seed=0)\n'
      'env.reset(); env.step(np.array([1.0, 0.0], np.float32))\n'
      'wrappers._describe("CartPole-v1")\n'
      'print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras")))\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert json.loads(lines[-2]) == dict(kind='discrete', max_episode_steps=500)
  assert lines[-1] == '[]', lines[-1]


# Flags ----------------------------------------------------------------------------------------------------------------

def test_settings_follow_the_action_space_and_the_envs_time_limit():
  discrete = flags.parse_args(['--task', 'gym_CartPole-v1'])
  for key, value in flags.DISCRETE.items():
    assert discrete[key] == value, key
  assert discrete.pcont and discrete.time_limit == 500 and discrete.action_repeat == 2
  continuous = flags.parse_args(['--task', 'gym_HalfCheetah-v5'])
  assert continuous.action_dist == 'tanh_normal' and continuous.expl == 'additive_gaussian'
  assert continuous.pcont and continuous.time_limit == 1000 and continuous.kl_scale == 1.0
  assert flags.parse_args(['--task', 'gym_CartPole-v1', '--time_limit', '100']).time_limit == 100  # Given wins.
  assert flags.parse_args(['--task', 'gym_CartPole-v1', '--preset', 'debug']).time_limit == 50  # So does a preset.
  flags.check_config(discrete)
  flags.check_config(continuous)


@pytest.mark.parametrize('task, says', [
    ('gym_CartPol-v1', ["'CartPol-v1'", 'gym_CartPole-v1', 'Registered ids']),
    ('gym_nosuchmodule:Env-v0', ['nosuchmodule', 'gymnasium[classic-control]']),
    ('gym_gym_envs:MultiDiscreteActions', ['MultiDiscrete', 'Box', 'Discrete']),
    ('gym_gym_envs:DictActions', ['Dict', 'Box', 'Discrete']),
    ('gym_gym_envs:NoFrames', ['rgb_array', 'human']),
])
def test_a_task_the_agent_cannot_use_stops_before_training(custom_envs, tmp_path, task, says):
  logdir = tmp_path / 'run'
  code, out, err = run_cli('--logdir', str(logdir), '--task', task)
  assert code == 2 and 'Traceback' not in err, err[-3000:]
  assert task.partition('_')[2] in err and all(s in err for s in says), err[-3000:]
  assert not logdir.exists()  # Nothing written.


def test_a_continuous_setting_on_a_discrete_gym_task_names_the_flag(tmp_path):
  code, _, err = run_cli('--logdir', str(tmp_path / 'run'), '--task', 'gym_CartPole-v1', '--action_dist',
                         'tanh_normal')
  assert code == 2 and '--action_dist onehot' in err and 'Traceback' not in err, err[-2000:]


# End to end -----------------------------------------------------------------------------------------------------------

def check_episodes(logdir, actdim, onehot):
  files = sorted((logdir / 'episodes').glob('*.npz'))
  assert files
  for filename in files:
    episode = tools.load_episode(filename)
    assert set(episode) == {'image', 'action', 'reward', 'discount'}
    length = len(episode['reward'])
    assert filename.stem.endswith(f'-{length}')  # The reference's name: <timestamp>-<uuid>-<length>.
    assert episode['image'].shape == (length, 64, 64, 3) and episode['image'].dtype == np.uint8
    assert episode['action'].shape == (length, actdim)
    if onehot:
      assert np.all(episode['action'][1:].sum(-1) == 1)
  return [tools.load_episode(f) for f in files]


@pytest.mark.e2e
def test_a_mujoco_gym_task_trains_end_to_end(tmp_path):
  code, out, err = run_cli('--logdir', str(tmp_path), '--task', 'gym_HalfCheetah-v5', '--preset', 'debug',
                           '--steps', '200', '--precision', '32')
  assert code == 0, out[-3000:] + err[-3000:]
  check_episodes(tmp_path, 6, onehot=False)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['task'] == 'gym_HalfCheetah-v5' and config['pcont'] and config['time_limit'] == 50
  metrics = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert any('test/return' in m for m in metrics) and any('pcont_loss' in m for m in metrics)


@pytest.fixture(scope='module')
def cartpole(tmp_path_factory):
  logdir = tmp_path_factory.mktemp('cartpole')
  args = ('--logdir', str(logdir), '--task', 'gym_CartPole-v1', '--preset', 'debug', '--precision', '32')
  return logdir, args, run_cli(*args, '--steps', '200')


@pytest.mark.e2e
@pytest.mark.xdist_group('gym_cartpole')
def test_a_discrete_gym_task_trains_end_to_end_with_terminals(cartpole):
  logdir, _, (code, out, err) = cartpole
  assert code == 0, out[-3000:] + err[-3000:]
  episodes = check_episodes(logdir, 2, onehot=True)
  ended = [ep for ep in episodes if ep['discount'][-1] == 0]
  assert ended, 'no episode ended with the pole down'  # Random pushes drop it within 50 steps.
  assert all(np.all(ep['discount'][:-1] == 1) for ep in episodes)
  values = tools.read_checkpoint(logdir / 'variables.pkl')
  assert len(values) == 92 and values[9].shape == (16, 2)  # With the pcont head; one actor logit per action.


@pytest.mark.e2e
@pytest.mark.xdist_group('gym_cartpole')
def test_a_gym_run_resumes_and_evaluates_with_parallel_workers(cartpole):
  logdir, args, _ = cartpole
  before = len(list((logdir / 'episodes').glob('*.npz')))
  code, out, err = run_cli(*args, '--steps', '300', '--envs', '2', '--parallel', 'process')
  assert code == 0, out[-3000:] + err[-3000:]
  assert f'Load checkpoint {logdir / "variables.pkl"}.' in out, out[-3000:]
  assert len(list((logdir / 'episodes').glob('*.npz'))) > before
  code, out, err = run_cli(*args, '--eval_only', 'True', '--eval_episodes', '2', '--envs', '2')
  assert code == 0, out[-3000:] + err[-3000:]
  result = json.loads((logdir / 'eval.json').read_text())
  assert result['task'] == 'gym_CartPole-v1' and len(result['returns']) == 2
  assert all(1 <= r <= 50 for r in result['returns'])  # CartPole pays 1 per env step, at most 50 (debug limit).
