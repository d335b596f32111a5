"""The contrastive representation: tools.contrastive_loss (the paper's NCE objective) against a brute-force numpy
version of the paper's code's loop over rolled copies, its accuracy, its gradients, and models.StateModel."""

import numpy as np
import pytest
import tensorflow as tf

import models
import tools


def np_contrastive(mean, std, feat, batch_amount, time_amount):
  """The paper's code's loop in numpy (float64): for every shift of the window (batch shifts outer, time inner;
  each as amount // 2 below and the rest from 0 up) roll the features and score them under every step's state
  model; the objective is the own score minus the logsumexp over the shifts. Returns (loss, accuracy)."""
  mean, std, feat = (np.asarray(x, np.float64) for x in (mean, std, feat))
  logprob = lambda x: np.sum(-0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi), -1)
  scores, own = [], None
  for index in range(batch_amount * time_amount):
    batch_shift = index // time_amount - batch_amount // 2
    time_shift = index % time_amount - time_amount // 2
    scores.append(logprob(np.roll(np.roll(feat, batch_shift, 0), time_shift, 1)))  # [B, T]
    if batch_shift == 0 and time_shift == 0:
      own = len(scores) - 1
  scores = np.stack(scores)  # [S, B, T]
  top = scores.max(0)
  negative = top + np.log(np.exp(scores - top).sum(0))
  loss = -np.mean(scores[own] - negative)
  accuracy = np.mean(scores.argmax(0) == own)
  return loss, accuracy


def random_inputs(B, T, F, seed=0):
  rng = np.random.RandomState(seed)
  feat = rng.normal(size=(B, T, F)).astype(np.float32)
  # State models near their own features, so that the accuracy is neither 0 nor 1.
  mean = (feat + rng.normal(0, 1.0, size=(B, T, F))).astype(np.float32)
  std = rng.uniform(0.5, 2.0, size=(B, T, F)).astype(np.float32)
  return mean, std, feat


def call(mean, std, feat, batch_amount=10, time_amount=30):
  loss, accuracy = tools.contrastive_loss(
      tf.constant(mean), tf.constant(std), tf.constant(feat), batch_amount, time_amount)
  assert loss.dtype == accuracy.dtype == tf.float32 and loss.shape == accuracy.shape == (), (loss, accuracy)
  return loss.numpy(), accuracy.numpy()


def test_np_helper_by_hand():
  # B = 2, T = 1, F = 1, std 1: each state model sees its own feature and the other step's.
  mean, std, feat = np.array([[[0.0]], [[1.0]]]), np.ones((2, 1, 1)), np.array([[[0.0]], [[3.0]]])
  # Step 0: own score -1/2 0^2, other -1/2 3^2; step 1: own -1/2 2^2, other -1/2 1^2 (constants cancel).
  objective0 = 0.0 - np.log(np.exp(0.0) + np.exp(-4.5))
  objective1 = -2.0 - np.log(np.exp(-2.0) + np.exp(-0.5))
  loss, accuracy = np_contrastive(mean, std, feat, 2, 1)
  np.testing.assert_allclose(loss, -(objective0 + objective1) / 2)
  assert accuracy == 0.5  # Step 1's model prefers step 0's feature.
  np.testing.assert_allclose(call(*(x.astype(np.float32) for x in (mean, std, feat)), 2, 1), (loss, accuracy),
                             rtol=1e-6)


@pytest.mark.parametrize('B, T, batch_amount, time_amount', [
    (4, 20, 10, 30),  # The defaults on a small batch: the window is the whole batch.
    (6, 8, 3, 5),  # A proper window, odd amounts.
    (5, 6, 4, 2),  # Even amounts: one more shift below zero than above.
])
def test_loss_and_accuracy_against_numpy(B, T, batch_amount, time_amount):
  mean, std, feat = random_inputs(B, T, 3, seed=B * T)
  # The numpy loop counts a shift twice when the amount exceeds the size; the port clamps the amount.
  expected = np_contrastive(mean, std, feat, min(batch_amount, B), min(time_amount, T))
  loss, accuracy = call(mean, std, feat, batch_amount, time_amount)
  np.testing.assert_allclose(loss, expected[0], rtol=1e-5)
  np.testing.assert_allclose(accuracy, expected[1])
  assert 0 < accuracy < 1, accuracy  # The case tells the steps apart, but not always.


