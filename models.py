"""The networks: Keras 3 layers, no I/O.

Each layer computes in the dtype policy it is given (`dtype=`: float32, mixed_bfloat16 or mixed_float16; Keras's
global policy when none is given) and hands it to its sublayers; distribution parameters are cast to float32
before any distribution is built, so log-probs, KLs and losses are float32.
"""

import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf
from tensorflow_probability import distributions as tfd

import tools

def _xla(fn):
  """fn as one XLA program (jit_compile) inside the surrounding graph: its element-wise ops fused into one loop."""
  return tf.function(fn, jit_compile=True, autograph=False)


# TensorFlow's ReluGrad and EluGrad, as XLA programs. TensorFlow's CPU kernels for these (and BiasAdd, Relu) in
# bfloat16 convert every element on its own; XLA's fused loops ran them 2-3x faster on the AMX CPU (77M elements:
# ReluGrad 50 against 25 ms, bias + relu 109 against 33 ms; docs/speed.md, session 13).
_relu_grad = _xla(lambda dy, y: tf.where(y > 0, dy, tf.zeros_like(dy)))
_elu_grad = _xla(lambda dy, y: tf.where(y < 0, (y + 1) * dy, dy))
_BF16_GRADS = {'relu': (tf.nn.relu, _relu_grad), 'elu': (tf.nn.elu, _elu_grad)}
# XLA compiles each program once per shape, 25-90 ms each, in the first train step: only tensors this large take
# the XLA activations (the paper's imagination, heads, encoder and decoder; not the RSSM's per-step [B, 200]).
XLA_MIN_ELEMENTS = 2 ** 18


def _xla_pays(x):
  return x.dtype == tf.bfloat16 and x.shape.is_fully_defined() and x.shape.num_elements() >= XLA_MIN_ELEMENTS


def _with_bfloat16_grad(name):
  """The activation tf.nn.<name>; in bfloat16 its gradient is computed by an XLA program from its output, as
  TensorFlow's own gradient computes it (the same arithmetic; only how bfloat16 rounds inside may differ). The
  forward op stays TensorFlow's, so oneDNN still fuses it with the matmul or convolution before it."""
  forward, grad = _BF16_GRADS[name]

  @tf.custom_gradient
  def fast(x):
    y = forward(x)
    return y, lambda dy: grad(dy, y)

  def act(x):
    x = tf.convert_to_tensor(x)
    return fast(x) if _xla_pays(x) else forward(x)
  act.__name__ = name
  return act


ACTS = dict(elu=_with_bfloat16_grad('elu'), relu=_with_bfloat16_grad('relu'), swish=tf.nn.swish,
            leaky_relu=tf.nn.leaky_relu)


def bias_act(x, bias, activation):
  """activation(x + bias [C]) over the last axis, for a layer whose matmul or convolution oneDNN cannot fuse with
  its bias and activation (a transposed convolution). In bfloat16 with relu or elu the forward pass is one XLA
  program (one pass over x instead of two of TensorFlow's slower bfloat16 kernels), rounded once: relu's values
  are bias_add's and tf.nn.relu's, elu's may differ from theirs by bfloat16's rounding of x + bias. The gradient
  is the activation's XLA program and the bias gradient its float32 sum, as bias_add sums it. Else bias_add, then
  the activation."""
  if not _bias_act_fuses(x, activation):
    x = bias_add(x, bias)
    return activation(x) if activation is not None else x
  return _bias_act_bfloat16(activation.__name__)(x, tf.cast(bias, x.dtype))


def _bias_act_fuses(x, activation):
  """Whether bias_act computes x + bias and the activation as one XLA program: this module's relu or elu (not any
  function of that name) on a large enough bfloat16 tensor."""
  return any(activation is ACTS[name] for name in _BF16_GRADS) and _xla_pays(x)


@functools.cache
def _bias_act_bfloat16(name):
  act, grad = _BF16_GRADS[name]
  # The activation in float32 (XLA's bfloat16 elu came out up to 3 roundings off), rounded once: XLA keeps x + bias
  # in float32 too (it drops the rounding to bfloat16 between the two).
  forward = _xla(lambda x, bias: tf.cast(act(tf.cast(x + bias, tf.float32)), x.dtype))

  @tf.custom_gradient
  def fused(x, bias):
    y = forward(x, bias)

    def backward(dy):
      dx = grad(dy, y)
      return dx, _channel_sum(dx)
    return y, backward
  return fused


