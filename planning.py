"""Online planning on the learned model: PlaNet's cross-entropy method (the paper's `--behavior cem` baseline).

Follows the paper's code (google-research/dreamer, control/planning.py `cross_entropy_method`, scored by
scripts/objectives.py `reward`, run by control/mpc_agent.py): from each current latent state, `candidates` action
sequences of `horizon` steps are drawn from a diagonal Normal (mean 0, std 1 at the start) and clipped to [-1, 1];
the dynamics roll them forward open loop (img_step: the prior, with its sampled stoch, as the paper's cell did);
each sequence scores the undiscounted sum of the reward head's predictions on the states it reaches; the Normal is
refit (mean, std over the time steps and action dimensions) to the `topk` best, `iterations` times. The agent
executes the first action of the final mean.
"""

import tensorflow as tf

import tools


def cross_entropy_method(dynamics, reward, state, action_size, horizon=12, candidates=1000, topk=100,
                         iterations=10, seed=None, min_action=-1.0, max_action=1.0):
  """Plans from a batch of latent states and returns (action [N, A], planned_return [N]), float32.

  dynamics: has img_step(state, action, seed) -> state and get_feat(state) -> [..., F] (models.RSSM).
  reward: feat [M, F] -> a distribution whose mode() is the predicted reward [M] (models.DenseDecoder).
  state: dict of [N, ...] tensors, one latent state per environment (the posterior after the last observation).
  seed: None samples statefully; a [2] int seed draws every sample statelessly, so the plan is a function of the
    seed: iteration i draws its candidates from fold(fold(seed, i), 0) and passes fold(fold(seed, i), 1) to the
    dynamics (step t: fold(that, t), as RSSM.imagine does); tools.ZERO_NOISE sets every draw to its noise-free
    value (then all candidates are the mean: only for comparisons).
  planned_return: the mean predicted return of the `topk` best sequences of the last iteration.

  Each environment's candidates form one block of the [N * candidates] rollout batch (environment-major on both the
  states and the actions; the paper's code tiled the states candidate-major but reshaped the actions
  environment-major, which only agrees for one environment). No gradients flow through the plan.
  """
  if topk > candidates:
    raise ValueError(f'CEM keeps the topk={topk} best of candidates={candidates}: topk cannot be larger.')
  state = tf.nest.map_structure(tf.stop_gradient, state)
  N = tf.shape(tf.nest.flatten(state)[0])[0]
  # [N * C, ...]: each state repeated for its candidates, in the order of the actions' reshape below.
  start = {k: tf.repeat(v, candidates, axis=0) for k, v in state.items()}

  def total_reward(action, seed):
    """action [N * C, H, A] -> the predicted return of each sequence [N * C]."""
    action = tf.transpose(action, [1, 0, 2])  # [H, N * C, A]
    step = lambda prev, inputs: dynamics.img_step(prev, inputs[0], tools.fold(seed, inputs[1]))
    states = tools.scan(step, (action, tf.range(horizon)), start)  # [H, N * C, ...], the states after each action.
    feat = dynamics.get_feat(states)
    feat = tf.reshape(feat, [-1, feat.shape[-1]])
    return tf.reduce_sum(tf.reshape(reward(feat).mode(), [horizon, -1]), 0)

  def iteration(index, mean, std, _):
    seed_i = tools.fold(seed, index)
    shape = tf.concat([[N, candidates], [horizon, action_size]], 0)
    action = mean[:, None] + std[:, None] * _normal(shape, tools.fold(seed_i, 0))  # [N, C, H, A]
    action = tf.clip_by_value(action, min_action, max_action)
    returns = total_reward(tf.reshape(action, [-1, horizon, action_size]), tools.fold(seed_i, 1))
    returns = tf.reshape(returns, [N, candidates])
    best_returns, best = tf.math.top_k(returns, topk, sorted=False)  # [N, K]
    elite = tf.gather(action, best, axis=1, batch_dims=1)  # [N, K, H, A]
    mean, variance = tf.nn.moments(elite, [1])
    std = tf.sqrt(variance + 1e-6)  # Keeps a collapsed belief from a zero std.
    return index + 1, mean, std, tf.reduce_mean(best_returns, 1)

  mean = tf.zeros([N, horizon, action_size])
  std = tf.ones([N, horizon, action_size])
  planned = tf.zeros([N])
  # In a traced policy N is static at the start but not after the gather of the elite: the invariants allow it.
  plan = tf.TensorShape([None, horizon, action_size])
  _, mean, _, planned = tf.while_loop(
      lambda index, *_: index < iterations, iteration, (tf.constant(0), mean, std, planned),
      shape_invariants=(tf.TensorShape([]), plan, plan, tf.TensorShape([None])))
  mean, planned = tf.stop_gradient(mean), tf.stop_gradient(planned)
  return mean[:, 0], planned


def _normal(shape, seed):
  """Standard-normal noise float32: stateful without a seed, stateless with one, zeros for tools.ZERO_NOISE."""
  if seed is None:
    return tf.random.normal(shape)
  if seed is tools.ZERO_NOISE:
    return tf.zeros(shape)
  return tf.random.stateless_normal(shape, seed)
