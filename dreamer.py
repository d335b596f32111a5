"""Dreamer (Hafner et al., ICLR 2020): the command (`define_config` and parsing from flags.py, `main`), the agent
`Dreamer`, its data (`preprocess`, `load_dataset`), environments (`make_env`), precision and devices. The training
loop that schedules, logs and checkpoints is loop.py."""

import collections
import contextlib
import functools
import itertools
import os
import pathlib
import signal
import sys
import time

PROCESS_START = time.perf_counter()  # For the benchmark's time to the first train step.

sys.path.append(str(pathlib.Path(__file__).parent))

import flags
import runtime
import seeds
from flags import UserError, check_config, define_config, parse_args  # The flags' one source is flags.FLAGS.

runtime.configure()  # Before TensorFlow is imported: logging, headless rendering, oneDNN (see runtime.py).
if __name__ == '__main__':
  # --help and flag errors answer before the seconds that importing TensorFlow takes.
  CONFIG = flags.parse_and_check()

import numpy as np

tf = runtime.import_tensorflow()
tf.get_logger().setLevel('ERROR')

import keras
from tensorflow_probability import distributions as tfd

import loop
import models
import planning
import tools
import wrappers
from loop import NonFiniteError


# Precision ----------------------------------------------------------------------------------------------------------

def resolve_precision(config):
  """The dtype policy for --precision. 16 means mixed_float16 on a GPU (with loss scaling); on a CPU float16 is
  slow, so 16 means mixed_bfloat16 where the processor has bfloat16 instructions and float32 otherwise (or as
  DREAMER_CPU_BF16 says)."""
  if config.precision == 32:
    return 'float32'
  if tf.config.list_physical_devices('GPU'):
    return 'mixed_float16'
  try:
    bf16 = runtime.cpu_has_bf16()  # DREAMER_CPU_BF16 can choose as another kind of CPU would (runtime.py).
  except ValueError as e:
    raise UserError(str(e)) from None
  return 'mixed_bfloat16' if bf16 else 'float32'


# The agent ----------------------------------------------------------------------------------------------------------

class Mean:
  """A running mean kept in two float32 variables (total, count), as tf.metrics.Mean in the checkpoint."""

  def __init__(self):
    self.total = tf.Variable(0.0, dtype=tf.float32, trainable=False)
    self.count = tf.Variable(0.0, dtype=tf.float32, trainable=False)

  def update_state(self, values):
    values = tf.cast(values, tf.float32)
    self.total.assign_add(tf.reduce_sum(values))
    self.count.assign_add(tf.cast(tf.size(values), tf.float32))

  def result(self):
    return float(tf.math.divide_no_nan(self.total, self.count))

  def reset_states(self):
    self.total.assign(0.0)
    self.count.assign(0.0)


# The metrics each part of the agent keeps (the reference's: world model with the decoder, actor, value).
MODEL_METRICS = ('div', 'expl_amount', 'model_grad_norm', 'model_loss', 'post_ent', 'prior_ent', 'reward_loss')
ACTOR_METRICS = ('action_ent', 'actor_grad_norm', 'actor_loss')
VALUE_METRICS = ('value_grad_norm', 'value_loss')


def has_actor(config):
  return config.behavior == 'actor'


def has_value(config):
  """V_R (--value_estimate reward) and CEM planning use no value network."""
  return has_actor(config) and config.value_estimate != 'reward'


def has_decoder(config):
  """Only the reconstruction objective trains the image decoder; the others build none."""
  return config.representation == 'reconstruction'


# The dense networks of the variants: attribute -> hidden layers (h0, h1, ...), the output layers after them, and
# whether a config has the network. _build_model sizes them, _build_variables calls them and checkpoint_names lists
# their weights from this table.
Dense = collections.namedtuple('Dense', 'layers outputs built')
DENSE = dict(
    _actor=Dense(4, ('hout',), has_actor),
    _cpc=Dense(3, ('hout', 'hstd'), lambda c: c.representation == 'contrastive'),  # hout < hstd, as sorted.
    _pcont=Dense(3, ('hout',), lambda c: c.pcont),
    _reward=Dense(2, ('hout',), lambda c: True),
    _value=Dense(3, ('hout',), has_value),
)


def dense_layers(name):
  """The layer names of a DENSE network, e.g. ['h0', 'h1', 'hout'] for the reward head."""
  return [f'h{i}' for i in range(DENSE[name].layers)] + list(DENSE[name].outputs)


