"""The value estimates of the imagined states (tools.nstep_return, tools.value_estimate): the paper's V_N^k, V_R and
V_lambda, against cases worked out by hand and an independent numpy loop over the definitions."""

import numpy as np
import pytest
import tensorflow as tf

import tools


def np_nstep(reward, value, pcont, bootstrap, k):
  """V_N^k straight from its definition, one state at a time: the discounted sum of the rewards up to
  h = min(t + k, T), plus the discounted value at h (v_T = bootstrap)."""
  reward, value, pcont = (np.asarray(x, np.float64) for x in (reward, value, pcont))
  values = np.concatenate([value, np.asarray(bootstrap, np.float64)[None]], 0)
  T = len(reward)
  returns = np.zeros_like(reward)
  for t in range(T):
    h = min(t + k, T)
    discount = np.ones(reward.shape[1:])
    for n in range(t, h):
      returns[t] += discount * reward[n]
      discount = discount * pcont[n]
    returns[t] += discount * values[h]
  return returns


def np_reward_sum(reward, pcont):
  """V_R as the paper's code computes it over all H steps: sum_{n >= t} (p_t ... p_{n-1}) r_n, no value."""
  reward, pcont = np.asarray(reward, np.float64), np.asarray(pcont, np.float64)
  returns = np.zeros_like(reward)
  for t in range(len(reward)):
    discount = np.ones(reward.shape[1:])
    for n in range(t, len(reward)):
      returns[t] += discount * reward[n]
      discount = discount * pcont[n]
  return returns


def random_imagination(H=6, N=3, seed=0):
  """reward, value, pcont [H, N] float32, as Dreamer's _behavior has them."""
  rng = np.random.RandomState(seed)
  reward = rng.normal(size=(H, N)).astype(np.float32)
  value = rng.normal(size=(H, N)).astype(np.float32)
  pcont = rng.uniform(0.5, 1.0, size=(H, N)).astype(np.float32)
  return reward, value, pcont


def estimate(kind, reward, value, pcont, lambda_=0.95, nstep=None):
  as_tensor = lambda x: None if x is None else tf.constant(x)
  returns = tools.value_estimate(kind, as_tensor(reward), as_tensor(value), as_tensor(pcont), lambda_, nstep)
  H, N = reward.shape
  assert returns.dtype == tf.float32 and returns.shape == (H - 1, N), (returns.dtype, returns.shape)
  return returns.numpy()


# The numpy helpers themselves, on cases worked out on paper -----------------------------------------------------------

def test_np_helpers_by_hand():
  # T = 3 steps, one column; r = 1, 2, 3; v = 10, 20, 30; bootstrap 40; p = 0.5, 0.5, 0.5.
  r, v, p, boot = [[1.0], [2.0], [3.0]], [[10.0], [20.0], [30.0]], [[0.5]] * 3, [40.0]
  np.testing.assert_allclose(np_nstep(r, v, p, boot, 1)[:, 0], [1 + 0.5 * 20, 2 + 0.5 * 30, 3 + 0.5 * 40])
  two = [1 + 0.5 * 2 + 0.25 * 30, 2 + 0.5 * 3 + 0.25 * 40, 3 + 0.5 * 40]
  np.testing.assert_allclose(np_nstep(r, v, p, boot, 2)[:, 0], two)
  np.testing.assert_allclose(np_reward_sum(r, p)[:, 0], [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3])


# V_N^k ----------------------------------------------------------------------------------------------------------------

def test_nstep_one_step_by_hand():
  # H = 3 imagined states: the estimates of the first two, bootstrapped with the last value 7.
  reward = np.array([[1.0], [2.0], [100.0]], np.float32)
  value = np.array([[5.0], [6.0], [7.0]], np.float32)
  pcont = np.array([[0.5], [0.25], [0.9]], np.float32)
  returns = estimate('nstep', reward, value, pcont, nstep=1)
  np.testing.assert_allclose(returns[:, 0], [1 + 0.5 * 6, 2 + 0.25 * 7])


def test_nstep_full_horizon_by_hand():
  reward = np.array([[1.0], [2.0], [100.0]], np.float32)
  value = np.array([[5.0], [6.0], [7.0]], np.float32)
  pcont = np.array([[0.5], [0.25], [0.9]], np.float32)
  expected = [1 + 0.5 * 2 + 0.5 * 0.25 * 7, 2 + 0.25 * 7]  # The last reward and pcont are not used.
  for k in (2, 3, 50):  # k >= H - 1 reaches the horizon from every state.
    np.testing.assert_allclose(estimate('nstep', reward, value, pcont, nstep=k)[:, 0], expected)


@pytest.mark.parametrize('k', [1, 2, 3, 5, 6])
def test_nstep_against_numpy(k):
  reward, value, pcont = random_imagination(H=7, N=4, seed=k)
  expected = np_nstep(reward[:-1], value[:-1], pcont[:-1], value[-1], k)
  np.testing.assert_allclose(estimate('nstep', reward, value, pcont, nstep=k), expected, rtol=1e-5, atol=1e-5)


