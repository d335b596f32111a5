"""The networks: Keras 3 layers, no I/O.

Layers compute in the global dtype policy (float32, bfloat16 or float16); distribution parameters are cast to
float32 before any distribution is built, so log-probs, KLs and losses are float32.
"""

import keras
import numpy as np
import tensorflow as tf
from tensorflow_probability import distributions as tfd

import tools

ACTS = dict(elu=tf.nn.elu, relu=tf.nn.relu, swish=tf.nn.swish, leaky_relu=tf.nn.leaky_relu)


def get_act(name):
  if callable(name):
    return name
  if name not in ACTS:
    raise ValueError(f"Unknown activation '{name}'. Choose one of: {', '.join(ACTS)}.")
  return ACTS[name]


class RSSM(keras.layers.Layer):
  """Recurrent state-space model. A state is dict(mean, std, stoch, deter): mean, std, stoch float32 [B, stoch],
  deter in the compute dtype [B, deter]."""

  def __init__(self, stoch=30, deter=200, hidden=200, act='elu', shared_noise=True, **kwargs):
    super().__init__(**kwargs)
    self._activation = get_act(act)
    self._stoch_size = stoch
    self._deter_size = deter
    self._hidden_size = hidden
    self._shared_noise = shared_noise
    self._cell = keras.layers.GRUCell(deter, name='gru_cell')
    self.img1 = keras.layers.Dense(hidden, self._activation, name='img1')
    self.img2 = keras.layers.Dense(hidden, self._activation, name='img2')
    self.img3 = keras.layers.Dense(2 * stoch, None, name='img3')
    self.obs1 = keras.layers.Dense(hidden, self._activation, name='obs1')
    self.obs2 = keras.layers.Dense(2 * stoch, None, name='obs2')

  def initial(self, batch_size):
    zeros = lambda size, dtype: tf.zeros([batch_size, size], dtype)
    return dict(
        mean=zeros(self._stoch_size, tf.float32), std=zeros(self._stoch_size, tf.float32),
        stoch=zeros(self._stoch_size, tf.float32), deter=zeros(self._deter_size, self.compute_dtype))

  def observe(self, embed, action, state=None):
    """embed [B, T, E], action [B, T, A] -> post, prior with entries [B, T, ...]."""
    if state is None:
      state = self.initial(tf.shape(action)[0])
    embed = tf.transpose(embed, [1, 0, 2])
    action = tf.transpose(action, [1, 0, 2])
    post, prior = tools.static_scan(
        lambda prev, inputs: self.obs_step(prev[0], *inputs), (action, embed), (state, state))
    post = {k: tf.transpose(v, [1, 0, 2]) for k, v in post.items()}
    prior = {k: tf.transpose(v, [1, 0, 2]) for k, v in prior.items()}
    return post, prior

  def imagine(self, action, state=None):
    """action [B, T, A] -> prior with entries [B, T, ...]."""
    if state is None:
      state = self.initial(tf.shape(action)[0])
    assert isinstance(state, dict), state
    action = tf.transpose(action, [1, 0, 2])
    prior = tools.static_scan(self.img_step, action, state)
    return {k: tf.transpose(v, [1, 0, 2]) for k, v in prior.items()}

  def get_feat(self, state):
    """[..., stoch + deter] in the compute dtype."""
    deter = state['deter']
    return tf.concat([tf.cast(state['stoch'], deter.dtype), deter], -1)

  def get_dist(self, state):
    return tfd.MultivariateNormalDiag(state['mean'], state['std'])

  def obs_step(self, prev_state, prev_action, embed):
    prior = self.img_step(prev_state, prev_action)
    x = tf.concat([prior['deter'], tf.cast(embed, prior['deter'].dtype)], -1)
    x = self.obs1(x)
    x = self.obs2(x)
    post = self._stoch_state(x, prior['deter'])
    return post, prior

  def img_step(self, prev_state, prev_action):
    dtype = self.compute_dtype
    x = tf.concat([tf.cast(prev_state['stoch'], dtype), tf.cast(prev_action, dtype)], -1)
    x = self.img1(x)
    x, deter = self._cell(x, [tf.cast(prev_state['deter'], dtype)])
    deter = deter[0]  # Keras returns the GRU state as a list.
    x = self.img2(x)
    x = self.img3(x)
    return self._stoch_state(x, deter)

  def _stoch_state(self, x, deter):
    mean, std = tf.split(tf.cast(x, tf.float32), 2, -1)
    std = tf.nn.softplus(std) + 0.1
    stoch = tools.sample_normal(mean, std, self._shared_noise)
    return {'mean': mean, 'std': std, 'stoch': stoch, 'deter': deter}