class Dreamer:
  """The agent: its networks, the policy, the train step (returning metrics) and the checkpoint table. The loop
  that decides when to act, train, log and save is loop.py."""

  def __init__(self, config, actspace, strategy=None, precision=None):
    """Builds every variable with a forward pass on zeros (no train step: the loop makes the reference's first
    update on a real batch). `strategy` (a tf.distribute strategy, see make_strategy) splits every train step's
    batch over its replicas; None trains on the default device. `precision` is the Keras dtype policy name the
    networks are built with (float32, mixed_bfloat16, mixed_float16); None: what --precision resolves to here."""
    default = tf.distribute.get_strategy()  # No strategy: one device.
    self._strategy = strategy or default
    self._replicas = self._strategy.num_replicas_in_sync
    check_replicas(config, self._replicas)
    with self._strategy.scope():
      self._c = config
      self._actdim = int(actspace.n if hasattr(actspace, 'n') else actspace.shape[0])
      # Only in the checkpoint (its first entry, as the reference's agent step): written by save.
      self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
      self._metrics = {name: Mean() for name in metric_names(config)}
      # The dtype policy every network is built with (passed to each layer; Keras's global policy is not used).
      self.precision = precision or resolve_precision(config)
      self._float = keras.mixed_precision.Policy(self.precision).compute_dtype
      self.has_decoder = has_decoder(config)  # Only then is there an open-loop video (openl).
      self._policy_graphs = {}  # (training, input specs) -> concrete function of _policy.
      self._acts = itertools.count(seeds.first_act(0))  # Policy calls made without an index (see policy).
      self._worker = worker_index(self._strategy)  # Workers of a multi-worker run draw apart.
      self._build_model()
      # The acting graph. XLA fuses its ~100 small batch-1 ops: measured faster in float32 and in bfloat16 on CPUs
      # (docs/speed.md, sessions 7, 8 and 10); not measured for float16 (GPUs) or for CEM's planning, which keep the
      # plain graph; under a distribution strategy XLA cannot read the replicas' variables on other devices. No
      # autograph: the Python control flow is on the config only, and autograph would cost seconds.
      self.policy_xla_possible = (self._float in ('float32', 'bfloat16') and config.behavior == 'actor'
                                  and self._strategy is default)
      self.policy_xla = bool(config.jit_policy and self.policy_xla_possible)
      # The actor acts in float32 under mixed_bfloat16 (a CPU): its variables are float32 already, and at batch 1
      # the casts of every weight to bfloat16 cost more than bfloat16's arithmetic saves (docs/speed.md, session
      # 11: 2.2 against 3.0 ms per step at the paper's size). Training stays in bfloat16; CEM plans in it.
      self.acting_precision = ('float32' if self._float == 'bfloat16' and config.behavior == 'actor'
                               else self.precision)
      self._policy = tf.function(self._policy, autograph=False, jit_compile=self.policy_xla)

  def policy(self, obs, reset, state, training, step=0, call=None):
    """obs['image'] uint8 [N, 64, 64, 3], reset bool [N] -> action float32 [N, A] (numpy), next state. `step`
    (env steps taken) sets the exploration amount. `call` indexes the call's draws (seeds.act with --seed and this
    worker); without one the agent counts its calls from 0."""
    image = tf.convert_to_tensor(obs['image'])
    if state is None:
      with self._acting():
        state = (self._dynamics.initial(len(obs['image'])), tf.zeros((len(obs['image']), self._actdim)))
    seed = seeds.act(self._c.seed, next(self._acts) if call is None else call, self._worker)
    args = (image, tf.convert_to_tensor(reset), state, bool(training),
            tf.constant(self._expl_amount(training, step)), tf.constant(seed, tf.int32))
    # The traced graph for this mode and these input specs, called directly: tf.function's own dispatch (matching
    # the nested arguments to a trace) took about 1 ms of a 3.3 ms policy step at batch 1 (docs/speed.md).
    key = (args[3],) + tuple((tuple(t.shape), t.dtype) for t in tf.nest.flatten(args[:3]))
    run = self._policy_graphs.get(key)
    if run is None:
      run = self._policy_graphs[key] = self._policy.get_concrete_function(*args)
    action, state = run(*args)
    return action.numpy(), state

  def _acting(self):
    """The block in which the acting networks compute in acting_precision."""
    if self.acting_precision == self.precision:
      return contextlib.nullcontext()
    return models.computing_in([self._encode, self._dynamics, self._actor], self.acting_precision)

  def _policy(self, image, reset, state, training, amount, seed):  # A tf.function once built (see __init__).
    with self._acting():
      return self._act(image, reset, state, training, amount, seed)

  def _act(self, image, reset, state, training, amount, seed):
    # Every draw is stateless from `seed` [2]: XLA ignores TensorFlow's seeds for stateful draws.
    latent, action = state
    mask = 1.0 - tf.cast(reset, tf.float32)[:, None]
    latent = {k: v * tf.cast(mask, v.dtype) for k, v in latent.items()}
    action = action * mask
    embed = self._encode(preprocess({'image': image}, self._c))
    latent, _ = self._dynamics.obs_step(latent, action, embed, tools.fold(seed, 0))
    planned = None  # The return CEM expects of its plan [N]; the actor has none.
    if self._c.behavior == 'cem':  # The plan's first action, the same in training and evaluation (as PlaNet).
      c = self._c
      action, planned = planning.cross_entropy_method(  # PlaNet's CEM on the learned model.
          self._dynamics, self._reward, latent, self._actdim, c.cem_horizon, c.cem_candidates, c.cem_topk,
          c.cem_iterations, tools.fold(seed, 1))
    elif training:
      action = self._actor(self._dynamics.get_feat(latent)).sample(seed=tools.fold(seed, 1))
    else:
      action = self._actor(self._dynamics.get_feat(latent)).mode(seed=tools.fold(seed, 1))
    action = self._exploration(action, training, amount, tools.fold(seed, 2))
    if training:  # In the graph: eager metric updates cost about 1 ms per step.
      self._metrics['expl_amount'].update_state(amount)
      if planned is not None and 'planned_return' in self._metrics:
        self._metrics['planned_return'].update_state(planned)
    return action, (latent, action)

  def _expl_amount(self, training, step):
    if not training:
      return float(self._c.eval_noise)
    c = self._c
    return tools.exploration_amount(float(step), c.expl_amount, c.expl_decay, c.expl_min, c.expl_schedule)

  def _exploration(self, action, training, amount, seed):
    """The reference's exploration with stateless draws from `seed` [2] (the same distributions)."""
    if not training and not self._c.eval_noise:
      return action
    shape = tf.shape(action)
    if self._c.expl == 'additive_gaussian':
      noise = tf.random.stateless_normal(shape, seed, dtype=action.dtype)
      return tf.clip_by_value(action + tf.cast(amount, action.dtype) * noise, -1, 1)
    if self._c.expl == 'completely_random':
      return tf.random.stateless_uniform(shape, seed, -1, 1, dtype=action.dtype)
    if self._c.expl == 'epsilon_greedy':  # A uniformly random action in a fraction `amount` of the rows.
      indices = tf.random.stateless_uniform(shape[:1], tools.fold(seed, 0), 0, self._actdim, dtype=tf.int32)
      return tf.where(
          tf.random.stateless_uniform(shape[:1], tools.fold(seed, 1))[:, None] < amount,
          tf.one_hot(indices, self._actdim, dtype=action.dtype), action)
    raise NotImplementedError(self._c.expl)

  def train(self, data, seed):
    """One update of all three parts on a batch as load_dataset yields it (raw: uint8 images, unclipped rewards),
    split over the replicas; returns the metrics as means over the whole batch (the scalar ones also accumulate
    into pop_metrics). `seed` [2] int64 seeds the step's sampling (seeds.train_step), or tools.ZERO_NOISE for the
    noise-free step."""
    if seed is not tools.ZERO_NOISE:
      seed = tf.convert_to_tensor(seed, tf.int64)
    return self._train_graph(data, seed)

  def pop_metrics(self):
    """{name: mean since the last call} of the metrics the checkpoint keeps; resets them."""
    means = {name: metric.result() for name, metric in self._metrics.items()}
    for metric in self._metrics.values():
      metric.reset_states()
    return means

  def train_graph(self, data, seed):
    """The traced train step for these inputs (for counting its FLOPs)."""
    return self._train_graph.get_concrete_function(data, tf.convert_to_tensor(seed, tf.int64)).graph

  def train_probe(self, data, seed=tools.ZERO_NOISE):
    """The same update as `train` (it changes the weights), traced with extra outputs for comparisons with the
    reference: besides the metrics, `grad/<opt>/<i>` (each optimizer's gradients before clipping, in the order of
    its `variables`) and `inter/<name>` (the step's intermediates). By default noise-free (tools.ZERO_NOISE)."""
    return self._train_graph(data, seed, probe=True)

  @tf.function(autograph=False)  # Plain Python control flow on config only; autograph would cost seconds.
  def _train_graph(self, data, seed, probe=False):
    metrics = self._strategy.run(functools.partial(self._train, probe=probe), (data, seed))
    # Scalars are means over each replica's part: their mean is the mean over the batch. Per-element metrics
    # (entropies) are gathered, so the metric variables count the same elements as on one device.
    rank = lambda v: self._strategy.experimental_local_results(v)[0].shape.rank
    metrics = {k: self._strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) if rank(v) == 0
               else self._strategy.gather(v, axis=0) for k, v in metrics.items()}
    if self._c.log_scalars:
      for name, value in metrics.items():
        if name in self._metrics:
          self._metrics[name].update_state(value)
    return metrics

  def _train(self, data, seed, probe=False):
    """One update of the world model, the actor and the value (those the variant has), in a replica context. data:
    dict of [B, T, ...] tensors as the dataset yields them (uint8 images), this replica's part of the batch. Returns
    this replica's metrics (with `probe`, also the gradients and intermediates that train_probe describes)."""
    data = preprocess(data, self._c)  # Images to float32 here, not in the input pipeline: see load_dataset.
    with tf.GradientTape() as model_tape:
      model = self._model_loss(data, seed)
    # Behavior: imagine ahead from every posterior state (CEM plans in the policy instead).
    imag, tapes = self._behavior_loss(model['post'], seed)
    metrics, grads = self._update(dict(tapes, model=model_tape), dict(model=model['loss'], **imag['losses']))
    metrics.update(prior_ent=model['prior_dist'].entropy(), post_ent=model['post_dist'].entropy(), div=model['div'],
                   model_loss=model['loss'])
    if has_actor(self._c):
      # After the updates (automatic control dependencies order the reads): the updated actor's entropy, as the
      # reference computed it in its summaries after the three optimizers ran.
      metrics['action_ent'] = self._actor(model['feat']).entropy()
    for name, logprob in model['likes'].items():
      metrics[name + '_loss'] = -logprob
    metrics.update(model['extra'])
    if probe:
      metrics.update(self._probe_outputs(grads, model, imag))
    return metrics

  def _model_loss(self, data, seed):
    """The world model's loss on a preprocessed batch (inside the model's tape): a dict with the `loss`, the
    log-likelihood terms `likes` (image, reward, pcont), the clipped `div`, `embed` [B, T, 1024], `post` and
    `prior` (dicts of [B, T, ...]), `feat` [B, T, stoch + deter], their distributions, and the variant's `extra`
    metrics (contrastive: cpc_loss, cpc_accuracy)."""
    c = self._c
    embed = self._encode(data)  # [B, T, 1024]
    post, prior = self._dynamics.observe(embed, data['action'], seed=tools.fold(seed, 1))
    feat = self._dynamics.get_feat(post)  # [B, T, stoch + deter]
    likes, extra = {}, {}
    if has_decoder(c):
      likes['image'] = tf.reduce_mean(self._decode(feat).log_prob(data['image']))
    likes['reward'] = tf.reduce_mean(self._reward(feat).log_prob(data['reward']))
    if c.pcont:
      pcont_pred = self._pcont(feat)
      pcont_target = c.discount * data['discount']
      likes['pcont'] = c.pcont_scale * tf.reduce_mean(pcont_pred.log_prob(pcont_target))
    prior_dist = self._dynamics.get_dist(prior)
    post_dist = self._dynamics.get_dist(post)
    div = tf.reduce_mean(tfd.kl_divergence(post_dist, prior_dist))
    if self._replicas > 1:  # Free nats apply to the mean over the whole batch, as on one device.
      div = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, div)
    div = tf.maximum(div, c.free_nats)
    loss = c.kl_scale * div - sum(likes.values())
    if c.representation == 'contrastive':  # Instead of the image term: each step's embedding picks its state.
      pred = self._cpc(embed)  # q(feat | embed): [B, T, stoch + deter]
      extra['cpc_loss'], extra['cpc_accuracy'] = tools.contrastive_loss(pred.mean(), pred.stddev(), feat)
      loss += extra['cpc_loss']
    return dict(loss=loss, likes=likes, div=div, embed=embed, post=post, prior=prior, feat=feat,
                prior_dist=prior_dist, post_dist=post_dist, extra=extra)

  def _behavior_loss(self, post, seed):
    """The actor's and the value's losses on the imagination from `post`: (imag, tapes), imag as _behavior gives
    it with its `losses` {actor, value} (those the variant has), tapes the optimizers' tapes {actor, value}."""
    c = self._c
    imag, tapes = dict(losses={}), {}
    if has_actor(c):
      value_tape = tapes['value'] = tf.GradientTape() if has_value(c) else None
      with self._actor_opt.tape() as tapes['actor']:  # The actor's weights only: no RSSM weight gradients.
        imag = dict(self._behavior(post, tools.fold(seed, 2), value_tape), losses={})
        imag['losses']['actor'] = -tf.reduce_mean(imag['weights'] * imag['returns'])
    if has_value(c):
      with tapes['value']:
        value_pred = imag['value_dist'][:-1]
        target = tf.stop_gradient(imag['returns'])
        imag['losses']['value'] = -tf.reduce_mean(imag['weights'] * value_pred.log_prob(target))
    return imag, tapes

  def _update(self, tapes, losses):
    """Each optimizer's step on its loss ({model, actor, value}: those the variant has), in that order. Returns
    (metrics, grads): the gradient norms, the actor's and the value's losses and `nonfinite` (1 when an optimizer
    skipped its update for non-finite gradients; not a checkpointed metric), and each optimizer's gradients before
    clipping."""
    metrics, grads, applied = {}, {}, []
    for name in ('model', 'actor', 'value'):
      if name in losses:
        norm, ok, grads[name] = getattr(self, f'_{name}_opt')(tapes[name], losses[name])
        metrics[f'{name}_grad_norm'] = norm
        if name != 'model':
          metrics[f'{name}_loss'] = losses[name]
        applied.append(ok)
    metrics['nonfinite'] = 1 - tf.cast(functools.reduce(lambda a, b: a & b, applied), tf.float32)
    return metrics, grads

  def _probe_outputs(self, grads, model, imag):
    """train_probe's extra outputs: `grad/<opt>/<i>` and the intermediates `inter/<name>`."""
    out = {f'grad/{opt}/{i}': g for opt, opt_grads in grads.items() for i, g in enumerate(opt_grads)}
    out['inter/embed'] = model['embed']
    out.update({f'inter/post_{k}': v for k, v in model['post'].items()})
    out.update({f'inter/prior_{k}': v for k, v in model['prior'].items()})
    if has_actor(self._c):
      names = ('imag_feat', 'lambda_reward', 'lambda_value', 'lambda_pcont', 'lambda_bootstrap')
      out.update({f'inter/{k}': imag[k] for k in names if k in imag})
      out['inter/lambda_returns'] = imag['returns']
    return out

  def _behavior(self, post, seed=None, value_tape=None):
    """Imagines `horizon` steps from every posterior state with the actor. Returns a dict: `imag_feat` [H, N, F]
    (N = B*T starts, B*(T-1) with pcont), `value_dist` on them (None without a value network; recorded on
    `value_tape` too, so one forward pass serves the actor and the value loss; the reference ran it twice), the
    `returns` [H-1, N] of --value_estimate and their `weights` [H-1, N] (no gradient); for the lambda-return also
    its arguments `lambda_reward`, `lambda_value`, `lambda_pcont` [H-1, N] and `lambda_bootstrap` [N]."""
    c = self._c
    imag_feat = self._imagine_ahead(post, seed)
    reward = self._reward(imag_feat).mode()
    if c.pcont:
      pcont = self._pcont(imag_feat).mean()
    else:
      pcont = c.discount * tf.ones_like(reward)
    value_dist = value = None
    if has_value(c):
      with value_tape or contextlib.nullcontext():
        value_dist = self._value(imag_feat)
      value = value_dist.mode()
    imag = dict(imag_feat=imag_feat, value_dist=value_dist)
    imag['returns'] = tools.value_estimate(c.value_estimate, reward, value, pcont, c.disclam, c.nstep)
    if c.value_estimate == 'lambda':  # The lambda-return's inputs, for train_probe's comparisons.
      imag.update(lambda_reward=reward[:-1], lambda_value=value[:-1], lambda_pcont=pcont[:-1],
                  lambda_bootstrap=value[-1])
    if c.value_estimate == 'reward':
      # The paper's code weighs V_R's actor loss by 1 (training/utility.py: its actor loss has no discount
      # weights without a value head); the pcont already discounts inside each return.
      imag['weights'] = tf.ones_like(imag['returns'])
    else:
      imag['weights'] = tf.stop_gradient(tf.math.cumprod(tf.concat([tf.ones_like(pcont[:1]), pcont[:-2]], 0), 0))
    return imag

  def _imagine_ahead(self, post, seed=None):
    if self._c.pcont:  # Last step could be terminal.
      post = {k: v[:, :-1] for k, v in post.items()}
    flatten = lambda x: tf.reshape(x, [-1] + list(x.shape[2:]))
    start = {k: flatten(v) for k, v in post.items()}

    def step(prev, t):
      seed_t = tools.fold(seed, t)
      action = self._actor(tf.stop_gradient(self._dynamics.get_feat(prev))).sample(seed=tools.fold(seed_t, 2))
      return self._dynamics.img_step(prev, action, tools.fold(seed_t, 0))

    with tf.name_scope('imagine'):  # Names the loop's ops in profiles.
      states = tools.scan(step, tf.range(self._c.horizon), start)
    return self._dynamics.get_feat(states)

  def _build_model(self):
    c = self._c
    kw = dict(dtype=self.precision)
    self._encode = models.ConvEncoder(c.cnn_depth, c.cnn_act, lanes=runtime.lanes(), name='encode', **kw)
    self._dynamics = models.RSSM(c.stoch_size, c.deter_size, c.deter_size, shared_noise=c.shared_noise,
                                 name='dynamics', **kw)
    # Only the networks the variant trains exist (checkpoint_names lists their variables).
    model_modules = [self._encode, self._dynamics]
    if has_decoder(c):
      self._decode = models.ConvDecoder(c.cnn_depth, c.cnn_act, name='decode', **kw)
      model_modules.append(self._decode)
    layers = {name: spec.layers for name, spec in DENSE.items() if spec.built(c)}
    if '_cpc' in layers:
      self._cpc = models.StateModel(c.stoch_size + c.deter_size, layers['_cpc'], c.num_units, c.dense_act,
                                    name='cpc', **kw)
      model_modules.append(self._cpc)
    self._reward = models.DenseDecoder((), layers['_reward'], c.num_units, act=c.dense_act, name='reward', **kw)
    model_modules.append(self._reward)
    if '_pcont' in layers:
      self._pcont = models.DenseDecoder((), layers['_pcont'], c.num_units, 'binary', act=c.dense_act,
                                        name='pcont', **kw)
      model_modules.append(self._pcont)
    if '_value' in layers:
      self._value = models.DenseDecoder((), layers['_value'], c.num_units, act=c.dense_act, name='value', **kw)
    if '_actor' in layers:
      self._actor = models.ActionDecoder(self._actdim, layers['_actor'], c.num_units, c.action_dist,
                                         init_std=c.action_init_std, act=c.dense_act, name='actor', **kw)
    loss_scale = self._float == 'float16'
    Optimizer = functools.partial(
        tools.Optimizer, wd=c.weight_decay, clip=c.grad_clip, wdpattern=c.weight_decay_pattern,
        loss_scale=loss_scale)
    self._build_variables()
    optimizers = [Optimizer('model', model_modules, c.model_lr)]
    self._model_opt = optimizers[-1]
    if has_value(c):
      optimizers.append(Optimizer('value', [self._value], c.value_lr))
      self._value_opt = optimizers[-1]
    if has_actor(c):
      optimizers.append(Optimizer('actor', [self._actor], c.actor_lr))
      self._actor_opt = optimizers[-1]
    for opt in optimizers:
      opt.variables  # Creates the slots outside tf.function, so the train step is traced once.

  def _build_variables(self):
    """Creates every layer's variables with a forward pass on zeros."""
    embed = self._encode({'image': tf.zeros((1, 2, 64, 64, 3))})
    post, _ = self._dynamics.observe(embed, tf.zeros((1, 2, self._actdim)))
    feat = self._dynamics.get_feat(post)
    if has_decoder(self._c):
      self._decode(feat)
    for name, spec in DENSE.items():
      if spec.built(self._c):
        getattr(self, name)(embed if name == '_cpc' else feat)  # The state model reads the embedding.

  # Checkpoints ------------------------------------------------------------------------------------------------------

  def checkpoint_table(self):
    """(name, variable) in the reference's variables.pkl order (checkpoint_names)."""
    return [(name, self._variable(name)) for name in checkpoint_names(self._c)]

  def _variable(self, name):
    """The variable a checkpoint name denotes: `_step`, `_metrics/<metric>/<total|count>`, or
    `_<module>/<layer>/<weight>` with the layer an attribute of the module or one of its dense layers."""
    parts = name.split('/')
    if parts[0] == '_step':
      return self._step
    if parts[0] == '_metrics':
      return getattr(self._metrics[parts[1]], parts[2])
    module = getattr(self, parts[0])
    layers = {layer.name: layer for layer in getattr(module, 'dense_layers', [])}
    layer = layers[parts[1]] if parts[1] in layers else getattr(module, parts[1])
    return getattr(layer, parts[2])

  def save(self, filename, step):
    """Writes variables.pkl with `step` (env steps taken) as its `_step` entry."""
    tools.write_atomic(filename, self.checkpoint_bytes(step))

  def checkpoint_bytes(self, step):
    """The bytes of variables.pkl with `step` as its `_step` entry."""
    self._step.assign(step)
    return tools.checkpoint_bytes([v.numpy() for _, v in self.checkpoint_table()])

  def load(self, filename):
    """Validates the whole file against this agent before assigning anything."""
    values = tools.read_checkpoint(filename)
    table = self.checkpoint_table()
    if len(values) != len(table):
      raise tools.CheckpointError(
          f'Checkpoint {filename} has {len(values)} arrays, this agent has {len(table)}; '
          f'it was written with other flags. It fits: {count_hint(self._c, len(values))}.')
    for index, ((name, var), value) in enumerate(zip(table, values)):
      dtype = np.dtype(tf.as_dtype(var.dtype).as_numpy_dtype)
      if tuple(var.shape) != value.shape or dtype != value.dtype:
        raise tools.CheckpointError(
            f'Checkpoint {filename} entry {index} ({name}): expected shape {tuple(var.shape)} {dtype}, '
            f'found {value.shape} {value.dtype}; it was written with other flags. '
            f'Likely differing: {entry_hint(name)}.')
    for (_, var), value in zip(table, values):
      var.assign(value)
    return int(values[0])

  # Summaries --------------------------------------------------------------------------------------------------------

  @tf.function(autograph=False)  # Plain Python control flow on config only; autograph would cost seconds.
  def _openl(self, data):
    """Video [6, T, 3 * 64, 64, 3] in [0, 1]: truth, model (5 observed steps, then open loop), error."""
    n = min(6, self._c.batch_size)
    data = preprocess({k: v[:n] for k, v in data.items()}, self._c)  # A raw batch, as train takes.
    embed = self._encode({'image': data['image']})
    post, _ = self._dynamics.observe(embed, data['action'])
    truth = data['image'] + 0.5
    recon = self._decode(self._dynamics.get_feat(post)).mode()
    init = {k: v[:, 4] for k, v in post.items()}
    prior = self._dynamics.imagine(data['action'][:, 5:], init)
    openl = self._decode(self._dynamics.get_feat(prior)).mode()
    model = tf.concat([recon[:, :5] + 0.5, openl + 0.5], 1)
    error = (model - truth + 1) / 2
    return tf.concat([truth, model, error], 2)

  def openl(self, data):
    """The open-loop video of `data` (numpy [6, T, 3 * 64, 64, 3] in [0, 1]); under a strategy, of the first
    replica's part of the batch. Only an agent with an image decoder has one (`has_decoder`)."""
    if not self.has_decoder:
      raise ValueError(f'--representation {self._c.representation} trains no image decoder, so the agent has no '
                       'open-loop video.')
    data = self._strategy.experimental_local_results(data)[0]
    return self._openl(data).numpy()


