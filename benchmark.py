"""`python dreamer.py --logdir L --benchmark True`: how fast this machine trains Dreamer with the given flags.

Writes L/benchmark.json and prints it as a table: the first train step (tracing included), the train step on
synthetic batches, its exact FLOP count and achieved rate against a matmul peak measured in the same precision,
the policy step, the real environment step, and the hours one million environment steps take.
"""

import collections
import json
import os
import pathlib
import re
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

import flags
import runtime
import seeds
import tools


def synthetic_episodes(directory, config, actdim, count=4):
  """Random episodes long enough for --batch_length; enough to draw batches from."""
  rng = np.random.RandomState(config.seed)
  length = max(config.batch_length + 1, 101)
  for _ in range(count):
    tools.save_episodes(directory, [dict(
        image=rng.randint(0, 255, (length, 64, 64, 3), dtype=np.uint8),
        action=rng.uniform(-1, 1, (length, actdim)).astype(np.float32),
        reward=rng.rand(length).astype(np.float32), discount=np.ones(length, np.float32))])


def _live_ops(graph):
  """Ops that run: everything the function's outputs and side effects depend on (what grappler keeps)."""
  seen, stack = {}, [t.op for t in graph.outputs] + list(graph.control_outputs)
  while stack:
    op = stack.pop()
    if op.name in seen:
      continue
    seen[op.name] = op
    stack.extend(t.op for t in op.inputs)
    stack.extend(op.control_inputs)
  return seen.values()


def _size(shape):
  return int(np.prod([int(d) for d in shape]))


def graph_ops(graph):
  """The ops of a traced function that run, a loop's body and condition counted once (not per iteration): what the
  executor schedules and what a tidy-up of the Python code must leave unchanged."""
  count = 0
  for op in _live_ops(graph):
    count += 1
    if op.type in ('While', 'StatelessWhile'):
      count += sum(graph_ops(graph._get_function(op.get_attr(part).name).graph) for part in ('body', 'cond'))
  return count


def graph_flops(graph):
  """FLOPs of one call of a traced function, by op type. Convolutions count 2 * filter size per output position
  of the forward convolution (also for their gradients and transposed convolutions); other ops use TF's
  registered statistics (matmuls 2 m k n). The body of a loop (the RSSM's tf.scan and its gradient) counts once
  per iteration: its trip count is the loop's constant maximum_iterations."""
  flops = collections.Counter()
  for op in _live_ops(graph):
    if op.type in ('While', 'StatelessWhile'):
      trips = tf.get_static_value(op.inputs[1])
      body = graph._get_function(op.get_attr('body').name).graph
      if trips is None:
        raise ValueError(f'Cannot count the FLOPs of loop {op.name}: its trip count is not a constant.')
      flops.update({k: int(trips) * v for k, v in graph_flops(body).items()})
      continue
    if op.type == 'Conv2D':
      value = 2 * _size(op.inputs[1].shape) * _size(op.outputs[0].shape[:-1])
    elif op.type == 'Conv2DBackpropInput':
      value = 2 * _size(op.inputs[1].shape) * _size(op.inputs[2].shape[:-1])
    elif op.type == 'Conv2DBackpropFilter':
      value = 2 * _size(op.outputs[0].shape) * _size(op.inputs[2].shape[:-1])
    else:
      try:
        value = tf_ops.get_stats_for_node_def(graph, op.node_def, 'flops').value or 0
      except Exception:  # No statistics registered, or shapes unknown.
        value = 0
    if value:
      flops[op.type] += value
  return flops


# The kernels whose sum is the train step's floor: convolutions, their gradients and matmuls.
KERNELS = ('Conv2D', 'Conv2DBackpropInput', 'Conv2DBackpropFilter', 'MatMul', 'BatchMatMulV2')
_KERNEL_ATTRS = dict(
    Conv2D=('strides', 'padding', 'data_format', 'dilations'),
    Conv2DBackpropInput=('strides', 'padding', 'data_format', 'dilations'),
    Conv2DBackpropFilter=('strides', 'padding', 'data_format', 'dilations'),
    MatMul=('transpose_a', 'transpose_b'), BatchMatMulV2=('adj_x', 'adj_y'))