class ConvEncoder(keras.layers.Layer):

  def __init__(self, depth=32, act='relu', **kwargs):
    super().__init__(**kwargs)
    self._depth = depth
    kw = dict(strides=2, activation=get_act(act))
    self.h1 = keras.layers.Conv2D(1 * depth, 4, name='h1', **kw)
    self.h2 = keras.layers.Conv2D(2 * depth, 4, name='h2', **kw)
    self.h3 = keras.layers.Conv2D(4 * depth, 4, name='h3', **kw)
    self.h4 = keras.layers.Conv2D(8 * depth, 4, name='h4', **kw)

  def call(self, obs):
    """obs['image'] [..., 64, 64, 3] float -> embed [..., 32 * depth] in the compute dtype."""
    image = obs['image']
    x = tf.reshape(tf.cast(image, self.compute_dtype), (-1,) + tuple(image.shape[-3:]))
    x = self.h4(self.h3(self.h2(self.h1(x))))
    shape = tf.concat([tf.shape(image)[:-3], [32 * self._depth]], 0)
    return tf.reshape(x, shape)


class ConvDecoder(keras.layers.Layer):

  def __init__(self, depth=32, act='relu', shape=(64, 64, 3), **kwargs):
    super().__init__(**kwargs)
    self._depth = depth
    self._shape = tuple(shape)
    kw = dict(strides=2, activation=get_act(act))
    self.h1 = keras.layers.Dense(32 * depth, None, name='h1')
    self.h2 = keras.layers.Conv2DTranspose(4 * depth, 5, name='h2', **kw)
    self.h3 = keras.layers.Conv2DTranspose(2 * depth, 5, name='h3', **kw)
    self.h4 = keras.layers.Conv2DTranspose(1 * depth, 6, name='h4', **kw)
    self.h5 = keras.layers.Conv2DTranspose(self._shape[-1], 6, strides=2, name='h5')

  def call(self, features):
    """features [..., F] -> Independent(Normal(mean, 1)) over [..., 64, 64, 3], float32."""
    x = self.h1(features)
    x = tf.reshape(x, [-1, 1, 1, 32 * self._depth])
    x = self.h5(self.h4(self.h3(self.h2(x))))
    mean = tf.reshape(tf.cast(x, tf.float32), tf.concat([tf.shape(features)[:-1], self._shape], 0))
    return tfd.Independent(tfd.Normal(mean, 1), len(self._shape))


class _MLP(keras.layers.Layer):
  """`layers` x Dense(units, act) named h0, h1, ..., then Dense(out) named hout, as the reference names them."""

  def __init__(self, layers, units, out, act, **kwargs):
    super().__init__(**kwargs)
    self._hidden = [keras.layers.Dense(units, get_act(act), name=f'h{i}') for i in range(layers)]
    self.hout = keras.layers.Dense(out, name='hout')

  @property
  def dense_layers(self):
    return self._hidden + [self.hout]

  def _forward(self, features):
    """[..., F] -> [..., out] float32."""
    x = features
    for layer in self._hidden:
      x = layer(x)
    return tf.cast(self.hout(x), tf.float32)


class DenseDecoder(_MLP):

  def __init__(self, shape, layers, units, dist='normal', act='elu', **kwargs):
    super().__init__(layers, units, int(np.prod(shape)), act, **kwargs)
    self._shape = tuple(shape)
    self._dist = dist
    if dist not in ('normal', 'binary'):
      raise NotImplementedError(dist)

  def call(self, features):
    x = self._forward(features)
    x = tf.reshape(x, tf.concat([tf.shape(features)[:-1], self._shape], 0))
    if self._dist == 'normal':
      return tfd.Independent(tfd.Normal(x, 1), len(self._shape))
    return tfd.Independent(tfd.Bernoulli(x, dtype=tf.float32), len(self._shape))


class ActionDecoder(_MLP):

  def __init__(self, size, layers, units, dist='tanh_normal', act='elu', min_std=1e-4, init_std=5,
               mean_scale=5, **kwargs):
    if dist not in ('tanh_normal', 'onehot'):
      raise NotImplementedError(dist)
    super().__init__(layers, units, 2 * size if dist == 'tanh_normal' else size, act, **kwargs)
    self._size = size
    self._dist = dist
    self._min_std = min_std
    self._init_std = init_std
    self._mean_scale = mean_scale

  def call(self, features):
    x = self._forward(features)
    if self._dist == 'tanh_normal':
      raw_init_std = np.log(np.exp(self._init_std) - 1)
      mean, std = tf.split(x, 2, -1)
      mean = self._mean_scale * tf.tanh(mean / self._mean_scale)
      std = tf.nn.softplus(std + raw_init_std) + self._min_std
      dist = tfd.Normal(mean, std)
      dist = tfd.TransformedDistribution(dist, tools.TanhBijector())
      dist = tfd.Independent(dist, 1)
      return tools.SampleDist(dist)
    return tools.OneHotDist(x)