def metric_names(config):
  """The metrics the agent keeps (and its checkpoint holds), sorted by name: the reference's, less those of the
  networks the variant lacks, plus the variant's own."""
  if not config.log_scalars:
    return ['expl_amount']
  names = set(MODEL_METRICS)
  if has_decoder(config):
    names.add('image_loss')
  if config.representation == 'contrastive':
    names |= {'cpc_loss', 'cpc_accuracy'}
  if config.pcont:
    names.add('pcont_loss')
  if has_actor(config):
    names |= set(ACTOR_METRICS)
  if has_value(config):
    names |= set(VALUE_METRICS)
  if config.behavior == 'cem':
    names.add('planned_return')
  return sorted(names)


def checkpoint_names(config):
  """The entries of variables.pkl for a config, in the reference's order: its tf.Module traversal of the agent
  (attributes sorted by name, variables of a module before its submodules, each variable once). The variants'
  networks take the places their attribute names give them: `_cpc` after `_actor` (and `_actor_opt`, `_c`),
  before `_decode`; a missing network is left out."""
  dense = lambda module, layers: [f'{module}/{layer}/{w}' for layer in layers for w in ('kernel', 'bias')]
  head = lambda name: dense(name, dense_layers(name)) if DENSE[name].built(config) else []
  names = ['_step'] + head('_actor') + head('_cpc')
  if has_decoder(config):
    names += dense('_decode', ['h1', 'h2', 'h3', 'h4', 'h5'])
  names += [f'_dynamics/_cell/{w}' for w in ('kernel', 'recurrent_kernel', 'bias')]
  names += dense('_dynamics', ['img1', 'img2', 'img3', 'obs1', 'obs2'])
  names += dense('_encode', ['h1', 'h2', 'h3', 'h4'])
  names += [f'_metrics/{name}/{part}' for name in metric_names(config) for part in ('total', 'count')]
  # The reward and pcont heads are reached through the model optimizer, which sorts before them.
  return names + head('_reward') + head('_pcont') + head('_value')


