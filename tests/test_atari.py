"""Tests for the Atari environment layer (wrappers.Atari, OneHotBox, OneHotAction, the atari branch of make_env).

The emulator does not render through GL, so the Atari class runs in this process too; the end-to-end tests go through
`wrappers.Async`, the worker path the agent uses. All tests use the ROMs that ale-py ships (pong, breakout).
"""

import pickle


import numpy as np
import pytest
from gymnasium import spaces
from PIL import Image

import tools
import wrappers
from helpers import run_cli, run_dreamer as _run_dreamer

PONG = dict(task='atari_pong', action_repeat=4, time_limit=200, seed=0)  # 50 agent steps.
NATIVE = (210, 160)  # ALE screen (height, width).


def run(env, actions):
  """Resets `env`, steps it with the action indices, and returns the images and rewards seen."""
  images, rewards = [env.reset()['image']], []
  for action in actions:
    obs, reward, done, _ = env.step(action)
    images.append(obs['image'])
    rewards.append(reward)
    if done:
      break
  return np.array(images), np.array(rewards)


def resize(frame, size):
  return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BILINEAR))


# Atari class ----------------------------------------------------------------------------------------------------------

def test_pong_spaces_minimal_action_set():
  env = wrappers.Atari('pong', seed=0)
  assert env.action_space == spaces.Discrete(6)
  assert len(env.ale.getMinimalActionSet()) == 6
  assert env.observation_space['image'] == spaces.Box(0, 255, (64, 64, 3), np.uint8)
  obs = env.reset()
  assert set(obs) == {'image'} and obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
  obs, reward, done, info = env.step(1)
  assert obs['image'].shape == (64, 64, 3) and isinstance(reward, float) and not done
  assert 'discount' not in info  # Only terminals carry a discount; TimeLimit adds 1 at its cut.
  assert env.ale.getFloat('repeat_action_probability') == pytest.approx(0.25)
  assert wrappers.Atari('pong', sticky_actions=False).ale.getFloat('repeat_action_probability') == 0.0

  gray = wrappers.Atari('pong', grayscale=True, size=(32, 48), seed=0)
  assert gray.observation_space['image'].shape == (32, 48, 1)
  assert gray.reset()['image'].shape == (32, 48, 1)
  assert gray.step(0)[0]['image'].shape == (32, 48, 1)


def test_step_before_reset_and_bad_index():
  env = wrappers.Atari('pong', seed=0)
  with pytest.raises(RuntimeError, match='reset'):
    env.step(0)
  env.reset()
  with pytest.raises(ValueError, match='0..5'):
    env.step(6)


@pytest.mark.parametrize('size', [NATIVE, (64, 64)], ids=['native', '64x64'])
def test_max_pools_last_two_frames(size):
  """Replays each agent step from a cloned emulator state, fetching every raw frame, and rebuilds the image."""
  env = wrappers.Atari('pong', size=size, sticky_actions=False, seed=1)
  env.reset()
  ale = env.ale
  actions = ale.getMinimalActionSet()
  rng = np.random.RandomState(0)
  differs = 0
  for _ in range(40):
    index = rng.randint(len(actions))
    state = ale.cloneState()
    frames = []
    for _ in range(4):
      ale.act(actions[index])
      frames.append(ale.getScreenRGB())
    ale.restoreState(state)
    obs, _, done, _ = env.step(index)
    assert not done
    pooled = np.maximum(frames[-2], frames[-1])
    if size == NATIVE:
      np.testing.assert_array_equal(obs['image'], pooled)  # No resize at the native size: exact max.
    np.testing.assert_array_equal(obs['image'], resize(pooled, size))
    differs += not np.array_equal(obs['image'], resize(frames[-1], size))
  assert differs > 0  # Pong's ball moves between frames, so pooling changes some images.


def test_noop_reset_counts_and_seeding():
  def noops(seed, resets=5):
    env = wrappers.Atari('pong', seed=seed)
    counts, firsts = [], []
    for _ in range(resets):
      firsts.append(env.reset()['image'])
      counts.append(env.last_noops)
      assert env.ale.getEpisodeFrameNumber() == env.last_noops  # The no-ops really ran (frameskip 1).
      env.step(2)
    return counts, np.array(firsts)

  counts, firsts = noops(0)
  assert all(1 <= c <= 30 for c in counts)
  again, firsts_again = noops(0)
  assert counts == again
  np.testing.assert_array_equal(firsts, firsts_again)
  other, firsts_other = noops(1)
  assert other != counts or not np.array_equal(firsts, firsts_other)

  env = wrappers.Atari('pong', noops=0, seed=0)
  env.reset()
  assert env.last_noops == 0 and env.ale.getEpisodeFrameNumber() == 0