def kernel_calls(graph, trips=1):
  """Counter of (op type, input shapes, dtype, attributes) -> calls per call of the traced function, for every
  convolution, convolution gradient and matmul that runs; a loop's body counts once per iteration."""
  calls = collections.Counter()
  for op in _live_ops(graph):
    if op.type in ('While', 'StatelessWhile'):
      body = graph._get_function(op.get_attr('body').name).graph
      calls.update(kernel_calls(body, trips * int(tf.get_static_value(op.inputs[1]))))
    elif op.type in KERNELS:
      if op.type == 'Conv2DBackpropInput':  # (input_sizes, filter, out_backprop): the sizes are the output's.
        shapes = (tuple(op.outputs[0].shape), tuple(op.inputs[1].shape), tuple(op.inputs[2].shape))
      elif op.type == 'Conv2DBackpropFilter':  # (input, filter_sizes, out_backprop).
        shapes = (tuple(op.inputs[0].shape), tuple(op.outputs[0].shape), tuple(op.inputs[2].shape))
      else:
        shapes = tuple(tuple(t.shape) for t in op.inputs)
      attrs = tuple((name, tuple(value) if isinstance(value, list) else value)
                    for name, value in ((n, op.get_attr(n)) for n in _KERNEL_ATTRS[op.type]))
      calls[(op.type, shapes, op.outputs[0].dtype.name, attrs)] += trips
  return calls


def _kernel_fn(kind, shapes, dtype, attrs, repeats, lanes=1):
  """A tf.function that runs one kernel `repeats` times one after another (each call waits for the previous one,
  so that the cores work on one kernel at a time, as in the step's critical path) on random inputs; with `lanes`,
  that many such chains side by side (each kernel on a share of the cores)."""
  attrs = dict(attrs)
  dtype = tf.as_dtype(dtype)
  # Each lane its own inputs: copies of one computation on the same inputs are what an optimizer could merge.
  tensors = lambda *indices: [[tf.cast(tf.random.normal(shapes[i]), dtype) for i in indices] for _ in range(lanes)]
  if kind == 'Conv2D':
    inputs = tensors(0, 1)
    op = lambda x, w: tf.raw_ops.Conv2D(input=x, filter=w, **attrs)
  elif kind == 'Conv2DBackpropInput':
    inputs = tensors(1, 2)
    op = lambda w, dy: tf.raw_ops.Conv2DBackpropInput(input_sizes=shapes[0], filter=w, out_backprop=dy, **attrs)
  elif kind == 'Conv2DBackpropFilter':
    inputs = tensors(0, 2)
    op = lambda x, dy: tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=shapes[1], out_backprop=dy, **attrs)
  elif kind == 'MatMul':
    inputs = tensors(0, 1)
    op = lambda a, b: tf.raw_ops.MatMul(a=a, b=b, **attrs)
  else:
    inputs = tensors(0, 1)
    op = lambda a, b: tf.raw_ops.BatchMatMulV2(x=a, y=b, **attrs)

  @tf.function(autograph=False)
  def run(inputs):
    outs = [tf.zeros(()) + lane for lane in range(lanes)]
    for _ in range(repeats):
      for lane in range(lanes):
        with tf.control_dependencies([outs[lane]]):
          outs[lane] = op(*inputs[lane])
    return tf.add_n([tf.reduce_sum(tf.cast(tf.reshape(out, [-1])[:1], tf.float32)) for out in outs])

  return lambda: run(inputs).numpy()


def kernel_floor(graph, budget_s=0.3, largest=12):
  """The train step's kernel floor: each convolution (forward and both gradients) and matmul of the traced step
  timed alone at its shapes and dtype, on all cores (under --intra_op_threads: as many copies side by side as fill
  them, the time per copy: a throughput, not comparable with a floor under TensorFlow's default threads), times its
  calls per step, summed. Returns (floor in seconds,
  seconds by op type, the `largest` kernels by their seconds per step: op, shapes, dtype, calls, ms per call and
  per step, GFLOP/s). Each kernel runs in blocks of repeats lasting about `budget_s`; the fastest of three blocks
  counts (the empty function's own call time subtracted). Grappler is off for these small functions (oneDNN's
  rewrite is not part of it and stays): it would merge the identical repeats into one."""
  options = tf.config.optimizer.get_experimental_options()
  tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': True})
  try:
    empty = tf.function(lambda: tf.zeros(()))
    empty()
    overhead = min(_timed(lambda: empty().numpy()) for _ in range(20))
    total, by_kind, rows = 0.0, collections.Counter(), []
    lanes = runtime.lanes()
    for (kind, shapes, dtype, attrs), calls in kernel_calls(graph).items():
      once = _kernel_fn(kind, shapes, dtype, attrs, 1, lanes)
      once()  # Traces; oneDNN creates its kernel for the shape.
      single = max(min(_timed(once) for _ in range(3)) - overhead, 1e-6)
      repeats = int(np.clip(budget_s / 3 / single, 1, 200))
      block = _kernel_fn(kind, shapes, dtype, attrs, repeats, lanes)
      block()
      seconds = max(min(_timed(block) for _ in range(3)) - overhead, 0.0) / repeats / lanes
      total += seconds * calls
      by_kind[kind] += seconds * calls
      rows.append(dict(op=kind, shapes=[list(s) for s in shapes], dtype=dtype, calls=calls,
                       ms_per_call=1e3 * seconds, ms=1e3 * seconds * calls,
                       gflops=kernel_flops(kind, shapes, dict(attrs)) / seconds / 1e9 if seconds else None))
  finally:
    tf.config.optimizer.set_experimental_options(options)
  rows.sort(key=lambda row: -row['ms'])
  return total, dict(by_kind.most_common()), rows[:largest]


