"""Behaviour of the helpers in tools.py: returns and scans, the tanh bijector, flag parsing, episode files,
checkpoint files, schedules and GIF encoding."""

import os
import pathlib
import pickle
import re

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf

import tools
from helpers import WALKER, read_order

EPISODE_NAME = re.compile(r'^\d{8}T\d{6}-[0-9a-f]{32}-(\d+)\.npz$')


# lambda_return -------------------------------------------------------------------------------------------------------

def np_lambda_return(reward, value, pcont, bootstrap, lambda_):
  """Time-major numpy version with an explicit backward loop:
  R_t = r_t + p_t ((1 - lambda) v_{t+1} + lambda R_{t+1}), with v_T = R_T = bootstrap."""
  reward = np.asarray(reward, np.float64)
  value = np.asarray(value, np.float64)
  pcont = np.broadcast_to(np.asarray(pcont, np.float64), reward.shape)
  bootstrap = np.zeros(reward.shape[1:]) if bootstrap is None else np.asarray(bootstrap, np.float64)
  returns = np.zeros_like(reward)
  next_return, next_value = bootstrap, bootstrap
  for t in reversed(range(len(reward))):
    returns[t] = reward[t] + pcont[t] * ((1 - lambda_) * next_value + lambda_ * next_return)
    next_return, next_value = returns[t], value[t]
  return returns


def random_inputs(shape, seed=0):
  rng = np.random.RandomState(seed)
  reward = rng.normal(size=shape).astype(np.float32)
  value = rng.normal(size=shape).astype(np.float32)
  pcont = rng.uniform(0.5, 1.0, size=shape).astype(np.float32)
  bootstrap = rng.normal(size=shape[1:]).astype(np.float32)
  return reward, value, pcont, bootstrap


def call_lambda_return(reward, value, pcont, bootstrap, lambda_, axis=0):
  as_tensor = lambda x: x if x is None or isinstance(x, float) else tf.constant(x)
  returns = tools.lambda_return(
      tf.constant(reward), tf.constant(value), as_tensor(pcont), as_tensor(bootstrap), lambda_, axis)
  assert returns.dtype == tf.float32 and returns.shape == reward.shape, (returns.dtype, returns.shape)
  return returns.numpy()


def test_np_lambda_return_one_step_by_hand():
  # Checks the helper itself on a two-step case worked out on paper.
  r, v, p, lam, boot = [1.0, 2.0], [10.0, 20.0], [0.5, 0.25], 0.5, 4.0
  r1 = 2.0 + 0.25 * 4.0  # last step: r + p * bootstrap
  r0 = 1.0 + 0.5 * (0.5 * 20.0 + 0.5 * r1)
  np.testing.assert_allclose(np_lambda_return(r, v, p, boot, lam), [r0, r1])


@pytest.mark.parametrize('lambda_', [0.95, 0.5])
def test_lambda_return_tensor_pcont(lambda_):
  reward, value, pcont, bootstrap = random_inputs((7, 3))
  np.testing.assert_allclose(
      call_lambda_return(reward, value, pcont, bootstrap, lambda_),
      np_lambda_return(reward, value, pcont, bootstrap, lambda_), rtol=1e-5, atol=1e-5)


def test_lambda_return_scalar_pcont():
  reward, value, _, bootstrap = random_inputs((6, 4), seed=1)
  np.testing.assert_allclose(
      call_lambda_return(reward, value, 0.9, bootstrap, 0.95),
      np_lambda_return(reward, value, 0.9, bootstrap, 0.95), rtol=1e-5, atol=1e-5)


def test_lambda_return_without_bootstrap_uses_zero():
  reward, value, pcont, _ = random_inputs((5, 3), seed=2)
  returns = call_lambda_return(reward, value, pcont, None, 0.95)
  np.testing.assert_allclose(returns, np_lambda_return(reward, value, pcont, None, 0.95), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns[-1], reward[-1], rtol=1e-6)


