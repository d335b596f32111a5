"""Shapes, dtypes and behaviour of the networks in models.py, under precision 16 and 32 (fixture `precision`).

Contract checked everywhere: features and embeddings are in the compute dtype of the global policy;
distribution parameters, samples, log-probs and KLs are float32.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_probability import distributions as tfd

import models
import runtime
import tools
from helpers import optimized_graphs

B, T, DEPTH, UNITS = 3, 4, 4, 16
STOCH, DETER, EMBED, ACT = 5, 16, 8, 2
FEAT = STOCH + DETER


@pytest.fixture(autouse=True)
def seed():
  """Same weights, inputs and noise on every run."""
  keras.utils.set_random_seed(0)


def compute_dtype(precision):
  """The compute dtype the fixture installed: float32 for 32, a 16-bit float for 16."""
  dtype = tf.as_dtype(keras.mixed_precision.global_policy().compute_dtype)
  assert (dtype == tf.float32) == (precision == 32), (precision, dtype)
  return dtype


def tol(precision):
  """float32: rounding only. bfloat16 (the fixture's 16 on every CPU): an 8-bit mantissa rounds each value by up to
  2**-8 = 3.9e-3 relative, and a layer's output carries that of its inputs, weights and sums: 2e-2 allows about
  five roundings on values of order one, as a layer or two deep."""
  return dict(rtol=1e-5, atol=1e-5) if precision == 32 else dict(rtol=2e-2, atol=2e-2)


def random_feat(shape, dtype, seed=0):
  return tf.cast(np.random.RandomState(seed).normal(size=shape), dtype)


def rssm(shared_noise=True):
  return models.RSSM(STOCH, DETER, UNITS, shared_noise=shared_noise)


def random_state(batch, dtype, seed=0):
  rng = np.random.RandomState(seed)
  return dict(
      mean=tf.zeros([batch, STOCH]), std=tf.ones([batch, STOCH]),
      stoch=tf.constant(rng.normal(size=(batch, STOCH)), tf.float32),
      deter=tf.cast(np.tanh(rng.normal(size=(batch, DETER))), dtype))


def assert_state(state, batch_dims, dtype):
  assert set(state) == {'mean', 'std', 'stoch', 'deter'}
  for key in ('mean', 'std', 'stoch'):
    assert state[key].shape == tuple(batch_dims) + (STOCH,), (key, state[key].shape)
    assert state[key].dtype == tf.float32, (key, state[key].dtype)
  assert state['deter'].shape == tuple(batch_dims) + (DETER,)
  assert state['deter'].dtype == dtype
  assert np.all(state['std'].numpy() > 0.1)  # softplus(.) + 0.1
  for value in state.values():
    assert np.all(np.isfinite(tf.cast(value, tf.float32).numpy()))


def noise(state):
  """The standard-normal noise that produced the sample."""
  return ((state['stoch'] - state['mean']) / state['std']).numpy()


# Activations ---------------------------------------------------------------------------------------------------------

def test_get_act_names_and_unknown():
  assert models.get_act('swish') is tf.nn.swish
  assert models.get_act(tf.tanh) is tf.tanh
  with pytest.raises(ValueError, match='tanhh'):
    models.get_act('tanhh')


def _graph_ops(fn, *args):
  """The op types of fn's graph on these arguments (not those inside the functions it calls), and how many of the
  functions it calls XLA compiles."""
  graph = tf.function(fn, autograph=False).get_concrete_function(*args).graph
  xla = sum(f.definition.attr['_XlaMustCompile'].b for f in graph._functions.values())
  return {op.type for op in graph.get_operations()}, xla


def _grads(fn, x, dy, *more):
  with tf.GradientTape() as tape:
    tape.watch([x, *more])
    y = fn(x, *more)
  return [y, *tape.gradient(y, [x, *more], output_gradients=dy)]


@pytest.mark.parametrize('name', ['relu', 'elu'])
def test_relu_and_elu_are_tensorflows_and_in_bfloat16_take_their_gradient_from_xla(name):
  """In float32 the activation is TensorFlow's op with its own gradient. In bfloat16 (on tensors of at least
  XLA_MIN_ELEMENTS) the forward pass is still TensorFlow's op (oneDNN fuses it with the layer's matmul or convolution) and the gradient is an XLA program of
  the same formula: equal to TensorFlow's ReluGrad, and to its EluGrad within one rounding of bfloat16."""
  act, reference = models.get_act(name), getattr(tf.nn, name)
  rng = np.random.default_rng(3)
  values = np.concatenate([rng.normal(size=models.XLA_MIN_ELEMENTS) * 3, [0.0, -0.0, 1e-3, -1e-3, -20.0, 20.0]])
  for dtype in (tf.float32, tf.bfloat16):
    x = tf.constant(values, dtype)
    dy = tf.constant(rng.normal(size=values.shape), dtype)
    got, expected = _grads(act, x, dy), _grads(reference, x, dy)
    np.testing.assert_array_equal(tf.cast(got[0], tf.float32), tf.cast(expected[0], tf.float32))
    grad, truth = (tf.cast(g[1], tf.float32).numpy() for g in (got, expected))
    if dtype == tf.float32 or name == 'relu':
      np.testing.assert_array_equal(grad, truth)
    else:  # (y + 1) * dy rounded once, or twice as TensorFlow's bfloat16 kernel rounds it.
      np.testing.assert_allclose(grad, truth, rtol=2 ** -7, atol=0)
      np.testing.assert_array_equal(grad[values > 0], truth[values > 0])
    ops, xla = _graph_ops(lambda x, dy: _grads(act, x, dy)[1], x, dy)
    assert (name.capitalize() + 'Grad' in ops) == (dtype == tf.float32) and xla == (dtype == tf.bfloat16), ops  # 1.
  # Below XLA_MIN_ELEMENTS (where one compile per shape costs more than it saves) TensorFlow's gradient.
  small = tf.zeros([models.XLA_MIN_ELEMENTS // 2], tf.bfloat16)
  ops, xla = _graph_ops(lambda x, dy: _grads(act, x, dy)[1], small, small)
  assert name.capitalize() + 'Grad' in ops and not xla


@pytest.mark.parametrize('name', ['relu', 'elu'])
def test_bias_act_in_bfloat16_is_one_xla_program_with_bias_add_and_the_activations_values(name):
  """bias_act (the decoder's transposed convolutions): in bfloat16 one XLA program for act(x + bias), rounded once
  (relu: exactly bias_add and tf.nn.relu; elu: one rounding less than bias_add and tf.nn.elu); its
  input gradient the activation's and its bias gradient the float32 sum of those (to bfloat16's rounding of the
  result); in float32 TensorFlow's own ops."""
  act = models.get_act(name)
  rng = np.random.default_rng(4)
  x = tf.constant(rng.normal(size=(660, 5, 5, 16)) * 2, tf.bfloat16)  # Above models.XLA_MIN_ELEMENTS.
  bias = tf.constant(rng.normal(size=16), tf.bfloat16)
  dy = tf.constant(rng.normal(size=x.shape) + 1.0, tf.bfloat16)  # Mean 1: bias sums grow with the batch.
  y, dx, dbias = _grads(lambda x, b: models.bias_act(x, b, act), x, dy, bias)
  y = tf.cast(y, tf.float32).numpy()
  if name == 'relu':
    np.testing.assert_array_equal(y, tf.cast(tf.nn.relu(tf.nn.bias_add(x, bias)), tf.float32).numpy())
  else:  # The elu of x + bias rounded once: XLA keeps x + bias in float32. (TensorFlow's bfloat16 Elu kernel rounds
    # exp(v) to bfloat16 before it subtracts 1, up to 3 roundings off near 0.)
    v64 = (tf.cast(x, tf.float64) + tf.cast(bias, tf.float64)).numpy()
    once = tf.cast(tf.cast(np.where(v64 > 0, v64, np.expm1(v64)), tf.bfloat16), tf.float32).numpy()
    np.testing.assert_allclose(y, once, rtol=2 ** -8, atol=0)
    assert np.mean(y == once) > 0.99
  # The input gradient is the activation's at these outputs, as TensorFlow's ReluGrad / EluGrad compute it.
  y64, dy64 = y.astype(np.float64), tf.cast(dy, tf.float64).numpy()
  expected = np.where(y64 > 0, dy64, 0.0) if name == 'relu' else np.where(y64 < 0, (y64 + 1) * dy64, dy64)
  np.testing.assert_allclose(tf.cast(dx, tf.float64).numpy(), expected, rtol=2 ** -7 if name == 'elu' else 0, atol=0)
  truth = tf.reduce_sum(tf.cast(dx, tf.float64), [0, 1, 2]).numpy()
  np.testing.assert_allclose(tf.cast(dbias, tf.float64).numpy(), truth, rtol=2 ** -8)
  ops, xla = _graph_ops(lambda x, b, dy: _grads(lambda x, b: models.bias_act(x, b, act), x, dy, b), x, bias, dy)
  assert xla == 2 and not ops & {'BiasAdd', 'BiasAddGrad', name.capitalize(), name.capitalize() + 'Grad'}, ops
  # Another function of the same name is not this module's activation: it runs as given.
  leaky = lambda v: tf.nn.leaky_relu(v, 0.2)
  leaky.__name__ = name
  np.testing.assert_array_equal(tf.cast(models.bias_act(x, bias, leaky), tf.float32),
                                tf.cast(leaky(tf.nn.bias_add(x, bias)), tf.float32))
  # float32: TensorFlow's ops and gradients.
  x32, b32, dy32 = (tf.cast(t, tf.float32) for t in (x, bias, dy))
  got = _grads(lambda x, b: models.bias_act(x, b, act), x32, dy32, b32)
  reference = _grads(lambda x, b: getattr(tf.nn, name)(tf.nn.bias_add(x, b)), x32, dy32, b32)
  for a, b in zip(got, reference):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
  ops, xla = _graph_ops(lambda x, b: models.bias_act(x, b, act), x32, b32)
  assert not xla and 'BiasAdd' in ops
  ops, xla = _graph_ops(lambda x, b: models.bias_act(x, b, act), x[:10], bias)  # Small: TensorFlow's ops.
  assert not xla and 'AddV2' in ops  # bias_add's broadcast add in bfloat16.


def test_gru_cell_in_bfloat16_computes_its_gates_in_one_xla_program_as_kerass_formula():
  """In bfloat16 the GRU's gates are one XLA program (forward and backward) from two plain matmuls, at any batch
  size: its output and gradients are Keras's reset_after GRU formula's, computed in float64 from the same bfloat16
  inputs and weights, within bfloat16 rounding (the float32 arithmetic rounded once). float32: TensorFlow's ops."""
  rng = np.random.default_rng(5)
  batch, units = models.XLA_MIN_ELEMENTS // 100 + 7, 100
  cell = models.GRUCell(units, dtype='mixed_bfloat16')
  x = tf.constant(rng.normal(size=(batch, 60)), tf.bfloat16)
  h = tf.constant(rng.normal(size=(batch, units)) * 0.5, tf.bfloat16)
  cell(x, [h])
  cell.bias.assign(rng.normal(size=cell.bias.shape) * 0.3)
  dh = tf.constant(rng.normal(size=(batch, units)), tf.bfloat16)
  weights = [cell.kernel, cell.recurrent_kernel, cell.bias]

  def run(cell_fn, x, h):
    with tf.GradientTape() as tape:
      tape.watch([x, h])
      y = cell_fn(x, h)
    return [y, *tape.gradient(y, [x, h, *weights], output_gradients=tf.cast(dh[:y.shape[0]], y.dtype))]

  def formula(x, h):  # Keras's GRU (reset_after) in float64 from the bfloat16-rounded weights the cell computes with.
    kernel, recurrent, bias = (tf.cast(tf.cast(w, tf.bfloat16), tf.float64) for w in weights)
    x_z, x_r, x_h = tf.split(x @ kernel + bias[0], 3, -1)
    h_z, h_r, h_h = tf.split(h @ recurrent + bias[1], 3, -1)
    z, r = tf.sigmoid(x_z + h_z), tf.sigmoid(x_r + h_r)
    return z * h + (1 - z) * tf.tanh(x_h + r * h_h)

  got = run(lambda x, h: cell(x, [h])[0], x, h)
  truth = run(formula, tf.cast(x, tf.float64), tf.cast(h, tf.float64))
  for name, a, b in zip(('h', 'dx', 'dh', 'dkernel', 'drecurrent', 'dbias'), got, truth):
    a, b = tf.cast(a, tf.float64).numpy(), b.numpy()
    scale = np.abs(b).max()
    assert np.abs(a - b).max() < 2 ** -6 * scale, (name, np.abs(a - b).max(), scale)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9999, name
  ops, xla = _graph_ops(lambda x, h: run(lambda x, h: cell(x, [h])[0], x, h), x, h)
  assert xla == 2 and not ops & {'Sigmoid', 'Tanh', 'SigmoidGrad', 'TanhGrad'}, ops  # Forward and backward.
  cell32 = models.GRUCell(units, dtype='float32')
  for layer, dtype in ((cell, tf.bfloat16), (cell32, tf.float32)):  # A small batch, as in the RSSM's observe loop.
    ops, xla = _graph_ops(lambda x, h: layer(x, [h])[0], tf.cast(x[:16], dtype), tf.cast(h[:16], dtype))
    fused = dtype == tf.bfloat16
    assert xla == fused and ({'Sigmoid', 'Tanh'} <= ops) != fused, ops
  small = run(lambda x, h: cell(x, [h])[0], x[:16], h[:16])
  for a, b in zip(small, run(formula, tf.cast(x[:16], tf.float64), tf.cast(h[:16], tf.float64))):
    assert np.abs(tf.cast(a, tf.float64).numpy() - b.numpy()).max() < 2 ** -6 * np.abs(b.numpy()).max()


# ConvEncoder ---------------------------------------------------------------------------------------------------------

def test_conv_encoder_shapes_and_dtypes(precision):
  dtype = compute_dtype(precision)
  encoder = models.ConvEncoder(DEPTH)
  image = tf.random.uniform([B, T, 64, 64, 3]) - 0.5
  embed = encoder({'image': image})
  assert embed.shape == (B, T, 32 * DEPTH)
  assert embed.dtype == dtype
  kernels = [encoder.h1.kernel, encoder.h2.kernel, encoder.h3.kernel, encoder.h4.kernel]
  assert [tuple(k.shape) for k in kernels] == [
      (4, 4, 3, DEPTH), (4, 4, DEPTH, 2 * DEPTH), (4, 4, 2 * DEPTH, 4 * DEPTH), (4, 4, 4 * DEPTH, 8 * DEPTH)]
  assert all(k.dtype == 'float32' for k in kernels)  # Variables stay float32 under mixed precision.
  # Flattening keeps images apart: one image alone gives the same embedding as inside the batch.
  single = encoder({'image': image[1, 2][None]})
  assert single.shape == (1, 32 * DEPTH)
  np.testing.assert_allclose(
      tf.cast(single[0], tf.float32).numpy(), tf.cast(embed[1, 2], tf.float32).numpy(), **tol(precision))


def test_conv_encoder_spatial_sizes_and_relu():
  encoder = models.ConvEncoder(DEPTH)
  x = tf.random.uniform([2, 64, 64, 3]) - 0.5
  sizes = []
  for layer in (encoder.h1, encoder.h2, encoder.h3, encoder.h4):
    x = layer(x)
    sizes.append(tuple(x.shape[1:3]))
    assert np.all(x.numpy() >= 0)  # cnn_act relu on every layer
  assert sizes == [(31, 31), (14, 14), (6, 6), (2, 2)]  # VALID, kernel 4, stride 2


def test_conv_encoder_in_lanes_encodes_batch_slices_side_by_side_to_the_same_values_and_gradients():
  one, three = models.ConvEncoder(DEPTH), models.ConvEncoder(DEPTH, lanes=3)
  image = tf.random.uniform([5, 10, 64, 64, 3]) - 0.5  # 50 images: slices of 17, 17 and 16.
  one({'image': image}), three({'image': image})
  for a, b in zip(one.weights, three.weights):
    b.assign(a)
  grads = []
  for encoder in (one, three):
    with tf.GradientTape() as tape:
      tape.watch(image)
      embed = encoder({'image': image})
      loss = tf.reduce_sum(embed * tf.cos(tf.range(embed.shape[-1], dtype=tf.float32)))
    grads.append([embed] + tape.gradient(loss, [image] + encoder.trainable_weights))
  for a, b in zip(*grads):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5 * np.abs(a.numpy()).max())
  # Per layer one convolution per slice, in the traced graph.
  conv_batches = lambda encoder, spec: [
      op.inputs[0].shape[0] for op in tf.function(lambda x: encoder({'image': x})).get_concrete_function(
          spec).graph.get_operations() if op.type == 'Conv2D']
  assert conv_batches(three, tf.TensorSpec(image.shape)) == [17] * 4 + [17] * 4 + [16] * 4
  # Batches too small for the lanes (the policy's few images) and batches of unknown size are encoded whole.
  small = image[:2, :3]
  assert conv_batches(three, tf.TensorSpec(small.shape)) == [6] * 4
  assert conv_batches(three, tf.TensorSpec([None, 64, 64, 3])) == [None] * 4
  np.testing.assert_allclose(three({'image': small}).numpy(), one({'image': small}).numpy(), rtol=1e-6)


# ConvDecoder ---------------------------------------------------------------------------------------------------------

def test_conv_decoder_shapes_and_dtypes(precision):
  dtype = compute_dtype(precision)
  decoder = models.ConvDecoder(DEPTH)
  feat = random_feat([B, T, FEAT], dtype)
  dist = decoder(feat)
  assert dist.batch_shape == (B, T) and dist.event_shape == (64, 64, 3)
  mean = dist.mean()
  assert mean.shape == (B, T, 64, 64, 3) and mean.dtype == tf.float32
  np.testing.assert_array_equal(dist.mode().numpy(), mean.numpy())
  image = tf.random.uniform([B, T, 64, 64, 3]) - 0.5
  logprob = dist.log_prob(image)
  assert logprob.shape == (B, T) and logprob.dtype == tf.float32
  # Independent(Normal(mean, 1)) over the three image dims, by hand.
  expected = np.sum(
      -0.5 * (image.numpy().astype(np.float64) - mean.numpy()) ** 2 - 0.5 * np.log(2 * np.pi), axis=(2, 3, 4))
  np.testing.assert_allclose(logprob.numpy(), expected, rtol=1e-5)


def test_the_image_likelihood_is_tfps_bit_for_bit_and_its_gradient_has_no_tile():
  # models.ImageNormal: the decoder's Independent(Normal(mean, 1)) with the log-likelihood's gradient written out.
  rng = np.random.default_rng(0)
  mean = tf.constant(rng.normal(0, 0.3, [B, T, 64, 64, 3]), tf.float32)
  image = tf.constant(rng.uniform(-0.5, 0.5, [B, T, 64, 64, 3]), tf.float32)
  dy = tf.constant(rng.normal(size=[B, T]), tf.float32)
  tfp_dist = lambda m: tfd.Independent(tfd.Normal(m, 1), 3)
  ours = lambda m: models.ImageNormal(tfd.Normal(m, 1), 3)

  def likelihood(dist):
    return lambda m, x: dist(m).log_prob(x)
  expected = _grads(likelihood(tfp_dist), mean, dy, image)
  got = _grads(likelihood(ours), mean, dy, image)
  for name, a, b in zip(('log_prob', 'd mean', 'd image'), expected, got):
    np.testing.assert_array_equal(b.numpy(), a.numpy(), err_msg=name)
  for method in ('mean', 'mode', 'stddev'):
    np.testing.assert_array_equal(getattr(ours(mean), method)().numpy(), getattr(tfp_dist(mean), method)().numpy())
  ops, _ = _graph_ops(lambda m, x: _grads(likelihood(ours), m, dy, x), mean, image)
  tfp_ops, _ = _graph_ops(lambda m, x: _grads(likelihood(tfp_dist), m, dy, x), mean, image)
  assert 'Tile' in tfp_ops and not ops & {'Tile', 'BroadcastTo'}, ops
  # Another scale keeps TFP's own log_prob (the written-out gradient is scale 1's).
  np.testing.assert_array_equal(models.ImageNormal(tfd.Normal(mean, 2.0), 3).log_prob(image).numpy(),
                                tfd.Independent(tfd.Normal(mean, 2.0), 3).log_prob(image).numpy())
  # An image that broadcasts against the mean, and Kahan summation, are TFP's own log_prob (gradient shapes).
  wide = tf.concat([image[None], image[None]], 0)
  _, grad = _grads(lambda m: ours(m).log_prob(wide), mean, tf.ones([2, B, T]))
  assert grad.shape == mean.shape
  kahan = models.ImageNormal(tfd.Normal(mean, 1), 3, experimental_use_kahan_sum=True).log_prob(image)
  np.testing.assert_array_equal(
      kahan.numpy(), tfd.Independent(tfd.Normal(mean, 1), 3, experimental_use_kahan_sum=True).log_prob(image).numpy())
  # The decoder returns it, in every precision, and its log_prob takes the written-out gradient in a traced graph
  # (the decoder reshapes its mean with a computed shape).
  decoder = models.ConvDecoder(DEPTH)
  assert isinstance(decoder(random_feat([B, FEAT], tf.float32)), models.ImageNormal)
  feat = random_feat([B, T, FEAT], tf.float32)
  graph = tf.function(lambda f, x: _grads(lambda f: decoder(f).log_prob(x), f, dy)).get_concrete_function(
      feat, image).graph
  tiled = [op.outputs[0].shape for op in graph.get_operations() if op.type in ('Tile', 'BroadcastTo')]
  assert tiled and all(shape.num_elements() < image.shape.num_elements() for shape in tiled), tiled  # h5's bias.


def test_conv_decoder_kernels_and_spatial_sizes(precision):
  dtype = compute_dtype(precision)
  d = DEPTH
  decoder = models.ConvDecoder(d)
  decoder(random_feat([B, FEAT], dtype))
  assert tuple(decoder.h1.kernel.shape) == (FEAT, 32 * d)
  assert tuple(decoder.h2.kernel.shape) == (5, 5, 4 * d, 32 * d)
  assert tuple(decoder.h3.kernel.shape) == (5, 5, 2 * d, 4 * d)
  assert tuple(decoder.h4.kernel.shape) == (6, 6, 1 * d, 2 * d)
  assert tuple(decoder.h5.kernel.shape) == (6, 6, 3, 1 * d)
  x = decoder.h1(random_feat([B, FEAT], dtype, seed=1))
  assert np.any(x.numpy() < 0)  # h1 has no activation
  x = tf.reshape(x, [B, 1, 1, 32 * d])
  sizes = [1]
  for layer in (decoder.h2, decoder.h3, decoder.h4):
    x = layer(x)
    sizes.append(x.shape[1])
    assert x.shape[1] == x.shape[2] and x.dtype == dtype
    assert np.all(tf.cast(x, tf.float32).numpy() >= 0)  # cnn_act relu
  x = decoder.h5(x)
  sizes.append(x.shape[1])
  assert x.shape == (B, 64, 64, 3)
  assert np.any(tf.cast(x, tf.float32).numpy() < 0)  # the output layer has no activation
  assert sizes == [1, 5, 13, 30, 64]


# RSSM ----------------------------------------------------------------------------------------------------------------

def test_rssm_initial(precision):
  dtype = compute_dtype(precision)
  state = rssm().initial(B)
  for key in ('mean', 'std', 'stoch'):
    assert state[key].shape == (B, STOCH) and state[key].dtype == tf.float32
  assert state['deter'].shape == (B, DETER) and state['deter'].dtype == dtype
  for value in state.values():
    assert not np.any(tf.cast(value, tf.float32).numpy())


def test_rssm_img_step_and_obs_step(precision):
  dtype = compute_dtype(precision)
  model = rssm()
  prev = random_state(B, dtype)
  action = tf.random.uniform([B, ACT], -1, 1)
  prior = model.img_step(prev, action)
  assert_state(prior, (B,), dtype)
  # The prior's mean/std/deter are deterministic functions of (prev state, action).
  again = model.img_step(prev, action)
  for key in ('mean', 'std', 'deter'):
    np.testing.assert_array_equal(tf.cast(prior[key], tf.float32).numpy(), tf.cast(again[key], tf.float32).numpy())
  embed = random_feat([B, EMBED], dtype, seed=2)
  post, prior2 = model.obs_step(prev, action, embed)
  assert_state(post, (B,), dtype)
  assert_state(prior2, (B,), dtype)
  np.testing.assert_array_equal(prior2['mean'].numpy(), prior['mean'].numpy())
  np.testing.assert_array_equal(
      tf.cast(post['deter'], tf.float32).numpy(), tf.cast(prior2['deter'], tf.float32).numpy())
  assert not np.allclose(post['mean'].numpy(), prior2['mean'].numpy())  # the embedding moves the posterior


def test_rssm_steps_by_hand(precision):
  """img_step and obs_step wired as the reference wires them, recomputed in numpy (float64) from the layers' weights."""
  dtype = compute_dtype(precision)
  model = rssm()
  prev = random_state(B, dtype)
  action = tf.random.uniform([B, ACT], -1, 1)
  embed = random_feat([B, EMBED], dtype, seed=2)
  post, prior = model.obs_step(prev, action, embed)
  numpy = lambda x: tf.cast(x, tf.float32).numpy().astype(np.float64)
  dense = lambda layer, x: x @ numpy(layer.kernel) + numpy(layer.bias)
  close = lambda actual, expected: np.testing.assert_allclose(numpy(actual), expected, **tol(precision))
  elu = lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  softplus = lambda x: np.log1p(np.exp(x))
  # Keras GRUCell, reset_after=True, gates ordered z, r, h; bias rows: input, recurrent.
  cell = model._cell
  kernel, recurrent, bias = numpy(cell.kernel), numpy(cell.recurrent_kernel), numpy(cell.bias)
  assert kernel.shape == (UNITS, 3 * DETER) and bias.shape == (2, 3 * DETER)
  x = elu(dense(model.img1, np.concatenate([numpy(prev['stoch']), numpy(action)], -1)))
  h = numpy(prev['deter'])
  xz, xr, xh = np.split(x @ kernel + bias[0], 3, -1)
  hz, hr, hh = np.split(h @ recurrent + bias[1], 3, -1)
  z, r = sigmoid(xz + hz), sigmoid(xr + hr)
  deter = z * h + (1 - z) * np.tanh(xh + r * hh)
  close(prior['deter'], deter)
  mean, std = np.split(dense(model.img3, elu(dense(model.img2, deter))), 2, -1)
  close(prior['mean'], mean)
  close(prior['std'], softplus(std) + 0.1)
  mean, std = np.split(dense(model.obs2, elu(dense(model.obs1, np.concatenate([deter, numpy(embed)], -1)))), 2, -1)
  close(post['mean'], mean)
  close(post['std'], softplus(std) + 0.1)


def test_rssm_batch_rows_do_not_mix(precision):
  dtype = compute_dtype(precision)
  model = rssm()
  prev = random_state(B, dtype)
  action = tf.random.uniform([B, ACT], -1, 1)
  embed = random_feat([B, EMBED], dtype, seed=2)
  post, prior = model.obs_step(prev, action, embed)
  row = lambda x: x[1:2]
  post1, prior1 = model.obs_step({k: row(v) for k, v in prev.items()}, row(action), row(embed))
  for key in ('mean', 'std', 'deter'):
    for full, single in ((post, post1), (prior, prior1)):
      np.testing.assert_allclose(
          tf.cast(single[key], tf.float32).numpy(), tf.cast(row(full[key]), tf.float32).numpy(), **tol(precision))


def test_rssm_observe_matches_stepwise(precision):
  dtype = compute_dtype(precision)
  model = rssm()
  embed = random_feat([B, T, EMBED], dtype, seed=3)
  action = tf.random.uniform([B, T, ACT], -1, 1)
  post, prior = model.observe(embed, action)
  assert_state(post, (B, T), dtype)
  assert_state(prior, (B, T), dtype)
  np.testing.assert_array_equal(
      tf.cast(post['deter'], tf.float32).numpy(), tf.cast(prior['deter'], tf.float32).numpy())
  # Batch-major in and out: step t of the scan is obs_step(post at t-1, action[:, t], embed[:, t]).
  prev = model.initial(B)
  for t in range(T):
    step_post, step_prior = model.obs_step(prev, action[:, t], embed[:, t])
    for key in ('mean', 'std'):
      np.testing.assert_allclose(step_post[key].numpy(), post[key][:, t].numpy(), **tol(precision))
      np.testing.assert_allclose(step_prior[key].numpy(), prior[key][:, t].numpy(), **tol(precision))
    prev = {k: v[:, t] for k, v in post.items()}
  # An explicit start state is used.
  start = random_state(B, dtype, seed=4)
  post2, _ = model.observe(embed, action, start)
  step_post, _ = model.obs_step(start, action[:, 0], embed[:, 0])
  np.testing.assert_allclose(step_post['mean'].numpy(), post2['mean'][:, 0].numpy(), **tol(precision))


def test_rssm_imagine_matches_stepwise(precision):
  dtype = compute_dtype(precision)
  model = rssm()
  action = tf.random.uniform([B, T, ACT], -1, 1)
  prior = model.imagine(action)
  assert_state(prior, (B, T), dtype)
  start = random_state(B, dtype, seed=5)
  prior = model.imagine(action, start)
  assert_state(prior, (B, T), dtype)
  prev = start  # The start itself is not part of the output.
  for t in range(T):
    step = model.img_step(prev, action[:, t])
    for key in ('mean', 'std', 'deter'):
      np.testing.assert_allclose(
          tf.cast(step[key], tf.float32).numpy(), tf.cast(prior[key][:, t], tf.float32).numpy(), **tol(precision))
    prev = {k: v[:, t] for k, v in prior.items()}


def test_rssm_get_feat_and_get_dist(precision):
  dtype = compute_dtype(precision)
  model = rssm()
  post, prior = model.observe(random_feat([B, T, EMBED], dtype), tf.random.uniform([B, T, ACT], -1, 1))
  feat = model.get_feat(post)
  assert feat.shape == (B, T, FEAT) and feat.dtype == dtype
  np.testing.assert_array_equal(
      tf.cast(feat[..., :STOCH], tf.float32).numpy(), tf.cast(tf.cast(post['stoch'], dtype), tf.float32).numpy())
  np.testing.assert_array_equal(feat[..., STOCH:].numpy(), post['deter'].numpy())
  post_dist, prior_dist = model.get_dist(post), model.get_dist(prior)
  assert post_dist.batch_shape == (B, T) and post_dist.event_shape == (STOCH,)
  logprob = post_dist.log_prob(post['stoch'])
  assert logprob.shape == (B, T) and logprob.dtype == tf.float32
  kl = tfd.kl_divergence(post_dist, prior_dist)
  assert kl.shape == (B, T) and kl.dtype == tf.float32
  # KL of diagonal Gaussians, by hand.
  pm, ps, qm, qs = (x.numpy().astype(np.float64) for x in (post['mean'], post['std'], prior['mean'], prior['std']))
  expected = np.sum(np.log(qs / ps) + (ps ** 2 + (pm - qm) ** 2) / (2 * qs ** 2) - 0.5, -1)
  np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-4, atol=1e-5)
  entropy = prior_dist.entropy()
  assert entropy.shape == (B, T) and entropy.dtype == tf.float32