# The flags that add or remove checkpoint entries, and the values that give each structure.
STRUCTURE = dict(pcont=(False, True), log_scalars=(True, False), value_estimate=('lambda', 'reward'),
                 behavior=('actor', 'cem'), representation=('reconstruction', 'contrastive', 'reward'))


def count_hint(config, count):
  """Which other settings of the flags that add or remove entries give variables.pkl `count` arrays."""
  fits = []
  for values in itertools.product(*STRUCTURE.values()):
    other = {k: v for k, v in zip(STRUCTURE, values) if v != config[k]}
    if other.get('value_estimate') == 'lambda' and config.value_estimate == 'nstep':
      del other['value_estimate']  # The same networks.
    if other and len(checkpoint_names(flags.AttrDict(config, **other))) == count:
      fits.append(' and '.join(f'--{k} {v}' for k, v in other.items()))
  fits = sorted(set(fits), key=len)
  listing = ' or '.join(fits[:4]) + (f' (or {len(fits) - 4} more)' if len(fits) > 4 else '')
  return listing if fits else f"no other setting of {', '.join('--' + k for k in STRUCTURE)} (another agent?)"


def entry_hint(name):
  """Flags that change the shape of the checkpoint entry called `name`."""
  if name.startswith('_actor/hout'):
    return '--action_dist or --task (the action space)'
  if name.startswith('_dynamics/img1/kernel'):
    return '--stoch_size or --task (the action size)'
  if name.startswith('_dynamics'):
    return '--deter_size, --stoch_size'
  if name.startswith(('_encode', '_decode/h2', '_decode/h3', '_decode/h4', '_decode/h5')):
    return '--cnn_depth'
  if name.startswith('_decode'):
    return '--cnn_depth, --deter_size, --stoch_size'
  if name.startswith('_metrics'):
    return '--log_scalars, --pcont, --value_estimate, --behavior, --representation'
  if name.startswith('_cpc'):
    return '--num_units, --deter_size, --stoch_size, --cnn_depth'
  if name == '_step':
    return 'none (the step counter must be an int64 scalar)'
  return '--num_units, --deter_size, --stoch_size'