def kernel_flops(kind, shapes, attrs):
  """FLOPs of one kernel call of kernel_calls' (op type, shapes, attributes), counted as graph_flops counts them."""
  if kind == 'Conv2D':  # (input, filter): the output's positions from the strides and padding.
    (n, h, w, _), (kh, kw, _, _) = shapes[0], shapes[1]
    strides = attrs['strides']
    assert attrs['data_format'] == b'NHWC' and attrs['padding'] in (b'VALID', b'SAME'), attrs
    assert list(attrs['dilations']) == [1, 1, 1, 1], attrs
    if attrs['padding'] == b'VALID':
      rows, cols = (h - kh) // strides[1] + 1, (w - kw) // strides[2] + 1
    else:
      rows, cols = -(-h // strides[1]), -(-w // strides[2])
    return 2 * _size(shapes[1]) * n * rows * cols
  if kind in ('Conv2DBackpropInput', 'Conv2DBackpropFilter'):  # (input, filter, out_backprop) sizes.
    return 2 * _size(shapes[1]) * _size(shapes[2][:-1])
  a, b = shapes
  first, second = (('transpose_a', 'transpose_b') if kind == 'MatMul' else ('adj_x', 'adj_y'))
  m, k = (a[-1], a[-2]) if attrs[first] else (a[-2], a[-1])
  n = b[-2] if attrs[second] else b[-1]
  batch = _size(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
  return 2 * batch * m * k * n


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def op_profile(run_step):
  """Runs `run_step` once under TensorFlow's profiler. Returns the op time in ms by op kind and by part of the
  network (the op's first name scope, `grad ` in front for gradient ops), largest first. Op times are summed over
  the threads that ran ops concurrently, so their total exceeds the step's wall time."""
  from tensorflow.python.profiler import profiler_v2 as profiler
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  with tempfile.TemporaryDirectory() as logdir:
    profiler.start(logdir)
    try:
      run_step()
    finally:
      profiler.stop()
    space = xplane_pb2.XSpace()
    space.ParseFromString(next(pathlib.Path(logdir).rglob('*.xplane.pb')).read_bytes())
  by_kind, by_part = collections.Counter(), collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if ':' not in name or ' ' in name or '::' in name:  # TF ops are 'scope/op:Kind'; skip the executor's events.
          continue
        op, kind = name.rsplit(':', 1)
        ms = event.duration_ps / 1e9
        by_kind[kind.replace('_MklNative', '').replace('_Mkl', '')] += ms
        parts = op.split('/')
        grad = parts[0] == 'gradient_tape' and len(parts) > 1
        part = parts[1] if grad else parts[0]
        part = part.split('CONSTRUCTED_AT_')[-1]  # A TFP distribution's ops count for the layer that made it.
        base, _, suffix = part.rpartition('_')
        part = base if base and suffix.isdigit() else part
        by_part[('grad ' if grad else '') + part] += ms
  top = lambda counter: {k: round(v, 1) for k, v in counter.most_common(12)}
  return top(by_kind), top(by_part)


def peak_gflops(dtype, size=2048, repeats=10):
  """Rate of a large square matmul in `dtype` on this device, all cores busy (runtime.lanes)."""
  a = tf.random.normal((size, size), dtype=tf.float32)
  a = tf.cast(a, dtype)
  lanes = runtime.lanes()

  @tf.function
  def run(a):
    xs = [a * tf.cast(1 + lane / 8, dtype) for lane in range(lanes)]  # Distinct, so grappler cannot merge them.
    for _ in range(repeats):
      xs = [tf.matmul(x, a) * tf.cast(1e-3, dtype) for x in xs]
    return tf.add_n([x[0, 0] for x in xs])

  run(a).numpy()
  times = []
  for _ in range(3):
    start = time.perf_counter()
    run(a).numpy()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 * repeats * lanes / min(times) / 1e9


def xla_cache_state():
  """{dir, entries}: TensorFlow's persistent XLA cache as this process found it (runtime.py). With entries from
  an earlier run of the same code, the first train step loads its XLA programs instead of compiling them."""
  found = re.search(r'--' + runtime.XLA_CACHE_FLAG + r'=(\S+)', os.environ.get('TF_XLA_FLAGS', ''))
  if not found:
    return {'dir': None, 'entries': 0}
  return {'dir': found.group(1), 'entries': len(list(pathlib.Path(found.group(1)).glob('*.pb')))}


def spread(values):
  return dict(min=float(np.min(values)), median=float(np.median(values)), max=float(np.max(values)),
              n=len(values))


def run(config, make_agent, make_dataset, make_env, policy_name, process_start):
  """Measures everything; returns the dict written to benchmark.json. `make_agent(actspace[, config])` builds an
  agent (of the given config); the CEM step is measured on one built from a changed config."""
  result = collections.OrderedDict()
  gpus = tf.config.list_physical_devices('GPU')
  per_op = runtime.threads_per_op()
  result['device'] = (f'GPU x{len(gpus)}' if gpus else f'CPU ({runtime.describe_cpu()}; '
                      f'{len(tf.config.list_physical_devices("CPU"))} device, {runtime.cores()} cores'
                      f'{", " + per_op if per_op else ""})')
  result['onednn'] = runtime.onednn_enabled()
  result['xla_cache'] = xla_cache_state()
  result['intra_op_threads'] = tf.config.threading.get_intra_op_parallelism_threads()  # 0: TF's default.
  result['precision'] = policy_name
  result['config'] = {k: config[k] for k in (
      'batch_size', 'batch_length', 'horizon', 'deter_size', 'stoch_size', 'num_units', 'cnn_depth',
      'train_every', 'train_steps', 'action_repeat', 'task')}

  env = make_env(config, 'test', 0)
  try:
    result.update(_measure(config, make_agent, make_dataset, env, process_start, policy_name))
  finally:
    env.close()

  agent_steps = 1e6 / config.action_repeat
  eval_steps = 1e6 / config.eval_every * config.time_limit / config.action_repeat
  seconds = (1e6 / config.train_every * config.train_steps * result['train_step_s']['median']
             + (agent_steps + eval_steps) * (result['env_step_ms']['median'] + result['policy_step_ms']['median'])
             / 1000)
  result['hours_per_1e6_env_steps'] = seconds / 3600
  return result


def _measure(config, make_agent, make_dataset, env, process_start, policy_name):
  result = {}
  space = env.action_space
  space.seed(config.seed)
  with tempfile.TemporaryDirectory() as datadir:
    actdim = int(space.n if hasattr(space, 'n') else space.shape[0])
    synthetic_episodes(datadir, config, actdim)
    start = time.perf_counter()
    dataset = make_dataset(datadir)
    agent = make_agent(space)
    train = lambda data, update: agent.train(data, seeds.train_step(config.seed, update))['model_loss'].numpy()
    train(next(dataset), 1)  # The first train step (tracing included), as the loop's build step.
    result['first_train_step_s'] = time.perf_counter() - start
    result['first_train_step_since_process_start_s'] = time.perf_counter() - process_start
    data = [next(dataset) for _ in range(2)]
    for update, batch in enumerate(data, 2):  # Warm-up; meanwhile the input pipeline fills its prefetch buffer.
      train(batch, update)
    times = []
    for update in range(4, 13):  # Steady state: each step takes a batch and the pipeline makes the next alongside.
      start = time.perf_counter()
      train(next(dataset), update)
      times.append(time.perf_counter() - start)
    result['train_step_s'] = spread(times)
    graph = agent.train_graph(data[0], seeds.train_step(config.seed, 0))
    flops = graph_flops(graph)
    result['train_step_ops'] = graph_ops(graph)
    result['gflop_per_train_step'] = sum(flops.values()) / 1e9
    result['gflop_by_op'] = {k: v / 1e9 for k, v in flops.most_common(6)}
    result['achieved_gflops'] = result['gflop_per_train_step'] / result['train_step_s']['median']
    try:
      by_kind, by_part = op_profile(lambda: train(data[1], 13))
      result['op_ms_by_kind'], result['op_ms_by_part'] = by_kind, by_part
    except Exception as e:  # The profile is extra information; the measurements stand without it.
      print(f'No op profile: {e}')
    result['peak_gflops'] = peak_gflops(tf.as_dtype(keras.mixed_precision.Policy(policy_name).compute_dtype))
    floor, by_kind, largest = kernel_floor(graph)
    result['kernel_floor_s'] = floor
    result['kernel_floor_s_by_op'] = by_kind
    result['kernel_floor_largest'] = largest  # Where a faster formulation would pay (docs/speed.md, session 11).
    result['train_step_over_kernel_floor'] = result['train_step_s']['median'] / floor

    # Policy step: one observation, the training policy (sample + exploration), as in collection. The machine's
    # speed drifts within minutes, so the policy graph the flags choose is timed in turns with the other one (XLA
    # or the plain graph) where both exist: their comparison holds even when the absolute figures move.
    obs = {'image': np.zeros((1, 64, 64, 3), np.uint8)}
    result['policy_xla'] = agent.policy_xla
    agents = [agent]
    if agent.policy_xla_possible:  # Else both graphs would be the plain one.
      agents.append(make_agent(space, flags.AttrDict(config, jit_policy=not config.jit_policy)))
    times = policy_step_ms(agents, obs)
    result['policy_step_ms'] = spread(times[0])
    if len(agents) == 2:
      result['policy_step_ms_' + ('plain_graph' if agent.policy_xla else 'xla')] = spread(times[1])
    result['cem_policy_step_ms'] = spread(cem_step_ms(config, make_agent, space, obs))


  # Environment step: the real task through its worker, random actions.
  env.reset()
  times = []
  for _ in range(60):
    action = space.sample()
    start = time.perf_counter()
    _, _, done, _ = env.step(action)
    times.append(time.perf_counter() - start)
    if done:
      env.reset()
  result['env_step_ms'] = spread(1000 * np.array(times[10:]))
  return result



def policy_step_ms(agents, obs, blocks=20, block=10, warmup=10, training=True):
  """Milliseconds of each agent's policy step on `obs` (one environment; the training policy unless `training` is
  False), the agents called in turns of `block` steps after `warmup` steps each (tracing, compiling); one array per
  agent."""
  states, reset = [None] * len(agents), np.array([False])
  times = [[] for _ in agents]
  for i, agent in enumerate(agents):
    for _ in range(warmup):
      _, states[i] = agent.policy(obs, reset, states[i], training)
  for _ in range(blocks):
    for i, agent in enumerate(agents):
      for _ in range(block):
        start = time.perf_counter()
        _, states[i] = agent.policy(obs, reset, states[i], training)
        times[i].append(1000 * (time.perf_counter() - start))
  return [np.array(t) for t in times]


# PlaNet's planner settings, at which the CEM policy step is measured (the paper's `planet` baseline).
PAPER_CEM = dict(behavior='cem', cem_horizon=12, cem_candidates=1000, cem_topk=100, cem_iterations=10)


def cem_step_ms(config, make_agent, space, obs, repeats=10):
  """Milliseconds of one agent step of --behavior cem at PAPER_CEM with networks of the config's sizes: the
  evaluation policy of a CEM agent (encode one observation, obs_step, plan) for one environment."""
  agent = make_agent(space, flags.AttrDict(config, **PAPER_CEM))
  return policy_step_ms([agent], obs, blocks=1, block=repeats, warmup=2, training=False)[0]


def report(result, logdir):
  path = pathlib.Path(logdir) / 'benchmark.json'
  tools.write_json(path, result)
  rows = []
  for key, value in result.items():
    if isinstance(value, dict) and 'median' in value:
      value = f'{value["median"]:.3f} (min {value["min"]:.3f}, max {value["max"]:.3f}, n {value["n"]})'
    elif isinstance(value, float):
      value = f'{value:.3f}'
    elif isinstance(value, dict):
      value = json.dumps({k: float(f'{v:.4g}') if isinstance(v, float) else v for k, v in value.items()})
    elif isinstance(value, list):  # kernel_floor_largest: a line per kernel.
      value = '\n'.join([''] + [f'  {r["ms"]:8.1f} ms  {r["op"]} {r["shapes"]} {r["dtype"]} x{r["calls"]}  '
                                 f'{r["gflops"] or 0:.0f} GFLOP/s' for r in value])
    rows.append((key, str(value)))
  width = max(len(k) for k, _ in rows)
  print('\n'.join(f'{k:<{width}}  {v}' for k, v in rows))
  print(f'Wrote {path}.')
