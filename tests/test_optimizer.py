"""tools.Optimizer (with tools.Adam's fused update) against Keras's Adam fed the same gradients: the weights, the
moments and the step counter after every step, with global-norm clipping, skipped non-finite steps, decoupled
weight decay on the variables the pattern matches, and dynamic loss scaling."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tools

LR, CLIP, WD = 0.01, 3.0, 0.1


def gradient_sequence(shapes, seed=0):
  """Ten steps of gradients: mixed scales (tiny ones, where epsilon matters; large ones, which get clipped), a NaN
  step and an inf step."""
  rng = np.random.RandomState(seed)
  steps = []
  for step, scale in enumerate([1e-6, 0.1, 5.0, 1.0, 1e-5, 0.3, 20.0, 1e-3, 2.0, 0.05]):
    grads = [(scale * rng.normal(size=shape)).astype(np.float32) for shape in shapes]
    if step == 3:
      grads[0][0, 1] = np.nan
    if step == 6:
      grads[1][2] = np.inf
    steps.append(grads)
  return steps


def keras_reference(initial, steps, wd):
  """Keras's own Adam on the same gradients: clipped by their global norm, non-finite steps skipped, weight decay
  on the kernel only."""
  variables = [tf.Variable(value) for value in initial]
  adam = keras.optimizers.Adam(LR, weight_decay=wd or None)
  if wd:
    adam.exclude_from_weight_decay(var_list=variables[1:])
  adam.build(variables)
  states = []
  for grads in steps:
    norm = tf.linalg.global_norm(grads)
    if np.isfinite(norm.numpy()):
      clipped, _ = tf.clip_by_global_norm(grads, CLIP, norm)
      adam.apply(clipped, variables)
    states.append(dict(weights=[v.numpy() for v in variables], m=[m.numpy() for m in adam._momentums],
                       v=[v.numpy() for v in adam._velocities], iterations=int(adam.iterations.numpy()),
                       norm=float(norm.numpy())))
  return states


@pytest.mark.parametrize('loss_scale', [False, True], ids=['plain', 'loss_scale'])
@pytest.mark.parametrize('wd', [0.0, WD], ids=['no_decay', 'decay'])
def test_optimizer_steps_equal_keras_adam(wd, loss_scale):
  layer = keras.layers.Dense(3, name='h0')
  layer.build((None, 4))
  opt = tools.Optimizer('model', [layer], LR, clip=CLIP, wd=wd, wdpattern='kernel', loss_scale=loss_scale)
  variables = opt.variables
  assert [v.path for v in variables] == ['h0/kernel', 'h0/bias']
  initial = [v.numpy() for v in variables]
  steps = gradient_sequence([v.shape for v in variables])
  expected = keras_reference(initial, steps, wd)

  @tf.function(autograph=False)
  def step(grads):
    with tf.GradientTape() as tape:
      loss = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, variables)])  # Its gradient is `grads`.
    norm, finite, _ = opt(tape, loss)
    return norm, finite

  adam = opt._inner
  assert isinstance(adam, tools.Adam)
  for index, (grads, want) in enumerate(zip(steps, expected)):
    scale = float(opt._opt.dynamic_scale.numpy()) if loss_scale else 1.0
    norm, finite = step([tf.constant(g) for g in grads])
    assert bool(finite) == np.isfinite(want['norm']), index
    if finite:
      np.testing.assert_allclose(float(norm), want['norm'], rtol=1e-6)
    else:
      assert index in (3, 6)
      if loss_scale:  # The loss scaler halved its scale.
        assert float(opt._opt.dynamic_scale.numpy()) == scale / 2
    assert int(adam.iterations.numpy()) == want['iterations'], index
    # The kernel computes 1 - beta2 in float32 (0.00099998713, as the reference's TF 2.2 Adam did), Keras 3 in
    # float64 (0.001): v differs by 1.3e-5 relative, the updates by up to that. So the weights' displacements are
    # compared, up to that and to two float32 roundings of the weights.
    for i, (a, b, start) in enumerate(zip(variables, want['weights'], initial)):
      np.testing.assert_allclose(a.numpy() - start, b - start, rtol=2e-5, atol=2.4e-7 * np.abs(b).max(),
                                 err_msg=f'step {index}, weights {i}')
    for name, ours, rtol in (('m', adam._momentums, 2e-6), ('v', adam._velocities, 2e-5)):
      for i, (a, b) in enumerate(zip(ours, want[name])):
        np.testing.assert_allclose(a.numpy(), b, rtol=rtol, atol=1e-7 * np.abs(b).max(),
                                   err_msg=f'step {index}, {name} {i}')
  assert expected[-1]['iterations'] == 8  # Two of the ten steps were skipped.
  # The decay reached the kernel only: without it the kernel ends elsewhere, the bias at the same place.
  if wd:
    plain = keras_reference(initial, steps, 0.0)[-1]['weights']
    assert np.abs(plain[0] - expected[-1]['weights'][0]).max() > 1e-3
    np.testing.assert_array_equal(plain[1], expected[-1]['weights'][1])

  # One fused kernel per variable in the traced update.
  graph = step.get_concrete_function([tf.constant(g) for g in steps[0]]).graph
  assert op_types(graph).count('ResourceApplyAdam') == len(variables)


def op_types(graph):
  """The types of a graph's ops and of those in its conditionals' branches."""
  types = []
  for op in graph.get_operations():
    types.append(op.type)
    if op.type in ('If', 'StatelessIf'):
      for branch in ('then_branch', 'else_branch'):
        types += op_types(graph._get_function(op.get_attr(branch).name).graph)
  return types


def test_adam_alone_equals_keras_adam_with_amsgrad_falling_back():
  """tools.Adam is a drop-in Keras optimizer: apply() on its own matches Keras's Adam; amsgrad keeps Keras's."""
  rng = np.random.RandomState(1)
  initial = rng.normal(size=(5, 2)).astype(np.float32)
  for amsgrad in (False, True):
    ours, theirs = tf.Variable(initial), tf.Variable(initial)
    a = tools.Adam(LR, amsgrad=amsgrad)
    b = keras.optimizers.Adam(LR, amsgrad=amsgrad)
    for _ in range(5):
      grad = tf.constant(rng.normal(size=(5, 2)).astype(np.float32))
      a.apply([grad], [ours])
      b.apply([grad], [theirs])
    np.testing.assert_allclose(ours.numpy() - initial, theirs.numpy() - initial, rtol=2e-5, atol=2.4e-7 * 3)
    assert int(a.iterations.numpy()) == 5


def test_tape_watches_only_its_variables_and_skips_other_weight_gradients_in_loops():
  """Through a symbolic loop over two layers, the optimizer's tape gives the same gradients for its own layer as a
  default tape, and the traced gradient no longer computes the other layer's weight gradient (fewer FLOPs)."""
  import benchmark
  own, other = keras.layers.Dense(16, 'elu', name='own'), keras.layers.Dense(16, 'tanh', name='other')
  own.build((None, 16))
  other.build((None, 16))
  opt = tools.Optimizer('actor', [own], LR)
  start = tf.constant(np.random.RandomState(2).normal(size=(64, 16)).astype(np.float32))

  def run(tape_fn):
    with tape_fn() as tape:
      states = tools.scan(lambda x, _: other(x + own(x)), tf.range(5), start)
      loss = tf.reduce_sum(states[-1] ** 2)
    return tape, tape.gradient(loss, opt.variables)

  default = tf.function(lambda: run(tf.GradientTape)[1], autograph=False)
  narrow = tf.function(lambda: run(opt.tape)[1], autograph=False)
  for a, b in zip(default(), narrow()):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
  tape, _ = run(opt.tape)
  assert {id(v) for v in tape.watched_variables()} == {id(v.value) for v in opt.variables}
  flops = lambda fn: sum(benchmark.graph_flops(fn.get_concrete_function().graph).values())
  # The other layer's kernel gradient is a [16, 64] x [64, 16] matmul per step: 5 x 2 x 16 x 64 x 16 FLOPs.
  assert flops(default) - flops(narrow) >= 5 * 2 * 16 * 64 * 16