def test_rssm_shared_noise_is_one_vector_per_step(precision):
  dtype = compute_dtype(precision)
  model = rssm(shared_noise=True)
  prior = model.img_step(random_state(8, dtype), tf.random.uniform([8, ACT], -1, 1))
  eps = noise(prior)
  assert not np.allclose(prior['mean'].numpy()[0], prior['mean'].numpy()[1])  # rows really differ
  np.testing.assert_allclose(eps, np.broadcast_to(eps[0], eps.shape), atol=1e-4)
  post, _ = model.observe(random_feat([B, T, EMBED], dtype), tf.random.uniform([B, T, ACT], -1, 1))
  eps = noise(post)  # [B, T, STOCH]
  np.testing.assert_allclose(eps, np.broadcast_to(eps[:1], eps.shape), atol=1e-4)
  assert np.abs(eps[0, 0] - eps[0, 1]).max() > 1e-2  # fresh noise at every step


def test_rssm_independent_noise_per_row(precision):
  dtype = compute_dtype(precision)
  tf.random.set_seed(0)
  model = rssm(shared_noise=False)
  prior = model.img_step(random_state(256, dtype), tf.random.uniform([256, ACT], -1, 1))
  eps = noise(prior)
  assert np.abs(eps[0] - eps[1]).max() > 1e-2
  assert len(np.unique(eps.round(3), axis=0)) == 256
  # Standard normal: 1280 draws, loose bounds.
  assert abs(eps.mean()) < 0.15 and 0.85 < eps.std() < 1.15, (eps.mean(), eps.std())