def test_life_loss_ends_episode_with_discount_zero():
  """Breakout with the paddle held still after launching: the ball is soon missed and a life lost."""
  def until_life_lost(life_done):
    env = wrappers.Atari('breakout', life_done=life_done, sticky_actions=False, seed=0)
    env.reset()
    lives = env.ale.lives()
    assert lives == 5
    for step in range(500):
      obs, reward, done, info = env.step(1)  # FIRE launches the ball; the paddle stays put.
      if done or env.ale.lives() < lives:
        return env, done, info, step
    raise AssertionError('no life lost in 500 steps')

  env, done, info, _ = until_life_lost(life_done=True)
  assert done and env.ale.lives() == 4 and not env.ale.game_over()
  assert info['discount'] == 0 and info['discount'].dtype == np.float32
  env.reset()  # A new episode restarts the game.
  assert env.ale.lives() == 5

  env, done, info, _ = until_life_lost(life_done=False)
  assert not done and 'discount' not in info and env.ale.lives() == 4
  for _ in range(3000):  # Game over still ends the episode, with discount 0.
    _, _, done, info = env.step(1)
    if done:
      break
  assert done and env.ale.game_over() and info['discount'] == 0


def test_life_loss_ends_repeat_early():
  """The frame that loses the life ends the agent step: fewer than action_repeat frames run."""
  env = wrappers.Atari('breakout', action_repeat=4, sticky_actions=False, seed=0)
  ends = set()
  for _ in range(6):
    env.reset()
    start = env.ale.getEpisodeFrameNumber()
    steps = 0
    while True:
      steps += 1
      _, _, done, _ = env.step(1)
      if done:
        break
    ends.add((env.ale.getEpisodeFrameNumber() - start) - 4 * (steps - 1))
  assert ends <= {1, 2, 3, 4}
  assert ends != {4}  # With several episodes, some life loss falls inside a repeat.


def test_sticky_actions_reproducible_and_matter():
  actions = np.random.RandomState(0).randint(6, size=150)
  sticky, sticky_rewards = run(wrappers.Atari('pong', seed=0), actions)
  again, again_rewards = run(wrappers.Atari('pong', seed=0), actions)
  np.testing.assert_array_equal(sticky, again)
  np.testing.assert_array_equal(sticky_rewards, again_rewards)
  plain, _ = run(wrappers.Atari('pong', seed=0, sticky_actions=False), actions)
  assert sticky.shape == plain.shape  # Same seed: same no-op count, so any difference comes from stickiness.
  np.testing.assert_array_equal(sticky[0], plain[0])
  assert not np.array_equal(sticky, plain)


def test_unknown_game_raises_task_error():
  with pytest.raises(wrappers.TaskError, match=r"Unknown Atari game 'pongg'.*atari_pong\?.*breakout.*space_invaders"):
    wrappers.Atari('pongg')
  with pytest.raises(wrappers.TaskError, match="Unknown Atari game 'no_such_game'"):
    wrappers.make_env('atari_no_such_game', 4, 100, 16, 0)
  with pytest.raises(wrappers.TaskError, match="Unknown suite 'foo'.*dmc, atari"):
    wrappers.make_env('foo_pong', 4, 100, 16, 0)
  assert 'pong' in wrappers.atari_games() and 'space_invaders' in wrappers.atari_games()


# OneHotAction ---------------------------------------------------------------------------------------------------------

class DiscreteEnv:
  """Records the indices it receives. No `_random` attribute: OneHotAction must sample on its own."""

  def __init__(self, n=6):
    self.action_space = spaces.Discrete(n)
    self.observation_space = spaces.Dict({'image': spaces.Box(0, 255, (4, 4, 3), np.uint8)})
    self.received = []

  def reset(self):
    return {'image': np.zeros((4, 4, 3), np.uint8)}

  def step(self, action):
    self.received.append(action)
    return self.reset(), 0.0, False, {}