# Data ---------------------------------------------------------------------------------------------------------------

def preprocess(obs, config):
  """Images to float32 in [-0.5, 0.5], other floats to float32, rewards clipped as --clip_rewards says."""
  obs = dict(obs)
  for key, value in obs.items():
    if key == 'image':
      obs[key] = tf.cast(value, tf.float32) / 255.0 - 0.5
    elif value.dtype.is_floating:
      obs[key] = tf.cast(value, tf.float32)
  if 'reward' in obs:
    clip_rewards = dict(none=lambda x: x, tanh=tf.tanh)[config.clip_rewards]
    obs['reward'] = clip_rewards(obs['reward'])
  return obs


def make_dataset(datadir, config, strategy):
  """An iterator of training batches, each split over the strategy's replicas: one input pipeline per worker
  (seeded apart) yields per-replica batches, and the worker's replicas take consecutive ones.

  The batches reach the replicas from Python, not through `distribute_datasets_from_function`: with TF 2.21 the
  per-device iterators that makes are slow to destroy (their tf.data autotuning thread is not woken when they are),
  which held a mirrored run up to a minute at its end."""
  replicas = strategy.num_replicas_in_sync
  batches = iter(load_dataset(datadir, config, config.batch_size // replicas,
                              seeds.dataset(config.seed, worker_index(strategy))))
  if replicas == 1:
    return batches
  local = len(strategy.extended.worker_devices)  # This worker's replicas; their ids are global.
  def split():
    while True:
      parts = [next(batches) for _ in range(local)]
      yield strategy.experimental_distribute_values_from_function(
          lambda ctx: parts[ctx.replica_id_in_sync_group % local])
  return split()


