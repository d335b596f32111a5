"""Helpers: scans and returns, distributions, the optimizer, episodes on disk, simulation, summaries, schedules and
checkpoint files."""

import collections
import contextlib
import datetime
import io
import json
import os
import pathlib
import pickle
import re
import sys
import uuid

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability import distributions as tfd


# Scans and returns --------------------------------------------------------------------------------------------------

def scan(fn, inputs, start, reverse=False):
  """static_scan as a symbolic loop (tf.scan): the same results, but the graph holds the step once instead of once
  per index, so tracing and graph optimization of the train step take seconds instead of half a minute."""
  return tf.scan(fn, inputs, start, reverse=reverse)


def static_scan(fn, inputs, start, reverse=False):
  """Unrolled scan over the leading axis of `inputs`; returns the stacked states (the start is not included)."""
  last = start
  outputs = [[] for _ in tf.nest.flatten(start)]
  indices = range(tf.nest.flatten(inputs)[0].shape[0])
  if reverse:
    indices = reversed(indices)
  for index in indices:
    inp = tf.nest.map_structure(lambda x: x[index], inputs)
    last = fn(last, inp)
    [o.append(l) for o, l in zip(outputs, tf.nest.flatten(last))]
  if reverse:
    outputs = [list(reversed(x)) for x in outputs]
  outputs = [tf.stack(x, 0) for x in outputs]
  return tf.nest.pack_sequence_as(start, outputs)


def lambda_return(reward, value, pcont, bootstrap, lambda_, axis):
  """R_t = r_t + p_t * ((1 - lambda) * v_{t+1} + lambda * R_{t+1}), with R_T bootstrapped.

  lambda=1 gives the discounted Monte-Carlo return, lambda=0 the one-step return.
  """
  assert reward.shape.ndims == value.shape.ndims, (reward.shape, value.shape)
  if isinstance(pcont, (int, float)):
    pcont = pcont * tf.ones_like(reward)
  dims = list(range(reward.shape.ndims))
  dims = [axis] + dims[1:axis] + [0] + dims[axis + 1:]
  if axis != 0:
    reward = tf.transpose(reward, dims)
    value = tf.transpose(value, dims)
    pcont = tf.transpose(pcont, dims)
  if bootstrap is None:
    bootstrap = tf.zeros_like(value[-1])
  next_values = tf.concat([value[1:], bootstrap[None]], 0)
  inputs = reward + pcont * next_values * (1 - lambda_)
  returns = static_scan(
      lambda agg, cur: cur[0] + cur[1] * lambda_ * agg, (inputs, pcont), bootstrap, reverse=True)
  if axis != 0:
    returns = tf.transpose(returns, dims)
  return returns


def nstep_return(reward, value, pcont, bootstrap, steps):
  """The paper's V_N^k, time-major: reward, value, pcont [T, ...], bootstrap [...] (the value after the last
  step) -> [T, ...] with

    R_t = sum_{n=t}^{h-1} (p_t ... p_{n-1}) r_n + (p_t ... p_{h-1}) v_h,   h = min(t + steps, T),  v_T = bootstrap,

  so every estimate is cut at the horizon and bootstrapped there. steps=1 is lambda_return at lambda 0, steps >= T
  the one at lambda 1. Built as `steps` backups R <- r + p * R[1:] of the values, each one step deeper."""
  assert reward.shape.ndims == value.shape.ndims, (reward.shape, value.shape)
  assert steps >= 1, steps
  if isinstance(pcont, (int, float)):
    pcont = pcont * tf.ones_like(reward)
  if reward.shape[0] is not None:
    steps = min(steps, reward.shape[0])  # Deeper backups change nothing: the horizon cuts them.
  returns = tf.concat([value, bootstrap[None]], 0)  # [T + 1, ...], the 0-step estimates.
  for _ in range(steps):
    returns = tf.concat([reward + pcont * returns[1:], bootstrap[None]], 0)
  return returns[:-1]


VALUE_ESTIMATES = ('lambda', 'nstep', 'reward')