@pytest.mark.parametrize('shape', [(3, 6), (3, 6, 2)])
def test_lambda_return_axis1(shape):
  reward, value, pcont, _ = random_inputs(shape, seed=3)
  bootstrap = np.random.RandomState(4).normal(size=shape[:1] + shape[2:]).astype(np.float32)
  returns = call_lambda_return(reward, value, pcont, bootstrap, 0.8, axis=1)
  swap = lambda x: np.swapaxes(x, 0, 1)
  expected = swap(np_lambda_return(swap(reward), swap(value), swap(pcont), bootstrap, 0.8))
  np.testing.assert_allclose(returns, expected, rtol=1e-5, atol=1e-5)


def test_lambda_return_lambda1_is_discounted_monte_carlo():
  reward, value, pcont, bootstrap = random_inputs((6, 3), seed=5)
  returns = call_lambda_return(reward, value, pcont, bootstrap, 1.0)
  # Forward sums, no recursion: sum_k (prod_{t<=j<k} p_j) r_k + (prod_{j>=t} p_j) bootstrap. Values are unused.
  T = len(reward)
  expected = np.zeros(reward.shape)
  for t in range(T):
    discount = np.ones(reward.shape[1:])
    for k in range(t, T):
      expected[t] += discount * reward[k]
      discount = discount * pcont[k]
    expected[t] += discount * bootstrap
  np.testing.assert_allclose(returns, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(call_lambda_return(reward, 100 * value, pcont, bootstrap, 1.0), returns, rtol=1e-5)


def test_lambda_return_lambda0_is_one_step():
  reward, value, pcont, bootstrap = random_inputs((6, 3), seed=6)
  returns = call_lambda_return(reward, value, pcont, bootstrap, 0.0)
  next_value = np.concatenate([value[1:], bootstrap[None]], 0)
  np.testing.assert_allclose(returns, reward + pcont * next_value, rtol=1e-5, atol=1e-5)


def test_lambda_return_matches_reference_outputs():
  # Outputs of the reference's own lambda_return, shipped with the reference checkpoint.
  refs = np.load(WALKER / 'refs.npz')
  r, v, p, boot = refs['in/lr_reward'], refs['in/lr_value'], refs['in/lr_pcont'], refs['in/lr_bootstrap']
  lam, discount = float(refs['in/lr_lambda']), float(refs['in/lr_discount'])
  kw = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(call_lambda_return(r, v, p, boot, lam), refs['out/lambda_return'], **kw)
  np.testing.assert_allclose(
      call_lambda_return(r, v, discount, boot, lam), refs['out/lambda_return_scalar_pcont'], **kw)
  np.testing.assert_allclose(
      call_lambda_return(r.T.copy(), v.T.copy(), p.T.copy(), boot, lam, axis=1), refs['out/lambda_return_axis1'], **kw)
  np.testing.assert_allclose(call_lambda_return(r, v, p, None, lam), refs['out/lambda_return_no_bootstrap'], **kw)


# static_scan ---------------------------------------------------------------------------------------------------------

def test_static_scan_cumulative_sum_forward_and_reverse():
  inputs = tf.constant([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])  # [T=4, B=2]
  start = tf.zeros([2])
  forward = tools.static_scan(lambda agg, x: agg + x, inputs, start)
  np.testing.assert_array_equal(forward.numpy(), np.cumsum(inputs.numpy(), 0))
  backward = tools.static_scan(lambda agg, x: agg + x, inputs, start, reverse=True)
  np.testing.assert_array_equal(backward.numpy(), np.cumsum(inputs.numpy()[::-1], 0)[::-1])
  # The start is not included, but it is where the sum begins.
  np.testing.assert_array_equal(
      tools.static_scan(lambda agg, x: agg + x, inputs, tf.constant([100.0, 0.0])).numpy()[0], [101.0, 10.0])


def test_static_scan_nested_state_and_inputs():
  x = tf.constant([1.0, 2.0, 3.0])
  y = tf.constant([2.0, 2.0, 2.0])
  start = {'sum': tf.constant(0.0), 'prod': tf.constant(1.0)}
  out = tools.static_scan(lambda s, i: {'sum': s['sum'] + i[0], 'prod': s['prod'] * i[1]}, (x, y), start)
  assert set(out) == {'sum', 'prod'}
  np.testing.assert_array_equal(out['sum'].numpy(), [1.0, 3.0, 6.0])
  np.testing.assert_array_equal(out['prod'].numpy(), [2.0, 4.0, 8.0])
  out = tools.static_scan(lambda s, i: {'sum': s['sum'] + i[0], 'prod': s['prod'] * i[1]}, (x, y), start, True)
  np.testing.assert_array_equal(out['sum'].numpy(), [6.0, 5.0, 3.0])


# TanhBijector --------------------------------------------------------------------------------------------------------

def test_tanh_bijector_inverse_clips_at_the_boundary():
  bijector = tools.TanhBijector()
  y = tf.constant([1.0, -1.0, 0.5], tf.float32)
  x = bijector.inverse(y).numpy()
  assert x.dtype == np.float32 and np.all(np.isfinite(x))
  edge = np.arctanh(np.float64(np.float32(0.99999997)))  # the clip happens in float32
  np.testing.assert_allclose(x, [edge, -edge, np.arctanh(0.5)], rtol=1e-5)
  assert 8 < edge < 10


def test_tanh_bijector_inverse_of_forward():
  bijector = tools.TanhBijector()
  x = np.linspace(-3, 3, 61).astype(np.float32)
  y = bijector.forward(x)
  np.testing.assert_allclose(y.numpy(), np.tanh(x), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(bijector.inverse(y).numpy(), x, atol=1e-4)


def test_tanh_bijector_log_det_jacobian():
  bijector = tools.TanhBijector()
  x = np.linspace(-5, 5, 41)
  ldj = bijector.forward_log_det_jacobian(tf.constant(x, tf.float32), event_ndims=0).numpy()
  a = np.abs(x)
  stable = 2 * (np.log(2) - a - np.log1p(np.exp(-2 * a)))  # = log(1 - tanh(x)^2) without cancellation
  np.testing.assert_allclose(stable, np.log(1 - np.tanh(x) ** 2), rtol=1e-9)  # same quantity, float64
  np.testing.assert_allclose(ldj, stable, rtol=1e-5, atol=1e-5)
  big = bijector.forward_log_det_jacobian(tf.constant([20.0, -20.0]), event_ndims=0).numpy()
  assert np.all(np.isfinite(big))
  np.testing.assert_allclose(big, 2 * (np.log(2) - 20.0), rtol=1e-5)


# OneHotDist ----------------------------------------------------------------------------------------------------------

LOGITS = np.array([0.5, -1.0, 0.0, 1.5], np.float32)
REWARD = np.array([1.0, -2.0, 0.5, 3.0], np.float32)  # f(k) for each class k: any function of the index.


def categorical_objective_gradient(gradient, n, seed=None):
  """The gradient w.r.t. shared logits of mean_i f(a_i) = mean_i a_i . REWARD over n one-hot samples, and the
  sampled indices."""
  logits = tf.Variable(LOGITS)
  with tf.GradientTape() as tape:
    dist = tools.OneHotDist(tf.broadcast_to(logits, [n, len(LOGITS)]), gradient=gradient)
    sample = dist.sample(seed=seed)
    objective = tf.reduce_mean(tf.reduce_sum(sample * REWARD, -1))
  return tape.gradient(objective, logits).numpy(), sample.numpy()


@pytest.mark.parametrize('seed', [None, (3, 4)], ids=['stateful', 'stateless'])
def test_onehot_score_gradient_is_the_exact_gradient_in_expectation(seed):
  """E_k[f(k)] with k ~ softmax(logits) has the gradient p_j (f(j) - E f). The score-function estimate, a mean of
  f(k) (e_k - p) over 200000 draws (per-draw std at most about 3, so the standard error is below 0.007), must be
  within 0.03 of it, for the stateful draws of acting and the stateless Gumbel-max draws of the train step."""
  tf.random.set_seed(0)
  n = 200000
  seed = None if seed is None else tf.constant(seed, tf.int64)
  estimate, sample = categorical_objective_gradient('score', n, seed)
  assert set(np.unique(sample)) == {0.0, 1.0} and np.all(sample.sum(-1) == 1)  # Values stay one-hot.
  p = np.exp(LOGITS) / np.exp(LOGITS).sum()
  exact = p * (REWARD - (p * REWARD).sum())
  np.testing.assert_allclose(sample.mean(0), p, atol=0.005)
  np.testing.assert_allclose(estimate, exact, atol=0.03)


def test_onehot_score_per_sample_gradient_and_same_draws_as_straight():
  """Per row, the gradient is f(k) grad log p(k) = f(k) (e_k - p) (no baseline), unlike the straight-through
  gradient of sum(p * f); with one seed both estimators draw the same actions."""
  rng = np.random.RandomState(0)
  logits = tf.Variable(rng.normal(size=(64, 4)).astype(np.float32))
  seed = tf.constant([5, 6], tf.int64)
  grads, samples = {}, {}
  for gradient in ('score', 'straight'):
    with tf.GradientTape() as tape:
      samples[gradient] = tools.OneHotDist(logits, gradient=gradient).sample(seed=seed)
      objective = tf.reduce_sum(samples[gradient] * REWARD)
    grads[gradient] = tape.gradient(objective, logits).numpy()
  np.testing.assert_array_equal(samples['score'].numpy(), samples['straight'].numpy())
  a = samples['score'].numpy()
  p = tf.nn.softmax(logits).numpy()
  np.testing.assert_allclose(grads['score'], (a @ REWARD)[:, None] * (a - p), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads['straight'], p * (REWARD - (p * REWARD).sum(-1, keepdims=True)), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(NotImplementedError):
    tools.OneHotDist(logits, gradient='gumbel')


# Episodes on disk ----------------------------------------------------------------------------------------------------

def make_episode(length, ident=0, seed=0):
  """An episode whose rewards read `1000 * ident + step`, so windows can be traced back."""
  rng = np.random.RandomState(seed)
  return {
      'image': rng.randint(0, 256, size=(length, 4, 4, 3)).astype(np.uint8),
      'action': rng.uniform(-1, 1, size=(length, 2)).astype(np.float32),
      'reward': (1000 * ident + np.arange(length)).astype(np.float32),
      'discount': np.ones(length, np.float16),
  }


def test_save_and_count_episodes_round_trip(tmp_path):
  directory = tmp_path / 'a' / 'episodes'  # created on demand
  episodes = [make_episode(5, 0, seed=0), make_episode(8, 1, seed=1), make_episode(2, 2, seed=2)]
  filenames = tools.save_episodes(directory, episodes)
  assert len(filenames) == 3
  names = sorted(os.listdir(directory))
  assert len(names) == 3 and not any(name.endswith('.tmp') for name in names)
  for filename, episode in zip(filenames, episodes):
    match = EPISODE_NAME.match(pathlib.Path(filename).name)
    assert match, filename
    assert int(match.group(1)) == len(episode['reward'])
    with np.load(filename) as data:
      assert set(data.keys()) == set(episode)
      for key, value in episode.items():
        assert data[key].dtype == value.dtype and data[key].shape == value.shape
        np.testing.assert_array_equal(data[key], value)
    loaded = tools.load_episode(filename)
    np.testing.assert_array_equal(loaded['image'], episode['image'])
  assert tools.count_episodes(directory) == (3, 4 + 7 + 1)
  tools.save_episodes(directory, [make_episode(10, 3)])
  assert tools.count_episodes(directory) == (4, 4 + 7 + 1 + 9)
  assert tools.count_episodes(tmp_path / 'empty') == (0, 0)


def test_load_episodes_windows(tmp_path):
  length = 5
  totals = {0: 3, 1: 5, 2: 6, 3: 20}  # 0 and 1 are too short: a window needs length + 1 steps
  tools.save_episodes(tmp_path, [make_episode(n, ident) for ident, n in totals.items()])
  generator = tools.load_episodes(tmp_path, rescan=10, length=length, seed=0)
  seen = {}
  for _ in range(200):
    window = next(generator)
    assert set(window) == {'image', 'action', 'reward', 'discount'}
    assert all(len(v) == length for v in window.values())
    ident, start = divmod(int(window['reward'][0]), 1000)
    np.testing.assert_array_equal(window['reward'], 1000 * ident + start + np.arange(length))
    assert ident in (2, 3), ident
    assert 0 <= start <= totals[ident] - length
    seen.setdefault(ident, set()).add(start)
  assert set(seen) == {2, 3}
  assert len(seen[3]) > 5  # windows start at different places


def test_load_episodes_whole_episodes_and_rescan(tmp_path):
  tools.save_episodes(tmp_path, [make_episode(4, 0)])
  generator = tools.load_episodes(tmp_path, rescan=3)
  for _ in range(3):
    episode = next(generator)
    assert len(episode['reward']) == 4  # length=None yields whole episodes
  tools.save_episodes(tmp_path, [make_episode(6, 1)])
  lengths = {len(next(generator)['reward']) for _ in range(60)}
  assert lengths == {4, 6}  # the new file is found on the next scan


def test_load_episodes_balance_reaches_the_end(tmp_path):
  length, total = 5, 20
  tools.save_episodes(tmp_path, [make_episode(total, 0)])
  generator = tools.load_episodes(tmp_path, rescan=50, length=length, balance=True, seed=1)
  starts = [int(next(generator)['reward'][0]) for _ in range(400)]
  assert min(starts) >= 0 and max(starts) == total - length
  # min(randint(0, total), total - length) puts about length / total of the windows at the end.
  assert 0.15 < np.mean(np.array(starts) == total - length) < 0.35


def test_load_episodes_skips_unreadable_files(tmp_path, capsys):
  good = tools.save_episodes(tmp_path, [make_episode(10, 1), make_episode(10, 2)])
  corrupt = tmp_path / f'20200101T000000-{"a" * 32}-10.npz'
  corrupt.write_bytes(np.random.RandomState(0).bytes(3000))
  truncated = tmp_path / f'20200101T000000-{"b" * 32}-10.npz'
  data = tools.save_episodes(tmp_path / 'other', [make_episode(10, 3)])[0].read_bytes()
  truncated.write_bytes(data[:len(data) // 2])
  generator = tools.load_episodes(tmp_path, rescan=4, length=4, seed=0)
  idents = {int(next(generator)['reward'][0]) // 1000 for _ in range(40)}  # ten rescans
  assert idents == {1, 2}
  err = capsys.readouterr().err
  assert str(corrupt) in err and str(truncated) in err
  assert err.count(str(corrupt)) == 1 and err.count(str(truncated)) == 1  # reported once
  assert not any(str(name) in err for name in good)


def test_an_unreadable_episode_is_read_again_after_the_next_rescan(tmp_path, monkeypatch, capsys):
  """A file that fails once (here: half written by another process) is tried again once per rescan, not at every
  draw, and is drawn as soon as it reads."""
  tools.save_episodes(tmp_path, [make_episode(10, 1)])
  late = tools.save_episodes(tmp_path / 'other', [make_episode(10, 2)])[0]
  target = tmp_path / late.name
  target.write_bytes(late.read_bytes()[:500])
  reads = []
  real_load = tools.load_episode
  monkeypatch.setattr(tools, 'load_episode', lambda f: reads.append(f) or real_load(f))
  generator = tools.load_episodes(tmp_path, rescan=20, length=4, seed=0)
  idents = [int(next(generator)['reward'][0]) // 1000 for _ in range(30)]
  assert set(idents) == {1}
  # 30 windows take at least two scans of 20 draws (about three, as half the draws land on the unreadable file,
  # some 30 draws): it was read once per scan, not once per draw.
  assert 2 <= reads.count(target) <= 4, reads.count(target)
  err = capsys.readouterr().err
  assert err.count(str(target)) == 1 and '(1 unreadable)' in err  # Warned once.
  target.write_bytes(late.read_bytes())  # The file is whole now.
  idents = [int(next(generator)['reward'][0]) // 1000 for _ in range(30)]
  assert 2 in idents
  assert f'Episode file {target} is readable again (0 unreadable).' in capsys.readouterr().err


def test_load_episodes_without_readable_files_raises(tmp_path):
  (tmp_path / f'20200101T000000-{"c" * 32}-10.npz').write_bytes(b'not an npz')
  with pytest.raises(RuntimeError):
    next(tools.load_episodes(tmp_path, rescan=2))


def test_load_episodes_same_seed_same_windows(tmp_path):
  tools.save_episodes(tmp_path, [make_episode(n, i) for i, n in enumerate([12, 30, 9])])
  draw = lambda seed: [
      tuple(w['reward']) for w, _ in zip(tools.load_episodes(tmp_path, rescan=7, length=4, seed=seed), range(50))]
  assert draw(3) == draw(3)
  assert draw(3) != draw(4)


# Checkpoint files ----------------------------------------------------------------------------------------------------

class _RunsCode:

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.system, (f'touch {self.target}',)


def test_checkpoint_round_trip(tmp_path):
  values = (
      np.int64(2000), np.arange(6, dtype=np.float32).reshape(2, 3), np.array(3, np.int64),
      np.random.RandomState(0).normal(size=(4, 5)).astype(np.float16), np.zeros((2, 0), np.float32))
  path = tmp_path / 'variables.pkl'
  tools.write_checkpoint(path, values)
  assert os.listdir(tmp_path) == ['variables.pkl']  # no temporary file left
  with path.open('rb') as f:
    assert isinstance(pickle.load(f), tuple)  # the reference's format: a pickled tuple of arrays
  loaded = tools.read_checkpoint(path)
  assert len(loaded) == len(values)
  for got, want in zip(loaded, values):
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want)
    np.testing.assert_array_equal(got, want)
  assert loaded[0].dtype == np.int64 and loaded[0].shape == () and loaded[0] == 2000
  tools.write_checkpoint(path, [np.ones(2)])  # overwrites
  assert len(tools.read_checkpoint(path)) == 1


def test_checkpoint_refuses_code(tmp_path):
  # Control: the payload does run under a plain pickle.load.
  control = tmp_path / 'CONTROL'
  pickle.loads(pickle.dumps(_RunsCode(control)))
  assert control.exists()
  target = tmp_path / 'SOMEFILE'
  path = tmp_path / 'variables.pkl'
  path.write_bytes(pickle.dumps((np.zeros(3), _RunsCode(target)), protocol=4))
  with pytest.raises(tools.CheckpointError):
    tools.read_checkpoint(path)
  assert not target.exists()


@pytest.mark.parametrize('content', [{'a': np.zeros(2)}, [np.zeros(2), 'text'], np.zeros(2)])
def test_checkpoint_refuses_non_array_lists(tmp_path, content):
  path = tmp_path / 'variables.pkl'
  path.write_bytes(pickle.dumps(content, protocol=4))
  with pytest.raises(tools.CheckpointError):
    tools.read_checkpoint(path)


def test_checkpoint_truncated_or_missing(tmp_path):
  path = tmp_path / 'variables.pkl'
  tools.write_checkpoint(path, [np.arange(1000, dtype=np.float32), np.int64(5)])
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(tools.CheckpointError):
    tools.read_checkpoint(path)
  path.write_bytes(b'')
  with pytest.raises(tools.CheckpointError):
    tools.read_checkpoint(path)
  with pytest.raises(tools.CheckpointError):
    tools.read_checkpoint(tmp_path / 'missing.pkl')


def test_checkpoint_accepts_numpy1_spelling(tmp_path):
  # Files written under numpy 1.x refer to numpy.core.multiarray instead of numpy._core.multiarray.
  values = (np.arange(3, dtype=np.float32), np.int64(7))
  data = pickle.dumps(values, protocol=3)  # protocol 3: GLOBAL opcodes with newline-terminated names
  old = data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')
  assert old != data
  path = tmp_path / 'variables.pkl'
  path.write_bytes(old)
  loaded = tools.read_checkpoint(path)
  np.testing.assert_array_equal(loaded[0], values[0])
  assert loaded[1] == 7 and loaded[1].dtype == np.int64


def test_read_reference_checkpoint():
  values = tools.read_checkpoint(WALKER / 'variables.pkl')
  rows = read_order('default')
  assert len(values) == len(rows) == 82
  for value, (index, name, shape, dtype) in zip(values, rows):  # As the reference's variable table says.
    assert value.shape == shape and str(value.dtype) == dtype, (index, name, value.shape, value.dtype)
  assert values[0].shape == () and values[0].dtype == np.int64


# Schedules -----------------------------------------------------------------------------------------------------------

def test_every():
  every = tools.Every(10)
  assert [every(step) for step in (0, 5, 9, 10, 19, 20, 21)] == [True, False, False, True, False, True, False]
  every = tools.Every(10)
  assert every(7)  # the first call fires and sets the phase
  assert [every(step) for step in (16, 17, 26, 27)] == [False, True, False, True]
  # After a jump the schedule advances by one period per call until it has caught up (as in the reference).
  every = tools.Every(10)
  assert [every(step) for step in (0, 35, 35, 35, 35)] == [True, True, True, True, False]


@pytest.mark.parametrize('step, expected', [(0, 0.4), (7.5e5, 0.325), (1.5e6, 0.25), (2.25e6, 0.175),
                                             (3e6, 0.1), (9e6, 0.1)])
def test_exploration_linear_by_hand_and_the_papers_formula(step, expected):
  """0.4 to 0.1 over 3e6 env steps. The paper's code: 0.4 * max(0.25, 1 - s / 1e7) at trainer step s, 10 per agent
  step, i.e. s = 2.5 env steps at action repeat 4."""
  amount = tools.exploration_amount(step, 0.4, 3e6, 0.1, 'linear')
  assert amount == pytest.approx(expected, abs=1e-12)
  assert amount == pytest.approx(0.4 * max(0.25, 1 - 2.5 * step / 1e7), abs=1e-12)


def test_exploration_halving_and_no_decay():
  halving = lambda step: tools.exploration_amount(step, 0.4, 1e6, 0.1)
  assert [halving(s) for s in (0, 1e6, 2e6, 3e6)] == pytest.approx([0.4, 0.2, 0.1, 0.1], abs=1e-12)
  assert halving(5e5) == pytest.approx(0.4 / 2 ** 0.5, abs=1e-12)
  for schedule in ('halving', 'linear'):  # decay 0: constant, as the DMC default (0.3, no decay, no floor).
    assert tools.exploration_amount(5e6, 0.3, 0.0, 0.0, schedule) == 0.3
  assert tools.exploration_amount(1.5e6, 0.4, 3e6, 0.0, 'linear') == pytest.approx(0.2, abs=1e-12)
  with pytest.raises(NotImplementedError):
    tools.exploration_amount(0, 0.4, 1e6, 0.1, 'cosine')


# GIFs ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('channels', [3, 1])
def test_encode_gif(channels):
  frames = np.random.RandomState(0).randint(0, 256, size=(5, 16, 12, channels)).astype(np.uint8)
  data = tools.encode_gif(frames, fps=20)
  assert isinstance(data, bytes) and data.startswith(b'GIF8')
  decoded = iio.imread(data, extension='.gif', index=None)
  assert decoded.shape[:3] == (5, 16, 12)


def test_load_episodes_with_only_files_shorter_than_their_names_raises(tmp_path, capsys):
  """A file whose name promises more steps than it holds is skipped with a warning; with nothing else the
  generator raises instead of drawing forever."""
  short = tools.save_episodes(tmp_path / 'other', [make_episode(6, 1)])[0]
  (tmp_path / short.name.replace('-6.npz', '-20.npz')).write_bytes(short.read_bytes())
  with pytest.raises(tools.NoEpisodesError):
    next(tools.load_episodes(tmp_path, rescan=3, length=10))
  assert 'holds 6 steps, fewer than its name says' in capsys.readouterr().err


def test_a_replay_of_only_short_episodes_says_how_long_they_are(tmp_path):
  """Episodes that all end before a training window fits (a task whose random episodes end within a few steps):
  the error says how long the stored ones are and which --batch_length would fit."""
  tools.save_episodes(tmp_path, [make_episode(8, 1), make_episode(12, 2)])
  with pytest.raises(tools.NoEpisodesError, match=r'2 stored episodes are at most 12 steps long .*--batch_length '
                     r'below 12'):
    next(tools.load_episodes(tmp_path, rescan=3, length=20))
  assert len(next(tools.load_episodes(tmp_path, rescan=3, length=11))['reward']) == 11