def test_one_hot_passes_index_and_rejects_others():
  inner = DiscreteEnv(6)
  env = wrappers.OneHotAction(inner, seed=0)
  assert isinstance(env.action_space, spaces.Box) and env.action_space.shape == (6,)
  assert env.action_space.dtype == np.float32
  assert np.all(env.action_space.low == 0) and np.all(env.action_space.high == 1)
  for index in (0, 3, 5):
    action = np.zeros(6, np.float16)  # Stored episodes hold float16 actions at precision 16; either is taken.
    action[index] = 1
    env.step(action)
  assert inner.received == [0, 3, 5] and all(type(i) is int for i in inner.received)
  bad = [np.zeros(6), np.full(6, 1 / 6), np.array([1, 1, 0, 0, 0, 0.]), np.array([0.9, 0.1, 0, 0, 0, 0]),
         np.array([-1, 0, 0, 0, 0, 0.]), np.eye(5)[0], np.eye(6), 3, np.array(['a'] * 6)]
  for action in bad:
    with pytest.raises(ValueError, match=r'Invalid one-hot action: .*expected a one-hot vector of length 6'):
      env.step(action)
  assert inner.received == [0, 3, 5]


def test_one_hot_needs_discrete_space():
  class BoxEnv(DiscreteEnv):
    def __init__(self):
      super().__init__()
      self.action_space = spaces.Box(-1, 1, (2,), np.float32)

  with pytest.raises(TypeError, match='Discrete'):
    wrappers.OneHotAction(BoxEnv())


def test_one_hot_sample_is_seeded_and_pickles():
  def samples(space, count=50):
    return np.array([space.sample() for _ in range(count)])

  space = wrappers.OneHotAction(DiscreteEnv(6), seed=0).action_space
  drawn = samples(space)
  assert drawn.dtype == np.float32 and drawn.shape == (50, 6)
  assert np.all(drawn.sum(1) == 1) and np.all((drawn == 0) | (drawn == 1))
  assert all(space.contains(x) for x in drawn) and not space.contains(np.full(6, 0.5, np.float32))
  assert len(set(drawn.argmax(1))) > 3  # Spread over the actions.
  np.testing.assert_array_equal(drawn, samples(wrappers.OneHotAction(DiscreteEnv(6), seed=0).action_space))
  assert not np.array_equal(drawn, samples(wrappers.OneHotAction(DiscreteEnv(6), seed=1).action_space))
  env = wrappers.OneHotAction(DiscreteEnv(6), seed=0)
  assert env.action_space is env.action_space  # One space, so its generator advances across calls.

  # The parent reads the space through pickle and may reseed it (dreamer.py: actspace.seed(config.seed)).
  space = wrappers.OneHotAction(DiscreteEnv(6), seed=0).action_space
  space.sample()
  copy = pickle.loads(pickle.dumps(space))
  assert isinstance(copy, wrappers.OneHotBox)
  np.testing.assert_array_equal(samples(copy), samples(space))  # Same generator state travels along.
  copy.seed(7)
  fresh = wrappers.OneHotBox(6, seed=7)
  np.testing.assert_array_equal(samples(copy), samples(fresh))
  with pytest.raises(NotImplementedError):
    copy.sample(mask=np.ones(6, np.int8))


# make_env through the worker process ----------------------------------------------------------------------------------

def test_async_pong_episode_ends_at_time_limit():
  env = wrappers.Async('pong', PONG)
  try:
    space = env.action_space
    assert isinstance(space, wrappers.OneHotBox) and space.shape == (6,)
    obs_space = env.observation_space
    assert obs_space['image'] == spaces.Box(0, 255, (64, 64, 3), np.uint8) and 'reward' in obs_space.spaces
    space.seed(0)
    obs = env.reset()
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8 and obs['reward'] == 0
    steps, done = 0, False
    while not done:
      obs, reward, done, info = env.step(space.sample())
      steps += 1
    assert steps == PONG['time_limit'] // PONG['action_repeat']
    assert info['discount'] == 1  # Pong has no lives: the time-limit cut is not terminal.
    episode = tools.stored(info['episode'], 16)  # As the loop stores it at --precision 16.
    assert episode['image'].shape == (steps + 1, 64, 64, 3) and episode['image'].dtype == np.uint8
    assert episode['action'].shape == (steps + 1, 6) and episode['action'].dtype == np.float16
    np.testing.assert_array_equal(episode['action'][0], np.zeros(6))  # Collect.reset stores zeros.
    assert np.all(episode['action'][1:].sum(1) == 1)
    assert episode['discount'][-1] == 1 and np.all(episode['discount'] == 1)
    env.reset()
    with pytest.raises(wrappers.WorkerError, match='Invalid one-hot action'):
      env.step(np.full(6, 0.5, np.float32))
  finally:
    env.close()