def value_estimate(kind, reward, value, pcont, lambda_, nstep=None):
  """The value estimate of the imagined states that the actor maximizes and the value model regresses (the paper's
  V_lambda, V_N^k and V_R). reward, value, pcont: [H, N] over the H imagined states, time-major (value may be None
  for 'reward'); returns [H-1, N] float32 for the first H-1 states, the last one serving as the bootstrap.

  lambda: lambda_return(reward[:-1], value[:-1], pcont[:-1], bootstrap=value[-1], lambda_) exactly as Dreamer calls it.
  nstep:  nstep_return with k = `nstep` on the same arguments.
  reward: no value model: R_t = sum_{n=t}^{H-1} (p_t ... p_{n-1}) r_n, every reward up to the horizon including the
          last one, discounted by pcont. That is the paper's code (scripts/configs.py `actor`: no value head;
          training/utility.py compute_action_values then returns control.discounted_return(reward, pcont)
          with pcont = action_discount (0.99) or the pcont head's mean, no bootstrap); the paper's text writes the
          sum undiscounted. The paper's code also keeps R_{H-1} = r_{H-1} as an [H]-th entry and does not weight
          these returns by the cumulative discount; here the shape stays [H-1, N] like the other estimates.
  """
  if kind == 'lambda':
    return lambda_return(reward[:-1], value[:-1], pcont[:-1], bootstrap=value[-1], lambda_=lambda_, axis=0)
  if kind == 'nstep':
    if not nstep or nstep < 1:
      raise ValueError(f'The n-step value estimate needs nstep >= 1, got {nstep}.')
    return nstep_return(reward[:-1], value[:-1], pcont[:-1], bootstrap=value[-1], steps=nstep)
  if kind == 'reward':
    # lambda 1 leaves the values out; bootstrapping with the last reward adds it to every return.
    return lambda_return(
        reward[:-1], tf.zeros_like(reward[:-1]), pcont[:-1], bootstrap=reward[-1], lambda_=1.0, axis=0)
  raise NotImplementedError(f"Unknown value estimate '{kind}'. Choose one of: {', '.join(VALUE_ESTIMATES)}.")



# Contrastive representation -----------------------------------------------------------------------------------------

def contrastive_loss(mean, std, feat, batch_amount=10, time_amount=30):
  """The paper's NCE objective for a world model without a decoder, as its code computes it (training/utility.py
  compute_cpc_loss with the default cpc_contrast 'window', cpc_batch_amount 10, cpc_time_amount 30).

  mean, std [B, T, F] float32: the state model q(feat | embed) of each step (models.StateModel on the embedding).
  feat [B, T, F]: the posterior features of the same steps (any float dtype; scored in float32).
  The score of a pair is log q(feat' | embed) = log Normal(feat'; mean, std) summed over F. Each step (b, t)
  contrasts its own feature with those of the steps (b - i, t - j) (cyclically) for the window of batch shifts i in
  [-bb // 2, bb - bb // 2) and time shifts j in [-tt // 2, tt - tt // 2), bb = min(batch_amount, B),
  tt = min(time_amount, T); the window includes the step itself. Per step:
    objective = score(own feature) - logsumexp over the window of score(feature),
  so the contrast is over states for a fixed observation (the paper's text writes the sum over observations for a
  fixed state; the code, followed here, sums over states). The paper's code asserts the amounts fit the batch;
  clamping them instead uses every step of a small batch (4 x 20 contrasts each step with all 80) and never counts
  a step twice. Under a distribution strategy the negatives come from the replica's own part of the batch.

  Returns (loss, accuracy), float32 scalars: loss = -mean(objective); accuracy = the fraction of steps whose own
  feature scores highest in their window (not in the paper's code; a diagnostic). Gradients reach mean, std and
  feat. Computed as one [BT, BT] matrix of scores (three matmuls) instead of the code's loop over rolled copies;
  the own scores are computed directly, so they are exact.
  """
  B, T, F = feat.shape
  assert B is not None and T is not None and F is not None, feat.shape  # The window is built in numpy.
  assert mean.shape == std.shape == (B, T, F), (mean.shape, std.shape, feat.shape)
  feat = tf.reshape(tf.cast(feat, tf.float32), [B * T, F])
  mean, std = tf.reshape(mean, [B * T, F]), tf.reshape(std, [B * T, F])
  # log N(x_j; m_i, s_i) = -1/2 sum_f (x_jf - m_if)^2 / s_if^2 - sum_f log s_if - F/2 log 2 pi, the square expanded
  # so that every pair (i, j) comes from matmuls: [BT, BT], rows the state models, columns the features.
  precision = 1 / tf.square(std)
  square = (tf.matmul(precision, tf.square(feat), transpose_b=True)
            - 2 * tf.matmul(precision * mean, feat, transpose_b=True)
            + tf.reduce_sum(precision * tf.square(mean), -1, keepdims=True))
  norm = -tf.reduce_sum(tf.math.log(std), -1, keepdims=True) - 0.5 * F * np.log(2 * np.pi)
  positive = tf.reduce_sum(tfd.Normal(mean, std).log_prob(feat), -1)  # [BT]
  score = tf.linalg.set_diag(norm - 0.5 * square, positive)
  window = tf.constant(_contrast_window(B, T, batch_amount, time_amount))
  score = tf.where(window, score, -np.inf)
  objective = positive - tf.reduce_logsumexp(score, -1)
  loss = -tf.reduce_mean(objective)
  accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(score, -1, output_type=tf.int32), tf.range(B * T)), tf.float32))
  return loss, accuracy