def get_act(name):
  if callable(name):
    return name
  if name not in ACTS:
    raise ValueError(f"Unknown activation '{name}'. Choose one of: {', '.join(ACTS)}.")
  return ACTS[name]


def bias_add(x, bias):
  """x + bias [C] over the last axis, as Keras adds a layer's bias (BiasAdd, which oneDNN fuses with the matmul or
  convolution before it). Below float32 the bias gradient is summed in float32: TensorFlow's CPU BiasAddGrad sums
  in the input's dtype, and in bfloat16 its sum over a batch is far off (the bias gradient of a [2500, 400] Dense
  layer whose output gradients average 1 came out up to 61% wrong, the decoder's last layer's had the wrong sign;
  docs/speed.md, session 10). In float32 it is Keras's own op and gradient.

  In bfloat16 a broadcast add: its gradient is TensorFlow's Sum, which accumulates bfloat16 in float32, and
  grappler fuses it with the matmul or convolution as it fuses BiasAdd (checked in the optimized graph); a
  custom gradient computing the same Sum cost about 2 ms more per call to trace (0.03-0.05 s of the train step's
  trace; docs/speed.md, session 14). In float16 TensorFlow's Sum adds in float16 (10,000 ones come out 2048), so the
  gradient is summed in float32 by a custom gradient."""
  bias = tf.cast(bias, x.dtype)
  if x.dtype == tf.float32:
    return tf.nn.bias_add(x, bias)
  if x.dtype == tf.bfloat16:
    if bias.shape.rank != 1 or x.shape[-1] not in (None, bias.shape[0]):  # What BiasAdd would refuse.
      raise ValueError(f'bias_add: bias {bias.shape} does not match the last axis of {x.shape}.')
    return x + bias
  return _bias_add_summed_in_float32(x, bias)


@tf.custom_gradient
def _bias_add_summed_in_float32(x, bias):
  return tf.nn.bias_add(x, bias), lambda dy: (dy, _channel_sum(dy))


def _channel_sum(dy):
  """dy [..., C] summed over all but the last axis, in dy's dtype: a bias gradient. Accumulated in float32 and
  rounded once, except for bfloat16 with 3 or fewer channels (below)."""
  axes = list(range(dy.shape.rank - 1))
  if dy.dtype == tf.float16:
    return tf.cast(tf.reduce_sum(tf.cast(dy, tf.float32), axes), dy.dtype)
  # TensorFlow's Sum accumulates bfloat16 in float32 (kernels/reduction_ops.h) and rounds only the result: the
  # float32 sum without a float32 copy of dy, which cost a third of a second per paper-size step (docs/speed.md,
  # session 11).
  channels = dy.shape[-1]
  if dy.dtype == tf.bfloat16 and dy.shape.rank >= 3 and dy.shape[1:].is_fully_defined() and channels <= 3:
    # The decoder's 3 channels innermost: TensorFlow's Sum ran at a fifth of its speed on 32 channels. Rows of
    # [W * C] first (a column sum at full speed), then each channel's W partial sums, each rounded to bfloat16:
    # the decoder's last bias gradient 40 -> 9 ms at the paper's size (docs/speed.md, session 15). With 4 to 12
    # channels the row sums were slower than the plain Sum (a review's measurement), so only up to 3 take them.
    partial = tf.reduce_sum(tf.reshape(dy, [-1, dy.shape[-2] * channels]), 0)  # [W * C]
    return tf.reduce_sum(tf.reshape(partial, [-1, channels]), 0)
  return tf.reduce_sum(dy, axes)


@contextlib.contextmanager
def computing_in(layers, policy):
  """Within the block, `layers` and all their sublayers compute in the dtype policy `policy` (e.g. 'float32');
  their variables, which are float32 under every policy, are untouched. For tracing a graph in another dtype than
  the one the layers were built with (the agent's float32 acting graph under mixed_bfloat16); the layers' own
  policies are back on exit."""
  every = [sub for layer in layers for sub in layer._flatten_layers(include_self=True, recursive=True)]
  before = [layer.dtype_policy for layer in every]
  try:
    for layer in every:
      layer.dtype_policy = policy
    yield
  finally:
    for layer, own in zip(every, before):
      layer.dtype_policy = own