def test_exact_state_models_are_accurate_and_permuted_ones_are_not():
  B, T, F = 4, 5, 6
  _, _, feat = random_inputs(B, T, F, seed=1)
  std = np.full_like(feat, 0.05)
  loss, accuracy = call(feat, std, feat)
  assert accuracy == 1.0 and 0 <= loss < 1e-3, (loss, accuracy)
  # Every model predicts the next step's feature (cyclically): no step picks its own.
  loss, accuracy = call(np.roll(feat, -1, 1), std, feat)
  assert accuracy == 0.0 and loss > 10, (loss, accuracy)


def test_gradients_reach_both_inputs_and_match_the_direct_scores():
  # The matmul form's gradients equal those of the direct per-pair log-probs (a TF version of the numpy loop).
  B, T, F = 3, 4, 2
  mean, std, feat = (tf.Variable(x) for x in random_inputs(B, T, F, seed=2))

  def direct():
    scores = []
    for i in range(B):
      for j in range(T):
        rolled = tf.roll(tf.roll(feat, i - B // 2, 0), j - T // 2, 1)
        scores.append(tf.reduce_sum(-0.5 * tf.square((rolled - mean) / std) - tf.math.log(std), -1))
    own = tf.reduce_sum(-0.5 * tf.square((feat - mean) / std) - tf.math.log(std), -1)
    return -tf.reduce_mean(own - tf.reduce_logsumexp(tf.stack(scores), 0))

  with tf.GradientTape(persistent=True) as tape:
    loss, _ = tools.contrastive_loss(mean, std, feat)
    expected = direct()
  np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-5)
  for var in (mean, std, feat):
    grad, want = tape.gradient(loss, var), tape.gradient(expected, var)
    assert np.abs(grad.numpy()).min() > 0, var.name  # Every element gets a gradient.
    np.testing.assert_allclose(grad.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)


def test_half_precision_features():
  mean, std, feat = random_inputs(2, 3, 4, seed=3)
  loss, accuracy = tools.contrastive_loss(
      tf.constant(mean), tf.constant(std), tf.constant(feat, tf.bfloat16))
  expected = np_contrastive(mean, std, tf.cast(tf.constant(feat, tf.bfloat16), tf.float32).numpy(), 2, 3)
  np.testing.assert_allclose((loss.numpy(), accuracy.numpy()), expected, rtol=1e-5)


def test_state_model(precision):
  B, T, E, F = 2, 3, 16, 5
  model = models.StateModel(F, layers=3, units=8, name='cpc')
  embed = tf.random.stateless_normal((B, T, E), [0, 1])
  with tf.GradientTape() as tape:
    tape.watch(embed)
    dist = model(embed)
    mean, std = dist.mean(), dist.stddev()
    loss, _ = tools.contrastive_loss(mean, std, tf.random.stateless_normal((B, T, F), [0, 2]))
  assert mean.dtype == std.dtype == tf.float32 and mean.shape == std.shape == (B, T, F), (mean, std)
  assert dist.event_shape == (F,) and dist.batch_shape == (B, T), (dist.event_shape, dist.batch_shape)
  assert (std.numpy() > 1e-2).all()
  names = [layer.name for layer in model.dense_layers]
  assert names == ['h0', 'h1', 'h2', 'hout', 'hstd'], names
  assert sorted(v.path for v in model.trainable_weights) == sorted(
      f'cpc/{n}/{k}' for n in names for k in ('kernel', 'bias'))
  grads = tape.gradient(loss, [embed] + model.trainable_weights)
  assert all(g is not None and np.abs(tf.cast(g, tf.float32).numpy()).sum() > 0 for g in grads)