# DenseDecoder --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(), (2,)])
def test_dense_decoder_normal(precision, shape):
  dtype = compute_dtype(precision)
  decoder = models.DenseDecoder(shape, 3, UNITS)
  dist = decoder(random_feat([B, T, FEAT], dtype))
  assert len(decoder.dense_layers) == 4
  assert tuple(decoder.dense_layers[0].kernel.shape) == (FEAT, UNITS)
  assert tuple(decoder.hout.kernel.shape) == (UNITS, int(np.prod(shape)))
  assert dist.batch_shape == (B, T) and dist.event_shape == shape
  mode = dist.mode()
  assert mode.shape == (B, T) + shape and mode.dtype == tf.float32
  np.testing.assert_array_equal(dist.mean().numpy(), mode.numpy())
  target = np.random.RandomState(1).normal(size=(B, T) + shape).astype(np.float32)
  logprob = dist.log_prob(target)
  assert logprob.shape == (B, T) and logprob.dtype == tf.float32
  expected = -0.5 * (target - mode.numpy()) ** 2 - 0.5 * np.log(2 * np.pi)
  expected = expected.reshape((B, T, -1)).sum(-1)
  np.testing.assert_allclose(logprob.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_dense_decoder_binary(precision):
  dtype = compute_dtype(precision)
  decoder = models.DenseDecoder((), 3, UNITS, 'binary')
  feat = random_feat([B, T, FEAT], dtype)
  dist = decoder(feat)
  assert dist.batch_shape == (B, T) and dist.event_shape == ()
  x = feat
  for layer in decoder.dense_layers:
    x = layer(x)
  logits = tf.cast(x[..., 0], tf.float32).numpy().astype(np.float64)
  mean = dist.mean()
  assert mean.shape == (B, T) and mean.dtype == tf.float32
  np.testing.assert_allclose(mean.numpy(), 1 / (1 + np.exp(-logits)), rtol=1e-5)
  # Soft targets like discount * pcont, as in training: cross-entropy with logits.
  target = np.full((B, T), 0.99, np.float32)
  logprob = dist.log_prob(target)
  assert logprob.shape == (B, T) and logprob.dtype == tf.float32
  expected = -(target * np.log1p(np.exp(-logits)) + (1 - target) * np.log1p(np.exp(logits)))
  np.testing.assert_allclose(logprob.numpy(), expected, rtol=1e-5, atol=1e-6)
  sample = dist.sample()
  assert sample.shape == (B, T) and sample.dtype == tf.float32
  assert set(np.unique(sample.numpy())) <= {0.0, 1.0}


def test_unknown_dists_raise():
  with pytest.raises(NotImplementedError):
    models.DenseDecoder((), 2, UNITS, 'categorical')
  with pytest.raises(NotImplementedError):
    models.ActionDecoder(ACT, 2, UNITS, 'normal')


# ActionDecoder -------------------------------------------------------------------------------------------------------

def test_action_decoder_tanh_normal(precision):
  dtype = compute_dtype(precision)
  actor = models.ActionDecoder(ACT, 4, UNITS, 'tanh_normal')
  feat = random_feat([B, T, FEAT], dtype)
  dist = actor(feat)
  assert isinstance(dist, tools.SampleDist)
  assert len(actor.dense_layers) == 5 and tuple(actor.hout.kernel.shape) == (UNITS, 2 * ACT)
  assert dist.batch_shape == (B, T) and dist.event_shape == (ACT,)
  # The Normal under the tanh: mean = 5 tanh(raw / 5), std = softplus(raw + log(e^5 - 1)) + 1e-4.
  x = feat
  for layer in actor.dense_layers:
    x = layer(x)
  raw = tf.cast(x, tf.float32).numpy().astype(np.float64)
  normal = dist.distribution.distribution
  assert normal.loc.dtype == tf.float32 and normal.scale.dtype == tf.float32
  np.testing.assert_allclose(normal.loc.numpy(), 5 * np.tanh(raw[..., :ACT] / 5), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      normal.scale.numpy(), np.log1p(np.exp(raw[..., ACT:] + np.log(np.exp(5.0) - 1))) + 1e-4, rtol=1e-5)
  sample = dist.sample()
  assert sample.shape == (B, T, ACT) and sample.dtype == tf.float32
  assert np.all(np.abs(sample.numpy()) <= 1)
  # log-prob of tanh(Normal), by hand: log N(atanh(y)) - log(1 - y^2), summed over the action dims.
  y = np.random.RandomState(2).uniform(-0.95, 0.95, size=(B, T, ACT))
  logprob = dist.log_prob(y.astype(np.float32))
  assert logprob.shape == (B, T) and logprob.dtype == tf.float32
  u, loc, scale = np.arctanh(y), normal.loc.numpy(), normal.scale.numpy()
  expected = -0.5 * ((u - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi) - np.log(1 - y ** 2)
  np.testing.assert_allclose(logprob.numpy(), expected.sum(-1), rtol=1e-4, atol=1e-4)
  # Actions on the boundary have a finite log-prob thanks to the clipped inverse.
  assert np.all(np.isfinite(dist.log_prob(tf.ones([B, T, ACT])).numpy()))


def test_sample_dist_mean_mode_entropy_shapes(precision):
  dtype = compute_dtype(precision)
  actor = models.ActionDecoder(ACT, 2, UNITS, 'tanh_normal')
  for batch in [(B,), (B, T)]:
    dist = actor(random_feat(batch + (FEAT,), dtype))
    mean, entropy = dist.mean(), dist.entropy()
    assert mean.shape == batch + (ACT,) and mean.dtype == tf.float32
    assert np.all(np.abs(mean.numpy()) <= 1)
    assert entropy.shape == batch and entropy.dtype == tf.float32
    assert np.all(np.isfinite(entropy.numpy()))
  # The policy calls mode() on [B, F] features.
  mode = actor(random_feat([B, FEAT], dtype)).mode()
  assert mode.shape == (B, ACT) and mode.dtype == tf.float32
  assert np.all(np.abs(mode.numpy()) <= 1)


def test_sample_dist_mode_with_two_batch_dims_has_batch_shape():
  """SOURCE BUG (also in the reference): tf.gather(sample, argmax(logprob))[0] indexes sample's first axis with a
  [B, T] index tensor, so for features [B, T, F] mode() returns [T, B, T, A] instead of [B, T, A]."""
  actor = models.ActionDecoder(ACT, 2, UNITS, 'tanh_normal')
  mode = actor(random_feat([B, T, FEAT], tf.float32)).mode()
  assert mode.shape == (B, T, ACT)


def test_sample_dist_mode_is_most_likely_sample_per_row():
  """SOURCE BUG (also in the reference): mode() takes, for EVERY batch row, the sample index that is best for row 0
  (`tf.gather(sample, argmax)[0]`), so rows other than 0 get an arbitrary sample instead of their own highest-log-prob
  sample out of 100: the mode is the sample of highest log-prob, as in the reference."""
  tf.random.set_seed(1)
  rows = 8
  loc = tf.constant(np.linspace(-1.0, 1.0, rows)[:, None] * np.ones((1, ACT)), tf.float32)
  inner = tfd.Independent(tfd.TransformedDistribution(tfd.Normal(loc, 0.5), tools.TanhBijector()), 1)
  mode = tools.SampleDist(inner).mode()
  assert mode.shape == (rows, ACT)
  # The best of 100 draws beats the 90th percentile of fresh draws unless p = 0.9^100 ~ 3e-5 (per row).
  threshold = np.percentile(inner.log_prob(inner.sample(2000)).numpy(), 90, axis=0)
  assert np.all(inner.log_prob(mode).numpy() >= threshold), (inner.log_prob(mode).numpy(), threshold)


def test_action_decoder_onehot(precision):
  dtype = compute_dtype(precision)
  actions = 5
  actor = models.ActionDecoder(actions, 2, UNITS, 'onehot')
  feat = random_feat([B, T, FEAT], dtype)
  dist = actor(feat)
  assert isinstance(dist, tools.OneHotDist)
  assert tuple(actor.hout.kernel.shape) == (UNITS, actions)
  sample = dist.sample()
  assert sample.shape == (B, T, actions) and sample.dtype == tf.float32
  values = sample.numpy()
  assert set(np.unique(values)) <= {0.0, 1.0}
  np.testing.assert_array_equal(values.sum(-1), np.ones((B, T)))
  assert dist.sample(7).shape == (7, B, T, actions)
  probs = dist.mean()
  assert probs.shape == (B, T, actions) and probs.dtype == tf.float32
  np.testing.assert_allclose(probs.numpy().sum(-1), 1, rtol=1e-5)
  mode = dist.mode()
  np.testing.assert_array_equal(mode.numpy().argmax(-1), probs.numpy().argmax(-1))
  np.testing.assert_array_equal(mode.numpy().sum(-1), np.ones((B, T)))
  logprob = dist.log_prob(sample)
  assert logprob.shape == (B, T) and logprob.dtype == tf.float32
  expected = np.log(np.take_along_axis(probs.numpy(), values.argmax(-1)[..., None], -1))[..., 0]
  np.testing.assert_allclose(logprob.numpy(), expected, rtol=1e-4, atol=1e-5)
  entropy = dist.entropy()
  assert entropy.shape == (B, T) and entropy.dtype == tf.float32


def test_onehot_sample_has_straight_through_gradient():
  logits = tf.Variable(np.random.RandomState(0).normal(size=(B, 4)).astype(np.float32))
  weights = tf.constant(np.arange(4, dtype=np.float32))
  with tf.GradientTape() as tape:
    sample = tools.OneHotDist(logits).sample()
    loss = tf.reduce_sum(sample * weights)
  grad = tape.gradient(loss, logits)
  assert grad is not None
  assert np.abs(grad.numpy()).min(axis=-1).max() > 0 and np.all(np.abs(grad.numpy()).sum(-1) > 1e-3)
  # The gradient is that of sum(probs * w): d/dl_j = p_j (w_j - sum_k p_k w_k).
  p = tf.nn.softmax(logits).numpy()
  expected = p * (weights.numpy() - (p * weights.numpy()).sum(-1, keepdims=True))
  np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_composite_layers_build_on_their_first_call_without_a_symbolic_trace(monkeypatch):
  """Keras 3 builds a layer without a build of its own by tracing its whole call on symbolic inputs first (0.9 s
  of the agent's construction at the paper's size); the encoder, decoder and heads skip that and their sublayers
  build on the eager call. A plain layer of the same shape is traced, which shows the spy sees the trace."""
  traced = []
  real = keras.src.backend.compute_output_spec
  monkeypatch.setattr(keras.src.backend, 'compute_output_spec',
                      lambda fn, *a, **k: traced.append(fn) or real(fn, *a, **k))

  class Plain(keras.layers.Layer):
    def __init__(self):
      super().__init__()
      self.h = keras.layers.Dense(3)

    def call(self, x):
      return self.h(x)

  Plain()(tf.zeros((2, FEAT)))
  assert len(traced) == 1
  traced.clear()
  layers = [models.ConvEncoder(DEPTH), models.ConvDecoder(DEPTH), models.DenseDecoder((), 2, UNITS),
            models.ActionDecoder(ACT, 2, UNITS)]
  layers[0]({'image': tf.zeros((B, T, 64, 64, 3))})
  for layer in layers[1:]:
    layer(tf.zeros((B, T, FEAT)))
  assert traced == []
  # Every sublayer has its weights: 4 convolutions; dense + 4 transposed convolutions; 2 hidden + output layers.
  assert [len(layer.weights) for layer in layers] == [8, 10, 6, 6]


@pytest.mark.parametrize('graph', [False, True], ids=['eager', 'graph'])
@pytest.mark.parametrize('layer, shape', [
    (lambda: models.Dense(400, dtype='mixed_bfloat16'), (2500, 400)),
    (lambda: models.Conv2DTranspose(3, 6, strides=2, dtype='mixed_bfloat16'), (400, 30, 30, 32)),
    (lambda: models.Conv2DTranspose(3, 6, strides=2, subpixel=True, dtype='mixed_bfloat16'), (400, 30, 30, 32)),
    (lambda: models.Conv2D(64, 4, strides=2, matmul_filter_grad=True, dtype='mixed_bfloat16'), (400, 6, 6, 32)),
    (lambda: models.Conv2D(32, 4, strides=2, dtype='mixed_bfloat16'), (400, 64, 64, 3)),
])
def test_bfloat16_bias_gradients_are_sums_to_bfloat16_rounding(layer, shape, graph):
  """TensorFlow's CPU BiasAddGrad sums in bfloat16: over a batch of 2500 rows its bias gradient came out up to 61%
  off (and with the wrong sign for the decoder's 3 channels). The layers' bias gradient is the float32 sum of the
  output gradients, so it is right to bfloat16's rounding of the result (2^-8; for 3 channels, of its row sums,
  the same bound for these same-sign gradients), eagerly and in a graph. (In a graph, a BiasAdd in bfloat16 would
  leave its gradient to the graph: oneDNN's rewrite merges a convolution's BiasAddGrad into its filter gradient,
  but when only the bias gradient is asked for TensorFlow's own BiasAddGrad ran and came out 99% off;
  docs/speed.md, session 15.)"""
  layer = layer()
  x = tf.random.stateless_normal(shape, [0, 1])
  y = layer(x)  # Builds.
  dy = tf.cast(tf.random.stateless_normal(y.shape, [2, 3]) + 1.0, y.dtype)  # Mean 1: sums grow with the batch.

  def bias_grad(x, dy):
    with tf.GradientTape() as tape:
      y = layer(x)
    return tape.gradient(y, layer.bias, output_gradients=dy)
  grad = (tf.function(bias_grad) if graph else bias_grad)(x, dy).numpy()
  truth = tf.reduce_sum(tf.cast(dy, tf.float64), list(range(len(y.shape) - 1))).numpy()
  np.testing.assert_allclose(grad, truth, rtol=2 ** -8)


def test_channel_sums_of_three_channels_are_row_sums_within_bfloat16_rounding_of_each():
  """_channel_sum of bfloat16 gradients with 3 or fewer channels (the decoder's last layer) sums rows of [W * C]
  first, then each channel's W partial sums: each partial sum and the result round once to bfloat16 (unit roundoff
  2^-8), so the error is within 2^-8 of their magnitudes, also where the terms cancel. More channels take one Sum."""
  rng = np.random.default_rng(4)
  # The last: two partial sums that round down, then a tie that rounds down (2.0 for 2.0146; a review's example).
  tight = np.array([1, 2 ** -8 - 2 ** -11, 1, 2 ** -7 + 2 ** -8 - 2 ** -11], np.float64).reshape(2, 2, 1)
  for dy in [rng.normal(mean, 1.0, size=shape) for shape, mean in (
      ([400, 64, 64, 3], 1.0), ([50, 64, 64, 3], 0.0), ([7, 5, 6, 2], 0.5), ([9, 4, 3], 1.0), ([3, 2, 4, 5, 1], 0.0))
             ] + [tight.transpose(1, 0, 2)]:
    dy = tf.constant(dy, tf.bfloat16)
    shape = dy.shape.as_list()
    truth = tf.reduce_sum(tf.cast(dy, tf.float64), list(range(len(shape) - 1))).numpy()
    got = models._channel_sum(dy)
    assert got.dtype == tf.bfloat16 and got.shape == shape[-1:]
    partial = np.abs(tf.reduce_sum(tf.cast(dy, tf.float64), list(range(len(shape) - 2))).numpy()).sum(0)
    np.testing.assert_array_less(np.abs(got.numpy().astype(np.float64) - truth), 2 ** -8 * (partial + np.abs(truth)))
  sums = lambda shape: [op.type for op in tf.function(models._channel_sum).get_concrete_function(
      tf.TensorSpec(shape, tf.bfloat16)).graph.get_operations()].count('Sum')
  assert (sums([None, 64, 64, 3]), sums([None, 64, 64, 4]), sums([None, 30, 30, 32])) == (2, 1, 1)


@pytest.mark.parametrize('dtype', [tf.float32, tf.bfloat16])
def test_depth_to_space_as_a_transpose_is_tensorflows(dtype):
  x = tf.cast(tf.random.stateless_normal([3, 5, 7, 12], [5, 6]), dtype)
  np.testing.assert_array_equal(models._depth_to_space_2x2(x).numpy(), tf.nn.depth_to_space(x, 2).numpy())
  for spec in ([None, 5, 7, 12], [None, None, None, 12], [None, None, None, None]):  # TensorFlow's op past the first.
    unknown = tf.function(models._depth_to_space_2x2, input_signature=[tf.TensorSpec(spec, dtype)])
    np.testing.assert_array_equal(unknown(x).numpy(), tf.nn.depth_to_space(x, 2).numpy())


def _optimized_ops(fn, *args):
  """(op, fused_ops) of the graph grappler makes of tf.function(fn) on these arguments, as it runs: of the graphs
  run meanwhile, the one whose graph before optimization holds the marker it returns."""
  marker = 'optimized_ops_marker'
  probe = tf.function(lambda *args: (fn(*args), tf.identity(args[0], name=marker)))
  graphs = optimized_graphs(lambda: probe(*args))
  ours = [g for g in graphs if any(n.name.endswith(marker) for n in g.pre_optimization_graph.node)]
  assert len(ours) == 1, [len(g.pre_optimization_graph.node) for g in graphs]
  return [(node.op, tuple(s.decode() for s in node.attr['fused_ops'].list.s))
          for node in ours[0].post_optimization_graph.node]


def test_bfloat16_bias_adds_fuse_with_their_matmul_or_convolution_as_bias_add_does():
  # bias_add is a broadcast add in bfloat16 (its gradient TensorFlow's Sum, accumulated in float32); grappler fuses
  # it wherever it fuses tf.nn.bias_add (with oneDNN on: on CPUs with bfloat16 instructions, into one kernel).
  rng = np.random.default_rng(0)
  x, w, b = (tf.constant(rng.normal(size=shape), tf.bfloat16) for shape in ([4, 16], [16, 32], [32]))
  image, kernel, kb = (tf.constant(rng.normal(size=shape), tf.bfloat16) for shape in ([2, 9, 9, 3], [3, 3, 3, 8], [8]))

  def layers(add):
    return lambda x, image: (tf.nn.elu(add(tf.matmul(x, w), b)),
                             tf.nn.relu(add(tf.nn.conv2d(image, kernel, 1, 'VALID'), kb)))
  plumbing = {'_Arg', '_Retval', 'Const', 'Identity', 'NoOp'}  # And the marker's Identity.
  ours, theirs = ([op for op in _optimized_ops(layers(add), x, image) if op[0] not in plumbing]
                  for add in (models.bias_add, tf.nn.bias_add))
  # Where grappler fuses neither (oneDNN off: its remapper reads a bias add as BiasAdd only with oneDNN; or no
  # bfloat16 kernels to fuse into), the add stays an AddV2 where tf.nn.bias_add stays a BiasAdd: one pass each.
  ours = [('BiasAdd', fused) if op == 'AddV2' else (op, fused) for op, fused in ours]
  assert sorted(ours) == sorted(theirs), (ours, theirs)
  for a, b in zip(layers(models.bias_add)(x, image), layers(tf.nn.bias_add)(x, image)):
    np.testing.assert_array_equal(tf.cast(a, tf.float32).numpy(), tf.cast(b, tf.float32).numpy())
  with pytest.raises(ValueError, match='does not match'):  # A bias of another size, as BiasAdd refuses it.
    models.bias_add(x, tf.zeros([1], tf.bfloat16))
  if runtime.onednn_enabled() and runtime.cpu_flags() & {'avx512_bf16', 'amx_bf16'}:
    assert ('_FusedMatMul', ('BiasAdd', 'Elu')) in ours and ('_FusedConv2D', ('BiasAdd', 'Relu')) in ours, ours


def test_the_decoders_first_layer_sums_its_float16_bias_gradient_in_float32():
  """The decoder's h2 (a matmul and a broadcast bias add) under mixed_float16: TensorFlow's Sum would add the
  bias gradient's 400 x 5 x 5 terms in float16 (a sum of 10,000 ones comes out 2048); it is the float32 sum."""
  decoder = models.ConvDecoder(4, dtype='mixed_float16')
  decoder(tf.zeros((1, 1, FEAT)))  # Builds.
  x = tf.cast(tf.random.stateless_normal([400, 32 * 4], [0, 1]), tf.float16)
  with tf.GradientTape() as tape:
    y = decoder._first_deconv(x)
  dy = tf.cast(tf.random.stateless_normal(y.shape, [2, 3]) + 1.0, y.dtype)  # Mean 1: the sums grow with the batch.
  grad = tape.gradient(y, decoder.h2.bias, output_gradients=dy)
  truth = tf.reduce_sum(tf.cast(dy, tf.float64) * tf.cast(y > 0, tf.float64), [0, 1, 2])
  np.testing.assert_allclose(grad.numpy(), truth.numpy(), rtol=2 ** -10)


def _value_and_grads(fn, x, kernel, dy, *bias):
  with tf.GradientTape() as tape:
    tape.watch([x, kernel, *bias])
    y = fn(x, kernel, *bias)
  return [y, *tape.gradient(y, [x, kernel, *bias], output_gradients=dy)]


@pytest.mark.parametrize('dtype, rtol', [(tf.float64, 1e-12), (tf.float32, 1e-5)])
@pytest.mark.parametrize('shape, kernel_shape', [
    ((3, 30, 30, 8), (6, 6, 3, 8)),  # The decoder's last layer at depth 8.
    ((3, 13, 13, 16), (6, 6, 8, 16)),  # Its h4 (more channels out).
    ((2, 5, 7, 4), (4, 4, 5, 4)),  # Not square, another even kernel.
])
def test_subpixel_transposed_convolution_is_tensorflows_with_its_gradients(dtype, rtol, shape, kernel_shape):
  """conv2d_transpose_subpixel (the decoder's h5) computes TensorFlow's stride-2 valid transposed convolution plus a
  bias, and its input, filter and bias gradients."""
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=shape), dtype)
  kernel = tf.constant(rng.normal(size=kernel_shape), dtype)
  k, out = kernel_shape[0], kernel_shape[2]
  size = [shape[0], 2 * shape[1] + k - 2, 2 * shape[2] + k - 2, out]
  dy = tf.constant(rng.normal(size=size), dtype)
  bias = tf.constant(rng.normal(size=out), dtype)
  expected = _value_and_grads(lambda x, w, b: tf.nn.conv2d_transpose(x, w, size, 2, 'VALID') + b, x, kernel, dy, bias)
  got = _value_and_grads(models.conv2d_transpose_subpixel, x, kernel, dy, bias)
  for name, a, b in zip(('output', 'input gradient', 'kernel gradient', 'bias gradient'), got, expected):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=rtol * 10, err_msg=name)