class Dense(keras.layers.Dense):
  """keras.layers.Dense with its bias added by bias_add (the same weights, names and forward values)."""

  def call(self, inputs, training=None):
    x = bias_add(keras.ops.matmul(inputs, self.kernel), self.bias)
    return self.activation(x) if self.activation is not None else x


class Conv2D(keras.layers.Conv2D):
  """keras.layers.Conv2D with its bias added by bias_add. `matmul_filter_grad`: the filter gradient is one matmul of
  the input's patches (conv2d_matmul_filter_grad), for a layer with few output pixels."""

  def __init__(self, *args, matmul_filter_grad=False, **kwargs):
    super().__init__(*args, **kwargs)
    self._matmul_filter_grad = matmul_filter_grad
    if matmul_filter_grad:  # What conv2d_matmul_filter_grad computes.
      assert self.padding == 'valid' and self.data_format == 'channels_last' and self.dilation_rate == (1, 1)
      assert self.strides[0] == self.strides[1] and self.groups == 1 and self.use_bias

  def call(self, inputs):
    if self._matmul_filter_grad:
      x = conv2d_matmul_filter_grad(inputs, tf.cast(self.kernel, inputs.dtype), self.strides[0])
    else:
      x = self.convolution_op(inputs, self.kernel)
    x = bias_add(x, self.bias)
    return self.activation(x) if self.activation is not None else x


class Conv2DTranspose(keras.layers.Conv2DTranspose):
  """keras.layers.Conv2DTranspose with its bias added by bias_add. `subpixel`: the forward pass is
  conv2d_transpose_subpixel (stride 2, valid padding, an even kernel), for a layer with few output channels."""

  def __init__(self, *args, subpixel=False, **kwargs):
    super().__init__(*args, **kwargs)
    self._subpixel = subpixel
    if subpixel:  # What conv2d_transpose_subpixel computes.
      assert self.strides == (2, 2) and self.padding == 'valid' and self.dilation_rate == (1, 1)
      assert self.kernel_size[0] == self.kernel_size[1] and self.kernel_size[0] % 2 == 0 and self.use_bias
      assert self.data_format == 'channels_last' and self.output_padding is None

  def call(self, inputs):
    if self._subpixel:
      x = conv2d_transpose_subpixel(inputs, tf.cast(self.kernel, inputs.dtype), tf.cast(self.bias, inputs.dtype))
    else:
      x = keras.ops.conv_transpose(inputs, self.kernel, strides=list(self.strides), padding=self.padding,
                                   output_padding=self.output_padding, dilation_rate=self.dilation_rate,
                                   data_format=self.data_format)
      return bias_act(x, self.bias, self.activation)
    return self.activation(x) if self.activation is not None else x


def conv2d_matmul_filter_grad(x, kernel, stride):
  """tf.nn.conv2d(x, kernel, stride, 'VALID'), x [N, H, W, C], kernel [k, k, C, out], with its filter gradient
  computed as one matmul: the input's k x k patches at the output pixels [N * pixels, k * k * C] (transposed) times
  the output gradient [N * pixels, out]. The same sums in another order. oneDNN's own filter gradient of the
  encoder's last layer ([N, 6, 6, 4 * depth] -> [N, 2, 2, 8 * depth]) ran at an eighth of the matmul peak; the
  matmul takes about half its time (docs/speed.md, session 11). The forward pass and the input gradient are
  TensorFlow's."""
  strides = [1, stride, stride, 1]

  @tf.custom_gradient
  def conv(x, kernel):
    def grad(dy):
      k, _, channels, out = kernel.shape
      rows, cols = dy.shape[1], dy.shape[2]
      patches = tf.stack([x[:, stride * i:stride * i + k, stride * j:stride * j + k, :]
                          for i in range(rows) for j in range(cols)], 1)  # [N, rows * cols, k, k, C]
      patches = tf.reshape(patches, [-1, k * k * channels])
      dkernel = tf.matmul(patches, tf.reshape(dy, [-1, out]), transpose_a=True)  # [k * k * C, out]
      dx = tf.raw_ops.Conv2DBackpropInput(
          input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=strides, padding='VALID')
      return dx, tf.reshape(dkernel, kernel.shape)
    return tf.nn.conv2d(x, kernel, strides, 'VALID'), grad

  return conv(x, kernel)