def load_dataset(directory, config, batch_size=None, seed=None):
  """Batches of [batch_size (default --batch_size), batch_length] windows drawn from the episodes on disk, as stored
  (uint8 images, raw rewards): `preprocess` is applied by the train step."""
  seed = config.seed if seed is None else seed
  generator = lambda: tools.load_episodes(
      directory, config.train_steps, config.batch_length, config.dataset_balance, seed,
      int(config.replay_cache_gb * 2 ** 30))
  episode = next(tools.load_episodes(directory, 1, config.batch_length, seed=seed))
  signature = {k: tf.TensorSpec((None,) + v.shape[1:], v.dtype) for k, v in episode.items()}
  dataset = tf.data.Dataset.from_generator(generator, output_signature=signature)
  dataset = dataset.batch(batch_size or config.batch_size, drop_remainder=True)
  # The reference maps `preprocess` here; the train step applies it instead, so that the 10 prefetched batches are
  # kept as uint8 images (31 MB each at the paper's batch) instead of float32 (123 MB): a gigabyte less memory,
  # and on the VMs measured first touching a gigabyte costs 2-3 s (docs/speed.md). The same batches and values.
  return dataset.prefetch(10)


# Environments -------------------------------------------------------------------------------------------------------

def make_env(config, prefix, index, worker=0):
  """An environment in its own worker process; `prefix` is train or test, `index` its number, `worker` the task
  index of a multi-worker run (so that workers collect different episodes)."""
  seed = seeds.env(config.seed, prefix, index, worker)
  # With 'train', evaluation plays whole games, so test returns compare with the paper's.
  life_done = config.life_done == 'both' or (config.life_done == 'train' and prefix == 'train')
  kwargs = dict(task=config.task, action_repeat=config.action_repeat, time_limit=config.time_limit, seed=seed,
                life_done=life_done)
  return wrappers.Async(f'{config.task} {prefix} {index}', kwargs, config.parallel, config.worker_timeout)