def _contrast_window(B, T, batch_amount, time_amount):
  """bool [B * T, B * T]: whether step j = (b', t') is in the window of step i = (b, t), that is b - b' and t - t'
  (mod B, T) are among the shifts of compute_cpc_loss's rolls (see contrastive_loss)."""
  def axis(size, amount):
    amount = min(amount, size)
    shifts = (np.arange(amount) - amount // 2) % size
    delta = (np.arange(size)[:, None] - np.arange(size)[None]) % size
    return np.isin(delta, shifts)
  window = axis(B, batch_amount)[:, None, :, None] & axis(T, time_amount)[None, :, None, :]
  return window.reshape(B * T, B * T)

# Distributions ------------------------------------------------------------------------------------------------------

class _ZeroNoise:
  """The seed of a noise-free train step: every draw takes its noise-free value at the draw (an RSSM sample is
  its mean, a tanh-normal action tanh(loc), a one-hot action the argmax with its straight-through term), so two
  implementations of the step can agree to float rounding (compare.py, tests/test_train_step.py)."""

  def __repr__(self):
    return 'ZERO_NOISE'


ZERO_NOISE = _ZeroNoise()


def fold(seed, index):
  """A new stateless seed [2] from `seed` and an int; None (stateful sampling) and ZERO_NOISE stay as they are."""
  if seed is None or seed is ZERO_NOISE:
    return seed
  return tf.random.experimental.stateless_fold_in(seed, index)


def replica_noise(shape, seed, kind='normal'):
  """Stateless noise of `shape` = [local batch, ...] for this replica's rows of the global batch.

  The noise of the whole global batch is drawn from `seed` and this replica keeps its rows, so a train step split
  over any number of replicas (which split the global batch in order) samples exactly what one device does.
  """
  if seed is ZERO_NOISE:  # The noise-free value of a normal draw; a uniform one is only drawn for Gumbel noise.
    assert kind == 'normal', kind
    return tf.zeros(shape)
  draw = dict(normal=tf.random.stateless_normal, uniform=tf.random.stateless_uniform)[kind]
  ctx = tf.distribute.get_replica_context()
  replicas = ctx.num_replicas_in_sync if ctx is not None else 1
  if replicas == 1:
    return draw(shape, seed)
  local = shape[0]
  noise = draw(tf.concat([[replicas * local], shape[1:]], 0), seed)
  begin = tf.concat([[tf.cast(ctx.replica_id_in_sync_group, local.dtype) * local], tf.zeros_like(shape[1:])], 0)
  return tf.slice(noise, begin, shape)


def sample_normal(mean, std, shared=True, seed=None):
  """A sample of Normal(mean, std) over the last axis.

  shared=True is the reference's behaviour (it monkeypatched MultivariateNormalDiag.sample): one standard-normal
  vector of the event size is drawn and broadcast over all batch elements. shared=False draws per element.
  With a seed [2] the draw is stateless and the same on any number of replicas (see replica_noise).
  """
  shape = tf.shape(mean)[-1:] if shared else tf.shape(mean)
  if seed is None:
    noise = tf.random.normal(shape, dtype=mean.dtype)
  elif seed is ZERO_NOISE:  # The sample is the mean; std still enters (times 0), as in the reference's N * std + mean.
    noise = tf.zeros(shape, mean.dtype)
  elif shared:  # One vector for the whole batch: every replica draws the same one.
    noise = tf.random.stateless_normal(shape, seed, dtype=mean.dtype)
  else:
    noise = tf.cast(replica_noise(shape, seed), mean.dtype)
  return mean + std * noise


class TanhBijector(tfp.bijectors.Bijector):

  def __init__(self, validate_args=False, name='tanh'):
    super().__init__(forward_min_event_ndims=0, validate_args=validate_args, name=name)

  def _forward(self, x):
    return tf.nn.tanh(x)

  def _inverse(self, y):
    dtype = y.dtype
    y = tf.cast(y, tf.float32)
    # Keep atanh finite at the boundary, in float32 as the reference does.
    y = tf.where(tf.less_equal(tf.abs(y), 1.0), tf.clip_by_value(y, -0.99999997, 0.99999997), y)
    return tf.cast(tf.atanh(y), dtype)

  def _forward_log_det_jacobian(self, x):
    log2 = tf.math.log(tf.constant(2.0, dtype=x.dtype))
    return 2.0 * (log2 - x - tf.nn.softplus(-2.0 * x))


class SampleDist:
  """Monte-Carlo mean, mode and entropy for distributions that have no closed form (the tanh-normal)."""

  def __init__(self, dist, samples=100):
    self._dist = dist
    self._samples = samples

  @property
  def name(self):
    return 'SampleDist'

  def __getattr__(self, name):
    return getattr(self._dist, name)

  def sample(self, sample_shape=(), seed=None):
    """With a seed [2]: one reparameterized sample of the tanh-normal (Independent(Transformed(Normal))) from
    replica_noise, so that replicas of a distributed train step draw what one device draws."""
    if seed is None:
      return self._dist.sample(sample_shape)
    assert sample_shape == (), sample_shape
    transformed = self._dist.distribution
    normal = transformed.distribution
    noise = replica_noise(tf.shape(normal.loc), seed)
    return transformed.bijector.forward(normal.loc + normal.scale * tf.cast(noise, normal.loc.dtype))

  def mean(self):
    return tf.reduce_mean(self._dist.sample(self._samples), 0)

  def mode(self, seed=None):
    """Per batch element, the most likely of the samples (drawn statelessly with a seed [2]). (The reference took,
    for every element, the index that was best for element 0, which only matters with more than one element, e.g.
    --envs > 1.)"""
    sample = self._dist.sample(self._samples, seed=seed)  # [S, *batch, A]
    logprob = self._dist.log_prob(sample)  # [S, *batch]
    best = tf.argmax(logprob, 0)  # [*batch]
    sample = tf.experimental.numpy.moveaxis(sample, 0, -2)  # [*batch, S, A]
    return tf.gather(sample, best, axis=best.shape.ndims, batch_dims=best.shape.ndims)

  def entropy(self):
    sample = self._dist.sample(self._samples)
    return -tf.reduce_mean(self.log_prob(sample), 0)


class OneHotDist:
  """One-hot categorical whose samples carry gradients for the actor.

  gradient='straight' (the TF2 reference's `onehot`): the gradient of the probabilities, straight through the
  sample. gradient='score' (the paper's code, `onehot_score`): the sample is multiplied by
  exp(log p(a) - stop_gradient(log p(a))), which is 1, so whatever the sample feeds gets the score-function
  gradient d/dlogits = (df/da . a) * grad log p(a), as the paper's code did (a DiCE "magic box" on the action).
  """

  def __init__(self, logits, gradient='straight'):
    """logits [..., classes] float32; samples are float32 one-hots."""
    if gradient not in ('straight', 'score'):
      raise NotImplementedError(gradient)
    self._dist = tfd.Categorical(logits=logits)
    self._num_classes = self.mean().shape[-1]
    self._dtype = tf.float32
    self._gradient = gradient

  @property
  def name(self):
    return 'OneHotDist'

  def __getattr__(self, name):
    return getattr(self._dist, name)

  def prob(self, events):
    return self._dist.prob(tf.argmax(events, axis=-1))

  def log_prob(self, events):
    return self._dist.log_prob(tf.argmax(events, axis=-1))

  def mean(self):
    return self._dist.probs_parameter()

  def mode(self, seed=None):  # Deterministic: `seed` only matches SampleDist.mode.
    return self._one_hot(self._dist.mode())

  def sample(self, amount=None, seed=None):
    """With a seed [2]: a Gumbel-max draw from replica_noise (the same distribution), so that replicas of a
    distributed train step draw what one device draws."""
    if seed is None:
      amount = [amount] if amount else []
      indices = self._dist.sample(*amount)
    else:
      assert amount is None, amount
      logits = self._dist.logits_parameter()
      if seed is ZERO_NOISE:  # Gumbel noise 0: the most likely action.
        indices = tf.argmax(logits, -1)
      else:
        uniform = replica_noise(tf.shape(logits), seed, 'uniform')
        gumbel = -tf.math.log(-tf.math.log(tf.clip_by_value(uniform, 1e-20, 1.0 - 1e-7)))
        indices = tf.argmax(logits + tf.cast(gumbel, logits.dtype), -1)
    sample = self._one_hot(indices)
    if self._gradient == 'score':
      logp = self._dist.log_prob(indices)[..., None]
      return sample * tf.cast(tf.exp(logp - tf.stop_gradient(logp)), self._dtype)
    probs = self._dist.probs_parameter()
    return sample + tf.cast(probs - tf.stop_gradient(probs), self._dtype)

  def _one_hot(self, indices):
    return tf.one_hot(indices, self._num_classes, dtype=self._dtype)


# Optimizer ----------------------------------------------------------------------------------------------------------

class Adam(keras.optimizers.Adam):
  """Keras's Adam (and its weight decay, iterations, slots, loss scaling and tf.distribute handling) with each
  variable's update as one fused kernel, `ResourceApplyAdam` (the op TF 2.2's Keras Adam ran, so the reference's
  too), instead of the ~40 ops Keras 3 traces per variable: the paper configuration's train step has 4,822 ops
  instead of 6,708 to trace, optimize and instantiate.

  The same math: alpha = lr sqrt(1 - beta2^t) / (1 - beta1^t), m <- m + (1 - beta1)(g - m),
  v <- v + (1 - beta2)(g^2 - v), var <- var - alpha m / (sqrt(v) + eps), with t = iterations + 1. The kernel
  evaluates the moments as beta1 m + (1 - beta1) g, so results differ from Keras's in float rounding only.
  """

  def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
    if self.amsgrad:
      return super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
    coefficients = {}  # By dtype, computed once for all variables (Keras computes them for each).

    def update(var, grad):
      if var.dtype not in coefficients:
        cast = lambda x: tf.cast(x, var.dtype)
        step = cast(self.iterations + 1)
        coefficients[var.dtype] = dict(
            beta1_power=tf.pow(cast(self.beta_1), step), beta2_power=tf.pow(cast(self.beta_2), step),
            lr=cast(learning_rate), beta1=cast(self.beta_1), beta2=cast(self.beta_2), epsilon=cast(self.epsilon))
      index = self._get_variable_index(var)
      # Inside `update`, a mirrored slot's handle is the one on var's device.
      m, v = self._momentums[index].value, self._velocities[index].value
      return tf.raw_ops.ResourceApplyAdam(
          var=var.handle, m=m.handle, v=v.handle, grad=tf.cast(grad, var.dtype), **coefficients[var.dtype])

    for grad, var in grads_and_vars:
      distribution.extended.update(var, update, args=(grad,), group=False)


class Optimizer:
  """Adam over the weights of some layers, with the reference's order: unscale, global norm, clip, weight decay,
  apply.

  Under float16 the loss is scaled dynamically (LossScaleOptimizer skips non-finite steps). Clipping happens on
  the unscaled gradients, so the update is the same as without loss scaling. Weight decay (decoupled, var -= lr *
  wd * var, on the variables whose name matches `wdpattern`) is Keras's, which applies it before the Adam step.

  In a replica context of N replicas each replica passes its local loss; the gradient of the global mean loss is
  the sum over replicas of the gradients of loss / N. Its norm, the clipping and the skipping of non-finite steps
  are computed from that sum, so N replicas update exactly as one device does.
  """

  def __init__(self, name, layers, lr, clip=None, wd=0.0, wdpattern=r'.*', loss_scale=False):
    self._name = name
    self._layers = layers
    self._clip = clip
    self._wd = wd
    self._wdpattern = wdpattern
    self._opt = Adam(lr, weight_decay=wd or None, name=f'{name}_adam')
    self._inner = self._opt
    if loss_scale:
      self._opt = keras.optimizers.LossScaleOptimizer(self._opt, name=f'{name}_scale')
    self._loss_scale = loss_scale
    self._variables = None

  @property
  def variables(self):
    if self._variables is None:
      self._variables = [v for layer in self._layers for v in layer.trainable_weights]
      # Names for --weight_decay_pattern, e.g. 'model/encode/h1/kernel'.
      path = lambda layer, v: v.path if v.path.startswith(layer.name + '/') else f'{layer.name}/{v.path}'
      self._names = {id(v): f'{self._name}/{path(layer, v)}' for layer in self._layers for v in layer.trainable_weights}
      if self._wd:
        self._inner.exclude_from_weight_decay(var_list=[
            v for v in self._variables if not re.search(self._wdpattern, self._names[id(v)])])
      self._opt.build(self._variables)
    return self._variables

  @contextlib.contextmanager
  def tape(self):
    """A GradientTape that watches only this optimizer's variables (and what is watched explicitly inside).

    A default tape watches every trainable variable read inside it, and a symbolic loop's gradient then computes
    the gradients of all the variables the loop captures, wanted or not: the actor's tape around the imagination
    would compute the RSSM's weight gradients at every step and throw them away. Gradients for this optimizer's
    variables are the same either way."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch([v.value if isinstance(v, keras.Variable) else v for v in self.variables])
      yield tape

  def scale(self, loss):
    return self._opt.scale_loss(loss) if self._loss_scale else loss

  def __call__(self, tape, loss):
    """Returns the unscaled global gradient norm, whether the update was applied, and the unscaled gradients of
    the global loss before clipping (in the order of `variables`; for comparisons, pruned from the train step).

    A step whose gradients are not all finite is skipped (under float16 the loss scaler also lowers its scale).
    """
    assert len(loss.shape) == 0, loss.shape
    variables = self.variables
    ctx = tf.distribute.get_replica_context()
    assert ctx is not None, 'Optimizer is called in a replica context (inside strategy.run, or without a strategy)'
    replicas = ctx.num_replicas_in_sync
    with tape:
      scaled = self.scale(loss / replicas if replicas > 1 else loss)
    grads = tape.gradient(scaled, variables)  # This replica's part.
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads) if replicas > 1 else grads
    scale = tf.cast(self._opt.dynamic_scale, tf.float32) if self._loss_scale else 1.0
    norm = tf.linalg.global_norm(total) / scale
    if self._clip:  # Scales every replica's part by the same factor, so their sum is the clipped total.
      grads, _ = tf.clip_by_global_norm(grads, self._clip * scale, norm * scale)
    finite = tf.math.is_finite(norm)
    if self._loss_scale:
      # The loss scaler decides on the gradients it is given, under a strategy from the first replica's part only.
      # Turning every part into NaN when the sum is not finite (x 1 otherwise, exact) makes every replica decide
      # as the sum does.
      grads = [g * tf.cast(tf.where(finite, 1.0, np.nan), g.dtype) for g in grads]
      self._opt.apply(grads, variables)  # Applies finite steps, skips the others and adapts the scale.
    else:
      # A cond whose branch updates mirrored variables must run in the cross-replica context (as Keras's
      # LossScaleOptimizer does); every replica computed the same `finite`. Without a strategy this is the default
      # replica context, and the merge call is a plain call.
      def apply(strategy, grads, finite):
        finite = strategy.experimental_local_results(finite)[0]
        update = lambda: strategy.extended.call_for_each_replica(self._opt.apply, args=(grads, variables))
        tf.cond(finite, update, lambda: None)
      ctx.merge_call(apply, args=(grads, finite))
    if self._loss_scale:
      total = [g / tf.cast(scale, g.dtype) for g in total]
    return norm, finite, total


# Episodes on disk ---------------------------------------------------------------------------------------------------

def count_episodes(directory):
  """(episodes, transitions) stored in a folder, read off the file names (`...-{length}.npz`)."""
  directory = pathlib.Path(directory)
  lengths = [int(n.stem.rsplit('-', 1)[-1]) - 1 for n in directory.glob('*.npz')]
  return len(lengths), sum(lengths)


def save_episodes(directory, episodes):
  """Writes `{timestamp}-{uuid}-{length}.npz` files atomically (temporary name, then rename)."""
  directory = pathlib.Path(directory).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  timestamp = datetime.datetime.now().strftime('%Y%m%dT%H%M%S')
  filenames = []
  for episode in episodes:
    identifier = str(uuid.uuid4().hex)
    length = len(episode['reward'])
    filename = directory / f'{timestamp}-{identifier}-{length}.npz'
    with io.BytesIO() as f:
      np.savez_compressed(f, **episode)
      write_atomic(filename, f.getvalue())
    filenames.append(filename)
  return filenames


def stored(episode, precision):
  """The episode in the reference's on-disk dtypes, chosen here for every episode the main process saves or logs:
  floats as float16 at --precision 16 (its default) or float32, signed integers as int16 or int32, uint8 images
  and bools as they are. Each value is converted once from the dtype the environment gave (float64 rewards straight
  to float16, as the reference's worker did). Logged returns are sums of these stored rewards, as the reference's."""
  def convert(value):
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      return value.astype({16: np.float16, 32: np.float32}[precision])
    if np.issubdtype(value.dtype, np.signedinteger):
      return value.astype({16: np.int16, 32: np.int32}[precision])
    if value.dtype in (np.uint8, np.bool_):
      return value
    raise NotImplementedError(value.dtype)
  return {k: convert(v) for k, v in episode.items()}


def episode_return(episode):
  """Sum of an episode's rewards, accumulated in float64 (stored rewards may be float16)."""
  return float(episode['reward'].astype(np.float64).sum())


def load_episode(filename):
  with pathlib.Path(filename).open('rb') as f:
    episode = np.load(f)
    return {k: episode[k] for k in episode.keys()}


class NoEpisodesError(RuntimeError):
  """The replay folder holds no episode the loader can use."""


def episode_length(filename):
  return int(pathlib.Path(filename).stem.rsplit('-', 1)[-1])


def load_episodes(directory, rescan, length=None, balance=False, seed=0, cache_bytes=None):
  """Endless generator of episodes (or windows of `length` steps) drawn uniformly from the episodes on disk.

  The folder is rescanned after every `rescan` draws. Episodes shorter than `length` + 1 are never drawn (the
  reference skipped them after drawing, which gives the same distribution). Loaded episodes stay in a cache of at
  most `cache_bytes` (least recently used evicted, read back from disk when drawn again). A file that cannot be
  read is skipped for the rest of the scan and read again when drawn after a rescan (as the reference tried it
  at every rescan), at most once per scan: a warning when it becomes unreadable, a note when it is readable
  again.
  """
  directory = pathlib.Path(directory).expanduser()
  random = np.random.RandomState(seed)
  cache, size, unreadable = collections.OrderedDict(), 0, set()
  while True:
    filenames = [f for f in sorted(directory.glob('*.npz')) if not length or episode_length(f) >= length + 1]
    failed, drawn = set(), 0  # Files that failed in this scan (not read again before the next); windows yielded.
    for index in random.choice(len(filenames), rescan) if filenames else []:
      filename = filenames[index]
      if filename in cache:
        cache.move_to_end(filename)
        episode = cache[filename]
      else:
        if filename in failed:
          continue
        try:
          episode = load_episode(filename)
        except Exception as e:
          failed.add(filename)
          if filename not in unreadable:
            unreadable.add(filename)
            print(f'Warning: cannot read episode file {filename} ({e}); it is skipped and read again after the '
                  f'next rescan of the replay, every {rescan} draws ({len(unreadable)} unreadable).',
                  file=sys.stderr)
          continue
        if filename in unreadable:
          unreadable.discard(filename)
          print(f'Episode file {filename} is readable again ({len(unreadable)} unreadable).', file=sys.stderr)
        cache[filename] = episode
        size += sum(v.nbytes for v in episode.values())
        while cache_bytes and size > cache_bytes and len(cache) > 1:
          _, evicted = cache.popitem(last=False)
          size -= sum(v.nbytes for v in evicted.values())
      if length:
        total = len(next(iter(episode.values())))
        available = total - length
        if available < 1:  # The file name promised more steps than the file holds: as unreadable.
          if filename not in unreadable:
            unreadable.add(filename)
            print(f'Warning: episode file {filename} holds {total} steps, fewer than its name says; it is '
                  f'skipped ({len(unreadable)} unreadable).', file=sys.stderr)
          continue
        if balance:
          index = min(random.randint(0, total), available)
        else:
          index = int(random.randint(0, available))
        episode = {k: v[index: index + length] for k, v in episode.items()}
      drawn += 1
      yield episode
    unreadable &= set(filenames)  # Forget the files that are gone.
    if not drawn and set(filenames) <= unreadable:
      stored = [episode_length(f) for f in directory.glob('*.npz')]
      hint = ''
      if length and stored and max(stored) < length + 1:  # E.g. a task whose early episodes end within steps.
        hint = (f' The {len(stored)} stored episodes are at most {max(stored)} steps long (--batch_length '
                f'{length} needs {length + 1}): use a --batch_length below {max(stored)}.')
      raise NoEpisodesError(f'No readable episodes of at least {(length or 0) + 1} steps in {directory}.{hint}')


# Simulation ---------------------------------------------------------------------------------------------------------

def simulate(agent, envs, steps=0, episodes=0, state=None, on_episode=None):
  """Steps the envs with the agent until `steps` agent steps of finished episodes or `episodes` episodes are done.

  Returns a state from which the next call resumes. `on_episode(episode)` receives each finished episode.
  """
  if state is None:
    step, episode = 0, 0
    done = np.ones(len(envs), bool)
    length = np.zeros(len(envs), np.int32)
    obs = [None] * len(envs)
    agent_state = None
  else:
    step, episode, done, length, obs, agent_state = state
  while (steps and step < steps) or (episodes and episode < episodes):
    if done.any():
      indices = [index for index, d in enumerate(done) if d]
      promises = [envs[i].reset(blocking=False) for i in indices]
      for index, promise in zip(indices, promises):
        obs[index] = promise()
    stacked = {k: np.stack([o[k] for o in obs]) for k in obs[0]}
    action, agent_state = agent(stacked, done, agent_state)
    action = np.array(action)
    assert len(action) == len(envs)
    promises = [e.step(a, blocking=False) for e, a in zip(envs, action)]
    results = [p() for p in promises]
    obs, _, done, infos = zip(*results)
    obs = list(obs)
    done = np.stack(done)
    episode += int(done.sum())
    length += 1
    step += (done * length).sum()
    length *= (1 - done)
    if on_episode:
      for info in infos:
        if 'episode' in info:
          on_episode(info['episode'])
  return (step - steps, episode - episodes, done, length, obs, agent_state)


# Summaries ----------------------------------------------------------------------------------------------------------

def encode_gif(frames, fps):
  """frames: uint8 [T, H, W, C] -> GIF bytes, encoded in-process (no ffmpeg)."""
  import imageio.v3 as iio
  if frames.shape[-1] == 1:
    frames = frames[..., 0]
  return iio.imwrite('<bytes>', frames, extension='.gif', duration=1000 / fps, loop=0)


def video_summary(name, video, step=None, fps=20):
  """video: [B, T, H, W, C], uint8 or float in [0, 1]; written as one GIF that tiles the batch side by side."""
  video = np.asarray(video)
  if np.issubdtype(video.dtype, np.floating):
    video = np.clip(255 * video, 0, 255).astype(np.uint8)
  B, T, H, W, C = video.shape
  frames = video.transpose((1, 2, 0, 3, 4)).reshape((T, H, B * W, C))
  summary = tf.compat.v1.Summary()
  image = tf.compat.v1.Summary.Image(height=H, width=B * W, colorspace=C)
  image.encoded_image_string = encode_gif(frames, fps)
  summary.value.add(tag=name + '/gif', image=image)
  tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step)


# Schedules ----------------------------------------------------------------------------------------------------------

def exploration_amount(step, amount, decay, minimum, schedule='halving'):
  """The exploration amount at environment step `step`, floored at `minimum` (0: no floor).

  halving (the TF2 reference): `amount` halves every `decay` steps. linear (the paper's code): `amount` goes in a
  straight line to `minimum`, reached at step `decay`, and stays there. decay 0 keeps `amount` constant.
  """
  if schedule == 'linear':
    if decay:
      amount += (minimum - amount) * min(1.0, step / decay)
  elif schedule == 'halving':
    if decay:
      amount *= 0.5 ** (step / decay)
  else:
    raise NotImplementedError(schedule)
  if minimum:
    amount = max(minimum, amount)
  return float(amount)


class Every:

  def __init__(self, every):
    self._every = every
    self._last = None

  def __call__(self, step):
    if self._last is None:
      self._last = step
      return True
    if step >= self._last + self._every:
      self._last += self._every
      return True
    return False


# Checkpoint files ---------------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
  """A checkpoint file that cannot be loaded as asked; the message says why."""


class _SafeUnpickler(pickle.Unpickler):
  """Accepts numpy arrays, dtypes and scalars (numpy 1.x and 2.x spellings) and refuses everything else."""

  ALLOWED = {
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
      ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
      ('builtins', 'tuple'), ('builtins', 'list'),
  }

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise CheckpointError(
        f"refuses to unpickle '{module}.{name}': a checkpoint holds only numpy arrays")


def read_checkpoint(filename):
  """The list of arrays in a variables.pkl, unpickled safely."""
  filename = pathlib.Path(filename)
  if not filename.exists():
    raise CheckpointError(f'Checkpoint {filename} does not exist.')
  try:
    with filename.open('rb') as f:
      values = _SafeUnpickler(f).load()
  except CheckpointError as e:
    raise CheckpointError(f'Checkpoint {filename} {e}.') from None
  except Exception as e:
    raise CheckpointError(f'Checkpoint {filename} is unreadable (truncated or not a pickle): '
                          f'{type(e).__name__}: {e}') from None
  if not isinstance(values, (list, tuple)):
    raise CheckpointError(f'Checkpoint {filename} holds a {type(values).__name__}, not a list of arrays.')
  values = list(values)
  for index, value in enumerate(values):
    if not isinstance(value, (np.ndarray, np.generic)):
      raise CheckpointError(f'Checkpoint {filename} entry {index} is a {type(value).__name__}, not an array.')
  return [np.asarray(v) for v in values]


def write_checkpoint(filename, values):
  """Pickles a tuple of arrays (the reference's format) atomically: a crash leaves the previous file whole."""
  write_atomic(filename, checkpoint_bytes(values))


def checkpoint_bytes(values):
  """The bytes of a variables.pkl holding `values`: a pickled tuple of arrays, the reference's format."""
  return pickle.dumps(tuple(values), protocol=4)


def write_json(filename, data):
  write_atomic(filename, json.dumps(data, indent=1, default=str).encode())


def write_atomic(filename, data):
  """Writes bytes to a temporary name, syncs and renames: a crash at any moment leaves the old file or the new one
  whole, never a part."""
  filename = pathlib.Path(filename)
  tmp = filename.with_name(filename.name + '.tmp')
  with tmp.open('wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(filename)