@tf.custom_gradient
def conv2d_transpose_subpixel(x, kernel, bias):
  """The stride-2, valid-padding transposed convolution of x [N, H, W, C] with an even kernel [k, k, out, C], plus
  bias [out], as a stride-1 convolution to the 4 output phases (4 * out channels) and depth_to_space: output
  pixel (2m + p, 2n + q) takes kernel rows p, p + 2, ... and columns q, q + 2, ..., so each phase is a
  (k/2) x (k/2) convolution of x padded by k/2 - 1. The same sums in another order. oneDNN's transposed
  convolution to the decoder's 3 channels ran at a seventh of its speed to 32, and the bias (added to the 4
  phases before depth_to_space) fuses with this convolution (docs/speed.md, session 11). The gradients are the
  transposed convolution's own (a strided convolution and a filter gradient), which oneDNN runs fast, and the
  bias's summed as bias_add sums it."""
  k, _, out, channels = kernel.shape
  half = k // 2
  phases = tf.reverse(tf.reshape(kernel, [half, 2, half, 2, out, channels]), [0, 2])  # [a, p, b, q, out, C]
  phases = tf.reshape(tf.transpose(phases, [0, 2, 5, 1, 3, 4]), [half, half, channels, 4 * out])
  padded = tf.pad(x, [[0, 0], [half - 1, half - 1], [half - 1, half - 1], [0, 0]])
  y = tf.nn.bias_add(tf.nn.conv2d(padded, phases, 1, 'VALID'), tf.tile(bias, [4]))  # Channels (p, q, out).
  y = _depth_to_space_2x2(y)  # [N, 2H + k - 2, 2W + k - 2, out]

  def grad(dy):
    strides = [1, 2, 2, 1]
    dx = tf.nn.conv2d(dy, kernel, strides, 'VALID')
    dkernel = tf.raw_ops.Conv2DBackpropFilter(
        input=dy, filter_sizes=tf.shape(kernel), out_backprop=x, strides=strides, padding='VALID')
    return dx, dkernel, _channel_sum(dy)
  return y, grad