# Main ---------------------------------------------------------------------------------------------------------------

def setup(config):
  """Checks the logdir, sets devices and seeds. Returns the dtype policy name --precision resolves to (the agent
  builds its layers with it)."""
  config.logdir = pathlib.Path(config.logdir).expanduser()
  try:
    config.logdir.mkdir(parents=True, exist_ok=True)
    probe = config.logdir / '.write_test'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise UserError(f'Cannot write to --logdir {config.logdir}: {e.strerror}. Choose a writable folder.')
  if config.gpu_growth:
    for gpu in tf.config.list_physical_devices('GPU'):
      tf.config.experimental.set_memory_growth(gpu, True)
  if config.cpu_devices:
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * config.cpu_devices)
  if config.intra_op_threads:
    set_intra_op_threads(config.intra_op_threads)
  policy = resolve_precision(config)  # The agent resolves it the same way and passes it to its layers.
  keras.utils.set_random_seed(config.seed)
  return policy


def set_intra_op_threads(threads):
  """TensorFlow's intra-op thread count, which it fixes when its runtime starts (the first op or device query)."""
  current = tf.config.threading.get_intra_op_parallelism_threads()
  if current == threads:
    return
  try:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
  except RuntimeError:
    raise UserError(f'--intra_op_threads {threads}: TensorFlow has already started in this process with '
                    f'{current or "its default number of"} threads per op; set it before any TensorFlow work (or '
                    f'run dreamer.py in a new process).') from None


def make_strategy(config):
  """The tf.distribute strategy for --distribute, created before any other TensorFlow work (as
  MultiWorkerMirroredStrategy requires). auto: multi_worker when TF_CONFIG is set, mirrored over the GPUs when
  there are several, else none. mirrored uses all local GPUs, or all (logical, see --cpu_devices) CPUs."""
  mode = config.distribute
  if mode == 'auto':
    if os.environ.get('TF_CONFIG'):
      mode = 'multi_worker'
    else:
      mode = 'mirrored' if len(tf.config.list_physical_devices('GPU')) > 1 else 'none'
  if mode == 'none':
    return tf.distribute.get_strategy()
  if mode == 'multi_worker':
    if not os.environ.get('TF_CONFIG'):
      raise UserError('--distribute multi_worker needs the TF_CONFIG environment variable (cluster and task) on '
                      'every worker; see the README.')
    return tf.distribute.MultiWorkerMirroredStrategy()
  devices = tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('CPU')
  return tf.distribute.MirroredStrategy([d.name for d in devices])


def worker_index(strategy):
  """This process's task index in a multi-worker run, else 0: its environments and its input pipeline get seeds
  of their own."""
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return strategy.cluster_resolver.task_id
  return 0


def check_replicas(config, replicas):
  if config.batch_size % replicas:
    raise UserError(f'--batch_size {config.batch_size} does not split evenly over the {replicas} replicas of '
                    f'--distribute {config.distribute}; use a multiple of {replicas}.')


def _terminate(signum, frame):
  raise KeyboardInterrupt