def test_async_reproducible_by_seed():
  def first_steps(seed):
    env = wrappers.Async('pong', dict(PONG, seed=seed))
    try:
      space = env.action_space
      images = [env.reset()['image']]
      for _ in range(20):
        images.append(env.step(space.sample())[0]['image'])
      return np.array(images)
    finally:
      env.close()

  same = first_steps(3)
  np.testing.assert_array_equal(same, first_steps(3))
  assert not np.array_equal(same, first_steps(4))


def test_async_breakout_life_loss_is_terminal():
  env = wrappers.Async('breakout', dict(task='atari_breakout', action_repeat=4, time_limit=20000, seed=0))
  try:
    space = env.action_space
    assert space.shape == (4,)
    env.reset()
    for _ in range(2000):
      _, _, done, info = env.step(space.sample())
      if done:
        break
    assert done
    assert info['discount'] == 0
    assert info['episode']['discount'][-1] == 0 and np.all(info['episode']['discount'][:-1] == 1)
  finally:
    env.close()


def play_until_done(env, space, steps=5000):
  """Random actions until the episode ends; returns the lives counter after every step and the last info."""
  env.reset()
  lives = [env.call('__getattr__', 'lives')]
  for _ in range(steps):
    _, _, done, info = env.step(space.sample())
    lives.append(env.call('__getattr__', 'lives'))
    if done:
      return lives, info
  raise AssertionError(f'no episode end in {steps} steps')


@pytest.mark.parametrize('life_done', [None, 'both', 'never'], ids=['default', 'both', 'never'])
def test_lost_life_ends_episodes_as_life_done_says(life_done):
  """The environments dreamer.py makes for atari_breakout (5 lives): by default (the paper's 'train'), a training
  episode ends at the first lost life while an evaluation episode plays on to game over."""
  import dreamer
  config = dreamer.parse_args(['--task', 'atari_breakout'] + (['--life_done', life_done] if life_done else []))
  ends_on_life = {None: dict(train=True, test=False), 'both': dict(train=True, test=True),
                  'never': dict(train=False, test=False)}[life_done]
  for prefix in ('train', 'test'):
    env = dreamer.make_env(config, prefix, 0)
    try:
      space = env.action_space
      space.seed(0)
      lives, info = play_until_done(env, space)
      assert lives[0] == 5 and info['discount'] == 0
      if ends_on_life[prefix]:
        assert lives[-1] == 4 and lives[:-1] == [5] * (len(lives) - 1), (prefix, lives)
      else:  # Goes on past the first lost life, to game over.
        assert lives[-1] == 0 and len(set(lives)) == 6, (prefix, sorted(set(lives)))
        assert lives.index(4) < len(lives) - 1
    finally:
      env.close()


def test_async_unknown_game():
  with pytest.raises(wrappers.TaskError, match="Unknown Atari game 'pongg'.*atari_pong"):
    wrappers.Async('pongg', dict(PONG, task='atari_pongg'))


# The agent on Atari: defaults, flag checks and a tiny end-to-end run ------------------------------------------------

def test_atari_defaults_apply_under_given_flags():
  import dreamer
  config = dreamer.parse_args(['--task', 'atari_pong'])
  assert (config.action_dist, config.expl, config.pcont, config.action_repeat) == (
      'onehot_score', 'epsilon_greedy', True, 4)
  assert config.horizon == 10 and config.kl_scale == 0.1 and config.clip_rewards == 'tanh'
  assert (config.expl_schedule, config.expl_amount, config.expl_decay, config.expl_min) == ('linear', 0.4, 3e6, 0.1)
  assert config.life_done == 'train' and config.eval_noise == 0.001 and config.time_limit == 108000
  config = dreamer.parse_args(['--task', 'atari_pong', '--horizon', '7', '--pcont', 'False', '--action_dist',
                               'onehot', '--expl_schedule', 'halving', '--life_done', 'both'])
  assert config.horizon == 7 and config.pcont is False and config.action_dist == 'onehot'  # Flags the user sets win.
  assert config.expl_schedule == 'halving' and config.life_done == 'both'
  dmc = dreamer.parse_args(['--task', 'dmc_walker_walk'])
  assert (dmc.action_dist, dmc.expl_schedule, dmc.expl_decay, dmc.expl_min) == ('tanh_normal', 'halving', 0.0, 0.0)