def _depth_to_space_2x2(y):
  """tf.nn.depth_to_space(y, 2) for y [N, H, W, 4 * C] as a reshape and transpose (the same values): TensorFlow's
  DepthToSpace copies C elements at a time, and for the decoder's 3 channels took 43 ms (with the cast after it)
  where oneDNN's transpose takes 15 ms at the paper's size (docs/speed.md, session 15). TensorFlow's op where the
  height, width or channels are unknown when traced."""
  if y.shape.rank != 4 or not y.shape[1:].is_fully_defined():
    return tf.nn.depth_to_space(y, 2)
  _, h, w, c = y.shape
  y = tf.reshape(y, [-1, h, w, 2, 2, c // 4])  # [N, H, W, p, q, C]
  y = tf.transpose(y, [0, 1, 3, 2, 4, 5])  # [N, H, p, W, q, C]
  return tf.reshape(y, [-1, 2 * h, 2 * w, c // 4])


class _Composite(keras.layers.Layer):
  """A layer whose weights all live in sublayers, which build themselves on their first call."""

  def build(self, input_shape):
    # Without a build of its own, Keras 3 builds such a layer by first tracing its whole call on symbolic inputs:
    # 0.9 s of the agent's construction at the paper's size, for nothing the eager first call does not do anyway.
    del input_shape


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
    kw = dict(dtype=self.dtype_policy)
    self._cell = GRUCell(deter, name='gru_cell', **kw)
    self.img1 = Dense(hidden, self._activation, name='img1', **kw)
    self.img2 = Dense(hidden, self._activation, name='img2', **kw)
    self.img3 = Dense(2 * stoch, None, name='img3', **kw)
    self.obs1 = Dense(hidden, self._activation, name='obs1', **kw)
    self.obs2 = Dense(2 * stoch, None, name='obs2', **kw)

  def initial(self, batch_size):
    zeros = lambda size, dtype: tf.zeros([batch_size, size], dtype)
    return dict(
        mean=zeros(self._stoch_size, tf.float32), std=zeros(self._stoch_size, tf.float32),
        stoch=zeros(self._stoch_size, tf.float32), deter=zeros(self._deter_size, self.compute_dtype))

  def observe(self, embed, action, state=None, seed=None):
    """embed [B, T, E], action [B, T, A] -> post, prior with entries [B, T, ...]. With a seed [2] the sampling
    is stateless (step t uses fold(seed, t)); without, it is stateful as in the reference."""
    if state is None:
      state = self.initial(tf.shape(action)[0])
    embed = tf.transpose(embed, [1, 0, 2])
    action = tf.transpose(action, [1, 0, 2])
    steps = tf.range(tf.shape(action)[0])
    with tf.name_scope('observe'):  # Names the loop's ops in profiles.
      post, prior = tools.scan(
          lambda prev, inputs: self.obs_step(prev[0], inputs[0], inputs[1], tools.fold(seed, inputs[2])),
          (action, embed, steps), (state, state))
    post = {k: tf.transpose(v, [1, 0, 2]) for k, v in post.items()}
    prior = {k: tf.transpose(v, [1, 0, 2]) for k, v in prior.items()}
    return post, prior

  def imagine(self, action, state=None, seed=None):
    """action [B, T, A] -> prior with entries [B, T, ...]."""
    if state is None:
      state = self.initial(tf.shape(action)[0])
    assert isinstance(state, dict), state
    action = tf.transpose(action, [1, 0, 2])
    steps = tf.range(tf.shape(action)[0])
    prior = tools.scan(
        lambda prev, inputs: self.img_step(prev, inputs[0], tools.fold(seed, inputs[1])), (action, steps), state)
    return {k: tf.transpose(v, [1, 0, 2]) for k, v in prior.items()}

  def get_feat(self, state):
    """[..., stoch + deter] in the compute dtype."""
    deter = state['deter']
    return tf.concat([tf.cast(state['stoch'], deter.dtype), deter], -1)

  def get_dist(self, state):
    return tfd.MultivariateNormalDiag(state['mean'], state['std'])

  def obs_step(self, prev_state, prev_action, embed, seed=None):
    prior = self.img_step(prev_state, prev_action, tools.fold(seed, 0))
    x = tf.concat([prior['deter'], tf.cast(embed, prior['deter'].dtype)], -1)
    x = self.obs1(x)
    x = self.obs2(x)
    post = self._stoch_state(x, prior['deter'], tools.fold(seed, 1))
    return post, prior

  def img_step(self, prev_state, prev_action, seed=None):
    dtype = self.compute_dtype
    x = tf.concat([tf.cast(prev_state['stoch'], dtype), tf.cast(prev_action, dtype)], -1)
    x = self.img1(x)
    x, deter = self._cell(x, [tf.cast(prev_state['deter'], dtype)])
    deter = deter[0]  # Keras returns the GRU state as a list.
    x = self.img2(x)
    x = self.img3(x)
    return self._stoch_state(x, deter, seed)

  def _stoch_state(self, x, deter, seed=None):
    mean, std = tf.split(tf.cast(x, tf.float32), 2, -1)
    std = tf.nn.softplus(std) + 0.1
    stoch = tools.sample_normal(mean, std, self._shared_noise, seed)
    return {'mean': mean, 'std': std, 'stoch': stoch, 'deter': deter}


class GRUCell(keras.layers.GRUCell):
  """Keras's GRUCell (reset_after, sigmoid gates, tanh), with the gates split by one tf.split instead of three
  strided slices: the same math, but the gradient is a concat rather than three zero-padded StridedSliceGrads."""

  def call(self, inputs, states, training=False):
    h_tm1 = states[0] if isinstance(states, (list, tuple)) else states
    input_bias, recurrent_bias = tf.unstack(self.bias)
    mx, mh = tf.matmul(inputs, self.kernel), tf.matmul(h_tm1, self.recurrent_kernel)  # [B, 3 * units] each.
    if (h_tm1.dtype == tf.bfloat16 and h_tm1.shape.is_fully_defined()
        and self.activation is keras.activations.tanh and self.recurrent_activation is keras.activations.sigmoid):
      # Plain matmuls (oneDNN's AMX kernel; with the bias fused they run its slower inner product) and the gates'
      # element-wise arithmetic as one XLA program, forward and backward (docs/speed.md, session 13). At any batch
      # size: in the 50-step observe loop its ~40 small ops per step cost more than the two compiles.
      h = _gru_gates(mx, mh, input_bias, recurrent_bias, h_tm1)
    else:  # In the layer's dtype, TensorFlow's ops (grappler fuses each matmul with its bias).
      h = _gru_state(mx, mh, input_bias, recurrent_bias, h_tm1, self.activation, self.recurrent_activation)
    return h, [h]


def _gru_state(mx, mh, input_bias, recurrent_bias, h_tm1, activation=tf.tanh, recurrent_activation=tf.sigmoid):
  """GRUCell's new state (reset_after) from its two matmuls mx = inputs @ kernel and mh = h_tm1 @
  recurrent_kernel [B, 3 * units], in their dtype."""
  x_z, x_r, x_h = tf.split(mx + input_bias, 3, -1)
  h_z, h_r, h_h = tf.split(mh + recurrent_bias, 3, -1)
  z = recurrent_activation(x_z + h_z)
  r = recurrent_activation(x_r + h_r)
  hh = activation(x_h + r * h_h)
  return z * h_tm1 + (1 - z) * hh


def _gru_gates_float32(mx, mh, input_bias, recurrent_bias, h_tm1):
  """_gru_state computed in float32 and rounded once to h_tm1's dtype."""
  f = lambda t: tf.cast(t, tf.float32)
  return tf.cast(_gru_state(f(mx), f(mh), f(input_bias), f(recurrent_bias), f(h_tm1)), h_tm1.dtype)


_gru_forward = _xla(_gru_gates_float32)


@_xla
def _gru_backward(mx, mh, input_bias, recurrent_bias, h_tm1, dh):
  with tf.GradientTape() as tape:  # The forward recomputed inside the program: nothing is kept between the two.
    tape.watch([mx, mh, h_tm1])
    h = _gru_gates_float32(mx, mh, input_bias, recurrent_bias, h_tm1)
  return tape.gradient(h, [mx, mh, h_tm1], output_gradients=dh)


@tf.custom_gradient
def _gru_gates(mx, mh, input_bias, recurrent_bias, h_tm1):
  """_gru_gates_float32 as XLA programs; the biases' gradients are TensorFlow's Sums (float32 accumulation) of the
  matmul outputs' gradients, as for a broadcast add."""
  def grad(dh):
    dmx, dmh, dh_tm1 = _gru_backward(mx, mh, input_bias, recurrent_bias, h_tm1, dh)
    return dmx, dmh, tf.reduce_sum(dmx, 0), tf.reduce_sum(dmh, 0), dh_tm1
  return _gru_forward(mx, mh, input_bias, recurrent_bias, h_tm1), grad


# The encoder's lanes split the train step's batch (hundreds of images); the policy's few images stay whole.
MIN_LANE_IMAGES = 16


class ConvEncoder(_Composite):

  def __init__(self, depth=32, act='relu', lanes=1, **kwargs):
    """`lanes`: encode the batch as that many slices, side by side (runtime.lanes: with one thread per op, one
    batch's convolutions would leave the other cores idle at the start and end of the train step)."""
    super().__init__(**kwargs)
    self._depth = depth
    self._lanes = lanes
    kw = dict(strides=2, activation=get_act(act), dtype=self.dtype_policy)
    self.h1 = Conv2D(1 * depth, 4, name='h1', **kw)
    self.h2 = Conv2D(2 * depth, 4, name='h2', **kw)
    self.h3 = Conv2D(4 * depth, 4, name='h3', **kw)
    # Its output is 2 x 2 pixels: the filter gradient is faster as a matmul (conv2d_matmul_filter_grad).
    self.h4 = Conv2D(8 * depth, 4, name='h4', matmul_filter_grad=True, **kw)

  def call(self, obs):
    """obs['image'] [..., 64, 64, 3] float -> embed [..., 32 * depth] in the compute dtype."""
    image = obs['image']
    x = tf.reshape(image, (-1,) + tuple(image.shape[-3:]))
    convs = lambda x: self.h4(self.h3(self.h2(self.h1(tf.cast(x, self.compute_dtype)))))
    count = x.shape[0]
    if self._lanes > 1 and count and count >= self._lanes * MIN_LANE_IMAGES:  # Images are encoded independently.
      sizes = [count // self._lanes + (lane < count % self._lanes) for lane in range(self._lanes)]
      x = tf.concat([convs(part) for part in tf.split(x, sizes, 0)], 0)
    else:
      x = convs(x)
    shape = tf.concat([tf.shape(image)[:-3], [32 * self._depth]], 0)
    return tf.reshape(x, shape)


class ImageNormal(tfd.Independent):
  """Independent(Normal(mean, 1)) over the image's last axes, as the reference's decoder returns, with the
  log-likelihood's gradient written out: dy * (image - mean), dy broadcast over the image axes. TFP's own gradient
  of the same sum materialises dy at the image's size (a Tile) and makes five more passes over it: about 35 ms of
  op time per step at the `cpu` preset's 800 images (docs/speed.md, session 14). Values and gradients are TFP's bit
  for bit (its formula with scale 1, where x / 1 and log(1) are exact; its gradient multiplies (x - mean) * dy by
  2 and by 0.5, both exact)."""

  def _log_prob(self, x):
    normal = self.distribution
    scale = tf.get_static_value(normal.scale)
    ndims = tf.get_static_value(self.reinterpreted_batch_ndims)
    x = tf.convert_to_tensor(x)
    # The written-out gradient is scale 1's, for an image of the mean's shape (no broadcasting to reduce), summed
    # as TFP sums without Kahan summation; anything else is TFP's own log_prob.
    if (scale is None or np.any(scale != 1) or ndims is None or self._experimental_use_kahan_sum
        or not x.shape.is_fully_defined() or x.shape != normal.loc.shape):
      return super()._log_prob(x)
    return _unit_normal_log_prob(normal.loc, x, [-1 - i for i in range(int(ndims))])


def _unit_normal_log_prob(loc, x, axes):
  """sum over `axes` of Normal(loc, 1).log_prob(x), TFP's formula; the gradient of loc (and x) without a Tile."""

  @tf.custom_gradient
  def log_prob(loc, x):
    log_normalization = tf.constant(0.5 * np.log(2. * np.pi), loc.dtype)
    value = tf.reduce_sum(-0.5 * tf.math.squared_difference(x, loc) - log_normalization, axes)

    def grad(dy):  # dy [batch...]; d/dloc = x - loc, d/dx = loc - x, each times dy.
      diff = (x - loc) * tf.reshape(dy, tf.concat([tf.shape(dy), tf.ones([len(axes)], tf.int32)], 0))
      return diff, -diff
    return value, grad
  return log_prob(loc, x)


class ConvDecoder(_Composite):

  def __init__(self, depth=32, act='relu', shape=(64, 64, 3), **kwargs):
    super().__init__(**kwargs)
    self._depth = depth
    self._shape = tuple(shape)
    kw = dict(strides=2, activation=get_act(act), dtype=self.dtype_policy)
    self.h1 = Dense(32 * depth, None, name='h1', dtype=self.dtype_policy)
    self.h2 = Conv2DTranspose(4 * depth, 5, name='h2', **kw)
    self.h3 = Conv2DTranspose(2 * depth, 5, name='h3', **kw)
    self.h4 = Conv2DTranspose(1 * depth, 6, name='h4', **kw)
    # To 3 channels: faster as a convolution to the 4 output phases (conv2d_transpose_subpixel).
    self.h5 = Conv2DTranspose(self._shape[-1], 6, strides=2, name='h5', subpixel=True, dtype=self.dtype_policy)

  def call(self, features):
    """features [..., F] -> Independent(Normal(mean, 1)) over [..., 64, 64, 3], float32."""
    x = self.h1(tf.reshape(features, [-1, features.shape[-1]]))  # [N, 32 * depth]
    x = self.h5(self.h4(self.h3(self._first_deconv(x))))
    mean = tf.reshape(tf.cast(x, tf.float32), tf.concat([tf.shape(features)[:-1], self._shape], 0))
    return ImageNormal(tfd.Normal(mean, 1), len(self._shape))

  def _first_deconv(self, x):
    """h2 on the [N, 1, 1, C] input as one matmul: [N, C] -> [N, 5, 5, 4 * depth].

    A strided transposed convolution of a 1x1 image writes kernel[i, j, :, :] @ x to output pixel (i, j): exactly
    a matmul with the kernel laid out as [C, 5 * 5 * out]. oneDNN runs that matmul (and its gradients) about ten
    times faster than the general transposed convolution on this shape."""
    layer = self.h2
    if not layer.built:
      layer.build((None, 1, 1, x.shape[-1]))
    kh, kw, out, inp = layer.kernel.shape
    kernel = tf.cast(layer.kernel, x.dtype)  # [kh, kw, out, in]
    kernel = tf.reshape(tf.transpose(kernel, [3, 0, 1, 2]), [inp, kh * kw * out])
    x = tf.reshape(tf.matmul(x, kernel), [-1, kh, kw, out])
    if _bias_act_fuses(x, layer.activation):
      return bias_act(x, layer.bias, layer.activation)
    if x.dtype == tf.float32:  # A broadcast add: its gradient a Sum (bias_add's BiasAddGrad sums in another order).
      return layer.activation(x + tf.cast(layer.bias, x.dtype))
    return layer.activation(bias_add(x, layer.bias))  # Below float32 the bias gradient is summed in float32.


class _MLP(_Composite):
  """`layers` x Dense(units, act) named h0, h1, ..., then Dense(out) named hout, as the reference names them."""

  def __init__(self, layers, units, out, act, **kwargs):
    super().__init__(**kwargs)
    kw = dict(dtype=self.dtype_policy)
    self._hidden = [Dense(units, get_act(act), name=f'h{i}', **kw) for i in range(layers)]
    self.hout = Dense(out, name='hout', **kw)

  @property
  def dense_layers(self):
    return self._hidden + [self.hout]

  def _forward(self, features):
    """[..., F] -> [..., out] float32. Works on [N, F] so each Dense is one fused matmul + bias + activation
    (on [B, T, F] Keras goes through tensordot, which oneDNN cannot fuse)."""
    return self._unflatten(tf.cast(self.hout(self._trunk(features)), tf.float32), features)

  def _trunk(self, features):
    """[..., F] -> the last hidden layer's output [N, units], N the product of the leading dimensions."""
    x = tf.reshape(features, [-1, features.shape[-1]])
    for layer in self._hidden:
      x = layer(x)
    return x

  @staticmethod
  def _unflatten(x, features):
    """[N, out] -> [..., out] with the leading dimensions of `features`."""
    return tf.reshape(x, tf.concat([tf.shape(features)[:-1], [x.shape[-1]]], 0))


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
    if dist not in ('tanh_normal', 'onehot', 'onehot_score'):
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
    return tools.OneHotDist(x, gradient='score' if self._dist == 'onehot_score' else 'straight')


class StateModel(_MLP):
  """The contrastive representation's state model q(feat | embed), the paper's code's `cpc` head
  (scripts/configs.py `cpc_head`, built in training/define_model.py on the encoder's embedding with the feature
  size as its data shape; networks/basic.py feed_forward with dist 'normal' and std 'learned'): `layers` x
  Dense(units, act), then a mean (hout) and a std (hstd) layer on the last hidden layer, std =
  softplus(x + softplus^-1(init_std)) + min_std. embed [..., E] -> Independent(Normal(mean, std), 1) over
  [..., size], parameters float32. Its log-probs are the scores of tools.contrastive_loss."""

  def __init__(self, size, layers=3, units=400, act='elu', min_std=1e-2, init_std=1.0, **kwargs):
    super().__init__(layers, units, size, act, **kwargs)
    self.hstd = Dense(size, name='hstd', dtype=self.dtype_policy)
    self._min_std = min_std
    self._init_std = init_std

  @property
  def dense_layers(self):
    return self._hidden + [self.hout, self.hstd]

  def call(self, embed):
    x = self._trunk(embed)
    mean = self._unflatten(tf.cast(self.hout(x), tf.float32), embed)
    std = self._unflatten(tf.cast(self.hstd(x), tf.float32), embed)
    std = tf.nn.softplus(std + np.log(np.exp(self._init_std) - 1)) + self._min_std
    return tfd.Independent(tfd.Normal(mean, std), 1)