def main(config):
  check_config(config)
  policy = setup(config)
  strategy = make_strategy(config)
  device = 'GPU' if tf.config.list_physical_devices('GPU') else 'CPU'
  print(f'Logdir {config.logdir}')
  print(f'Precision: --precision {config.precision} runs as {policy} on {device}.')
  if device == 'CPU':
    threads = runtime.threads_per_op()
    print(f'CPU: {runtime.describe_cpu()}{"; " + threads if threads else ""}.')
  warning = precision_warning(policy, device)
  if warning:
    print(warning, file=sys.stderr)
  check_replicas(config, strategy.num_replicas_in_sync)  # Before any environment starts.
  if strategy.num_replicas_in_sync > 1:
    print(f'Distribute: {type(strategy).__name__} with {strategy.num_replicas_in_sync} replicas; each trains on '
          f'{config.batch_size // strategy.num_replicas_in_sync} of the {config.batch_size} sequences of a batch.')
  if config.benchmark:  # Fresh agents on synthetic episodes: no checkpoint is read.
    import benchmark
    result = benchmark.run(config, lambda actspace, c=config: Dreamer(c, actspace, strategy),
                           lambda datadir: make_dataset(datadir, config, strategy), make_env, policy, PROCESS_START)
    return benchmark.report(result, config.logdir)
  checkpoint = resolve_checkpoint(config)
  if config.eval_only:
    return evaluate(config, checkpoint)
  return train(config, strategy, checkpoint)


def precision_warning(policy, device):
  """A warning when bfloat16 would train with TensorFlow's own bfloat16 kernels (oneDNN off, or a CPU it does not
  take bfloat16 on): their convolution filter gradients sum in bfloat16. None otherwise."""
  if device != 'CPU' or policy != 'mixed_bfloat16' or runtime.onednn_takes_bfloat16():
    return None
  why = ('oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0)' if not runtime.onednn_enabled() else
         'oneDNN does not take bfloat16 on this CPU (no AVX-512)')
  return (f'Warning: --precision 16 runs as mixed_bfloat16, but {why}: TensorFlow\'s own bfloat16 convolution '
          'gradients sum in bfloat16 (about 3% off against float32, where oneDNN\'s are within 0.4%). Unset '
          'TF_ENABLE_ONEDNN_OPTS, or run --precision 32 (or DREAMER_CPU_BF16=0).')


def resolve_checkpoint(config):
  """The one place that decides which variables.pkl a run loads: --checkpoint, else the logdir's own (a resumed
  run; --eval_only needs one), else None (a new agent). The file is read once here, so that a missing, truncated or
  unsafe one stops before any environment starts."""
  if config.checkpoint:
    checkpoint = pathlib.Path(config.checkpoint).expanduser()
  else:
    checkpoint = config.logdir / 'variables.pkl'
    if not checkpoint.exists() and not config.eval_only:
      return None
  tools.read_checkpoint(checkpoint)
  return checkpoint


def train(config, strategy, checkpoint):
  """Checks the logdir against the flags, starts the environments and runs the training loop (loop.train)."""
  datadir = config.logdir / 'episodes'
  stored = tools.count_episodes(datadir)[0]
  flags.check_resume(config, bool(stored) or (config.logdir / 'variables.pkl').exists())
  if config.prefill <= 0 and not stored:
    raise UserError(f'--prefill {config.prefill}: the replay in {datadir} is empty, so the agent has nothing to '
                    'learn from; use a positive --prefill.')
  writer = tf.summary.create_file_writer(str(config.logdir), max_queue=1000, flush_millis=20000)
  worker = worker_index(strategy)
  train_envs, test_envs = [], []
  try:
    for i in range(config.envs):
      train_envs.append(make_env(config, 'train', i, worker))
      test_envs.append(make_env(config, 'test', i, worker))
    actspace = train_envs[0].action_space
    actspace.seed(seeds.prefill(config.seed, worker))
    tools.write_json(config.logdir / 'config.json', dict(config))  # Once the task is known to exist.
    agent = lambda: Dreamer(config, actspace, strategy)
    dataset = lambda: make_dataset(datadir, config, strategy)
    loop.train(config, datadir, agent, dataset, train_envs, test_envs, actspace, writer, checkpoint)
  finally:
    for env in train_envs + test_envs:
      env.close()
    writer.flush()


def evaluate(config, checkpoint):
  """Runs eval_episodes test episodes with the loaded agent (actor mode + eval_noise); stores nothing in a replay.
  Writes eval.json and the first episode as eval_video.gif in the logdir."""
  envs = []
  try:
    for i in range(config.envs):
      envs.append(make_env(config, 'test', i))
    agent = Dreamer(config, envs[0].action_space)
    step = agent.load(checkpoint)
    print(f'Loaded checkpoint {checkpoint} (step {step}); evaluating {config.eval_episodes} episodes.')
    episodes = []
    def on_episode(episode):
      episodes.append(tools.stored(episode, config.precision))  # Its return as the training loop logs it.
      print(f'Eval episode {len(episodes)}: return {tools.episode_return(episode):.1f}.')
    policy = lambda obs, reset, state: agent.policy(obs, reset, state, training=False, step=step)
    tools.simulate(policy, envs, episodes=config.eval_episodes, on_episode=on_episode)
  finally:
    for env in envs:
      env.close()
  episodes = episodes[:config.eval_episodes]
  returns = [tools.episode_return(ep) for ep in episodes]
  result = dict(task=config.task, checkpoint=str(checkpoint), step=step, returns=returns,
                mean=float(np.mean(returns)), std=float(np.std(returns)))
  tools.write_json(config.logdir / 'eval.json', result)
  (config.logdir / 'eval_video.gif').write_bytes(tools.encode_gif(episodes[0]['image'], 20))
  print(f'Mean return over {len(returns)} episodes: {result["mean"]:.1f} (std {result["std"]:.1f}).')
  return result


def cli(config):
  try:
    main(config)
  except (UserError, wrappers.TaskError, tools.CheckpointError, tools.NoEpisodesError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(2)
  except (NonFiniteError, wrappers.WorkerError) as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    print('Interrupted.', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  signal.signal(signal.SIGTERM, _terminate)  # The process's own setting: SIGTERM stops a run as Ctrl-C does.
  cli(CONFIG)