@pytest.mark.parametrize('dtype, rtol', [(tf.float64, 1e-12), (tf.float32, 1e-5)])
@pytest.mark.parametrize('shape, kernel_shape, stride', [
    ((3, 6, 6, 8), (4, 4, 8, 16), 2),  # The encoder's last layer at depth 2: 2 x 2 output pixels.
    ((2, 9, 7, 3), (3, 3, 3, 5), 2),  # 4 x 3 output pixels.
    ((2, 5, 5, 3), (2, 2, 3, 4), 1),
    ((2, 7, 7, 3), (4, 4, 3, 5), 2),  # 2 x 2 output pixels; the input's last row and column take no part.
])
def test_matmul_filter_gradient_convolution_is_tensorflows_with_its_gradients(dtype, rtol, shape, kernel_shape,
                                                                               stride):
  """conv2d_matmul_filter_grad (the encoder's h4) computes TensorFlow's valid convolution and its gradients."""
  rng = np.random.default_rng(1)
  x = tf.constant(rng.normal(size=shape), dtype)
  kernel = tf.constant(rng.normal(size=kernel_shape), dtype)
  rows = (shape[1] - kernel_shape[0]) // stride + 1
  cols = (shape[2] - kernel_shape[1]) // stride + 1
  dy = tf.constant(rng.normal(size=(shape[0], rows, cols, kernel_shape[3])), dtype)
  expected = _value_and_grads(lambda x, w: tf.nn.conv2d(x, w, stride, 'VALID'), x, kernel, dy)
  got = _value_and_grads(lambda x, w: models.conv2d_matmul_filter_grad(x, w, stride), x, kernel, dy)
  for name, a, b in zip(('output', 'input gradient', 'kernel gradient'), got, expected):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=rtol * 10, err_msg=name)