@pytest.mark.parametrize('step, training, expected', [(0, True, 0.4), (1.5e6, True, 0.25), (4e6, True, 0.1),
                                                      (1.5e6, False, 0.001)])
def test_agent_epsilon_follows_the_papers_linear_schedule(step, training, expected):
  """Dreamer._expl_amount on the atari_* defaults at the agent's step (env steps); evaluation uses eval_noise."""
  import types
  import dreamer
  agent = types.SimpleNamespace(_c=dreamer.parse_args(['--task', 'atari_pong']))
  assert dreamer.Dreamer._expl_amount(agent, training, step) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize('args, message', [
    (['--task', 'dmc_walker_walk', '--action_dist', 'onehot_score'],
     '--action_dist onehot_score does not fit the continuous actions'),
    (['--task', 'atari_pong', '--expl_schedule', 'cosine'],
     '--expl_schedule cosine is not allowed; choose one of: halving, linear'),
    (['--task', 'atari_pong', '--life_done', 'test'],
     '--life_done test is not allowed; choose one of: train, both, never'),
    (['--task', 'dmlab_collect'], 'DeepMind Lab'),
])
def test_bad_discrete_settings_exit_2_naming_the_flag(tmp_path, capsys, args, message):
  import flags
  with pytest.raises(SystemExit) as exit_:
    flags.parse_and_check(['--logdir', str(tmp_path), *args])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err and 'Unknown suite' not in err, err
  assert not (tmp_path / 'episodes').exists()


def test_resume_may_switch_between_the_one_hot_estimators(tmp_path, capsys):
  """Both one-hot distributions have the same variables: a run may resume with the other one (printed), but not
  with a tanh-normal actor."""
  import json
  import flags
  config = flags.parse_args(['--logdir', str(tmp_path), '--task', 'atari_pong', '--action_dist', 'onehot'])
  config.logdir = tmp_path
  (tmp_path / 'config.json').write_text(json.dumps({k: str(v) if k == 'logdir' else v for k, v in config.items()}))
  (tmp_path / 'variables.pkl').write_bytes(b'')  # Something was stored under the old flags.
  config.action_dist = 'onehot_score'
  flags.check_resume(config, has_data=True)
  assert '--action_dist onehot -> onehot_score' in capsys.readouterr().out
  config.action_dist = 'tanh_normal'
  with pytest.raises(flags.UserError, match='--action_dist was onehot, now tanh_normal'):
    flags.check_resume(config, has_data=True)


@pytest.mark.parametrize('args, flag', [
    (['--task', 'atari_pong', '--action_dist', 'tanh_normal'], '--action_dist onehot'),
    (['--task', 'atari_pong', '--expl', 'additive_gaussian'], '--expl epsilon_greedy'),
    (['--task', 'dmc_walker_walk', '--action_dist', 'onehot'], '--action_dist tanh_normal'),
])
def test_impossible_action_settings_stop_before_training(tmp_path, args, flag):
  result = _run_dreamer('--logdir', str(tmp_path), *args, timeout=120)
  assert result.returncode == 2 and flag in result.stderr and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'episodes').exists()


@pytest.mark.e2e
def test_tiny_atari_run_trains_evaluates_and_stores_one_hot_episodes(tmp_path):
  import json
  import tools
  code, out, err = run_cli('--logdir', str(tmp_path), '--task', 'atari_pong', '--preset', 'debug',
                           '--steps', '300', '--precision', '32')  # In this process: TensorFlow is imported already.
  assert code == 0, out[-3000:] + err[-3000:]
  files = sorted((tmp_path / 'episodes').glob('*.npz'))
  assert files
  for filename in files:
    action = tools.load_episode(filename)['action'][1:]
    assert action.shape[1] == 6
    assert np.all(action.sum(-1) == 1) and np.all((action == 0) | (action == 1))
  metrics = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert any('test/return' in m for m in metrics)
  scalars = [m for m in metrics if 'pcont_loss' in m]
  assert scalars and all(np.isfinite(m['model_loss']) for m in scalars)
  values = tools.read_checkpoint(tmp_path / 'variables.pkl')
  assert len(values) == 92  # 82 + the pcont head (8) + the pcont_loss metric (2).
  assert values[9].shape == (16, 6)  # Actor output: one logit per action.