def test_nstep_scalar_pcont():
  reward, value, _ = random_imagination(H=5, N=2, seed=3)
  returns = tools.nstep_return(tf.constant(reward), tf.constant(value), 0.9, tf.constant(value[-1]), 2)
  expected = np_nstep(reward, value, np.full_like(reward, 0.9), value[-1], 2)
  np.testing.assert_allclose(returns.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_nstep_needs_a_step():
  reward, value, pcont = random_imagination()
  for nstep in (0, None):
    with pytest.raises(ValueError, match='nstep'):
      estimate('nstep', reward, value, pcont, nstep=nstep)


def test_nstep_gradients_reach_reward_value_and_pcont():
  reward, value, pcont = (tf.Variable(x) for x in random_imagination(H=4, N=2, seed=4))
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tools.value_estimate('nstep', reward, value, pcont, 0.95, 2))
  grads = tape.gradient(loss, [reward, value, pcont])
  # H = 4, k = 2: R_0 bootstraps from v_2, R_1 and R_2 from v_3 (the horizon), so v_0 and v_1 never enter; the
  # last reward and pcont belong to the bootstrap state and never enter either.
  assert grads[0].numpy()[0, 0] == 1.0 and grads[0].numpy()[:-1].all() and not grads[0].numpy()[-1].any()
  assert not grads[1].numpy()[:2].any() and grads[1].numpy()[2:].all()
  assert grads[2].numpy()[:-1].all() and not grads[2].numpy()[-1].any()


# V_R ------------------------------------------------------------------------------------------------------------------

def test_reward_sum_by_hand():
  # Every reward up to and including the last imagined one, discounted by pcont; no value at all.
  reward = np.array([[1.0], [2.0], [4.0]], np.float32)
  pcont = np.array([[0.5], [0.25], [0.9]], np.float32)
  returns = estimate('reward', reward, None, pcont)
  np.testing.assert_allclose(returns[:, 0], [1 + 0.5 * 2 + 0.5 * 0.25 * 4, 2 + 0.25 * 4])


def test_reward_sum_against_numpy_and_ignores_value():
  reward, value, pcont = random_imagination(H=8, N=3, seed=5)
  expected = np_reward_sum(reward, pcont)[:-1]  # The paper's code also has R_{H-1} = r_{H-1}; here [H-1, N].
  np.testing.assert_allclose(estimate('reward', reward, None, pcont), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(estimate('reward', reward, value, pcont), estimate('reward', reward, None, pcont))


def test_reward_sum_with_discount_one_is_plain_sum():
  reward, _, _ = random_imagination(H=5, N=2, seed=6)
  expected = np.cumsum(reward[::-1].astype(np.float64), 0)[::-1][:-1]
  np.testing.assert_allclose(estimate('reward', reward, None, np.ones_like(reward)), expected, rtol=1e-5, atol=1e-5)


# V_lambda -------------------------------------------------------------------------------------------------------------

def test_lambda_is_todays_call_bit_for_bit():
  reward, value, pcont = (tf.constant(x) for x in random_imagination(H=15, N=5, seed=7))
  today = tools.lambda_return(reward[:-1], value[:-1], pcont[:-1], bootstrap=value[-1], lambda_=0.95, axis=0)
  returns = tools.value_estimate('lambda', reward, value, pcont, 0.95)
  np.testing.assert_array_equal(returns.numpy(), today.numpy())


@pytest.mark.parametrize('lambda_, k', [(0.0, 1), (1.0, 5)])
def test_lambda_limits_are_nstep(lambda_, k):
  # lambda 0 is the one-step estimate V_N^1, lambda 1 the estimate to the horizon V_N^{H-1} (H = 6 here).
  reward, value, pcont = random_imagination(H=6, N=4, seed=8)
  lam = estimate('lambda', reward, value, pcont, lambda_=lambda_)
  np.testing.assert_allclose(lam, estimate('nstep', reward, value, pcont, nstep=k), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lam, np_nstep(reward[:-1], value[:-1], pcont[:-1], value[-1], k), rtol=1e-5, atol=1e-5)


def test_lambda_is_weighted_average_of_nstep():
  # The paper's definition: V_lambda = (1 - lambda) sum_{n=1}^{T-1} lambda^{n-1} V_N^n + lambda^{T-1} V_N^T, over
  # the T = H - 1 steps before the bootstrap.
  reward, value, pcont = random_imagination(H=6, N=3, seed=9)
  lambda_, T = 0.7, 5
  nstep = [np_nstep(reward[:-1], value[:-1], pcont[:-1], value[-1], n) for n in range(1, T + 1)]
  expected = (1 - lambda_) * sum(lambda_ ** (n - 1) * nstep[n - 1] for n in range(1, T))
  expected += lambda_ ** (T - 1) * nstep[-1]
  # Only the first state sees the whole horizon; later ones weight their shorter estimates the same way.
  np.testing.assert_allclose(estimate('lambda', reward, value, pcont, lambda_=lambda_)[0], expected[0], rtol=1e-5)


def test_unknown_kind():
  reward, value, pcont = random_imagination()
  with pytest.raises(NotImplementedError, match='lambda, nstep, reward'):
    estimate('mc', reward, value, pcont)