def test_the_encoder_and_decoder_use_the_faster_formulations_at_their_shapes():
  """The encoder's last layer has the matmul filter gradient, the decoder's last the subpixel forward pass, and
  in bfloat16 both stay within bfloat16 rounding of TensorFlow's own ops at the layers' shapes (or, where
  TensorFlow's own bfloat16 kernels run, without oneDNN, within twice their own error: their filter gradients sum
  in bfloat16, about 3% off)."""
  encoder, decoder = models.ConvEncoder(4, dtype='mixed_bfloat16'), models.ConvDecoder(4, dtype='mixed_bfloat16')
  assert encoder.h4._matmul_filter_grad and not any(l._matmul_filter_grad for l in (encoder.h1, encoder.h2, encoder.h3))
  assert decoder.h5._subpixel and not any(l._subpixel for l in (decoder.h2, decoder.h3, decoder.h4))
  rng = np.random.default_rng(2)
  for fn, reference, shape, kernel_shape, out in (
      (lambda x, w: models.conv2d_transpose_subpixel(x, w, tf.ones(3, x.dtype)),
       lambda x, w: tf.nn.conv2d_transpose(x, w, [64, 64, 64, 3], 2, 'VALID') + 1, (64, 30, 30, 4), (6, 6, 3, 4),
       (64, 64, 64, 3)),
      (lambda x, w: models.conv2d_matmul_filter_grad(x, w, 2), lambda x, w: tf.nn.conv2d(x, w, 2, 'VALID'),
       (64, 6, 6, 16), (4, 4, 16, 32), (64, 2, 2, 32))):
    x, kernel, dy = (tf.constant(rng.normal(size=s), tf.float32) for s in (shape, kernel_shape, out))
    expected = _value_and_grads(reference, x, kernel, dy)
    got = _value_and_grads(fn, *(tf.cast(t, tf.bfloat16) for t in (x, kernel, dy)))
    theirs = _value_and_grads(reference, *(tf.cast(t, tf.bfloat16) for t in (x, kernel, dy)))
    error = lambda a, b: np.abs(tf.cast(a, tf.float32).numpy() - b.numpy()).max()
    for a, b, c in zip(got, expected, theirs):
      bound = 2 ** -6 * np.abs(b.numpy()).max()
      if not runtime.onednn_takes_bfloat16():
        bound = max(bound, 2 * error(c, b))
      assert error(a, b) < bound, (error(a, b), bound, error(c, b))
