"""Runs a few train steps of a tiny agent on fixed batches and seeds; writes its weights and metrics to an npz.

  python tests/distribute_run.py OUT.npz INIT.pkl EPISODES [dreamer flags]
  python tests/distribute_run.py RUN=OUT.npz,RUN=OUT.npz,... INIT.pkl EPISODES [dreamer flags]

With INIT.pkl missing the first run saves its initial weights there; every run starts from them. A bare OUT.npz
runs as the flags say (e.g. as one worker of a TF_CONFIG cluster). Named runs are made one after another in this
process (the process's start, TensorFlow's import, is most of a tiny run's time; the CPU is split into two logical
devices for all of them): `one` on one device, `mirrored2` under MirroredStrategy over the two CPUs,
`mirrored1` under MirroredStrategy over the first CPU alone; `-float16` after a name forces mixed_float16 (the GPU
policy, with loss scaling) on the CPU. The tests compare the runs' weights and metrics.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402

runtime.configure()  # Before TensorFlow is imported: the settings users run with (runtime.py).
tf = runtime.import_tensorflow()

import numpy as np  # noqa: E402

import dreamer  # noqa: E402
import tools  # noqa: E402
import wrappers  # noqa: E402

STEPS = 3


STRATEGIES = dict(  # By the flags a user gives, except mirrored1: this process has two CPUs, and `--distribute
    # mirrored` on a machine with one takes the same branch of make_strategy as mirrored2.
    one=dreamer.make_strategy,
    mirrored2=lambda config: dreamer.make_strategy(
        dreamer.parse_args(['--logdir', str(config.logdir), '--distribute', 'mirrored', '--cpu_devices', '2'])),
    mirrored1=lambda config: tf.distribute.MirroredStrategy(['/cpu:0']))


def main(outs, init, episodes, argv):
  """Environment: NAN_STEP=i puts NaN images in the second half of batch i, which belongs to the second replica
  when there are two."""
  runs = [out.split('=', 1) if '=' in out else (None, out) for out in outs.split(',')]
  config = dreamer.parse_args(['--logdir', str(pathlib.Path(runs[0][1]).parent)] + argv)
  dreamer.setup(config if runs[0][0] is None else
                dreamer.parse_args(['--logdir', str(config.logdir), '--cpu_devices', '2'] + argv))
  for name, out in runs:
    if name is None:
      strategy, policy = dreamer.make_strategy(config), dreamer.resolve_precision(config)
    else:
      kind, _, precision = name.partition('-')
      strategy = STRATEGIES[kind](config)
      policy = 'mixed_float16' if precision == 'float16' else dreamer.resolve_precision(config)
    run(name or out, out, pathlib.Path(init), episodes, config, strategy, policy)


def run(name, out, init, episodes, config, strategy, policy):
  agent = dreamer.Dreamer(config, wrappers.spaces.Box(-1, 1, (6,)), strategy=strategy, precision=policy)
  if init.exists():
    agent.load(init)
  else:
    agent.save(init, 0)
  # The same global batches for every run: the first windows of the episodes, in order.
  batches = []
  stream = tools.load_episodes(pathlib.Path(episodes), 1, config.batch_length, seed=0)
  nan_step = os.environ.get('NAN_STEP')
  for _ in range(STEPS):
    rows = [next(stream) for _ in range(config.batch_size)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if nan_step:  # Every batch's images as raw float32 (0-255): one trace for all of them.
      batch['image'] = batch['image'].astype(np.float32)
    if nan_step == str(len(batches)):
      batch['image'][config.batch_size // 2:] = np.nan
    batches.append({k: tf.constant(v) for k, v in batch.items()})
  replicas = strategy.num_replicas_in_sync
  per = config.batch_size // replicas
  metrics = []
  for index, batch in enumerate(batches):
    part = lambda ctx, batch=batch: {
        k: v[ctx.replica_id_in_sync_group * per:(ctx.replica_id_in_sync_group + 1) * per] for k, v in batch.items()}
    data = strategy.experimental_distribute_values_from_function(part)
    result = agent.train(data, tf.constant([7, index], tf.int64))
    metrics.append({k: float(np.mean(v)) for k, v in result.items()})
  # The loop's input pipeline: per-replica batches of this worker's own stream (one stream per worker).
  images = strategy.experimental_local_results(next(dreamer.make_dataset(episodes, config, strategy))['image'])
  weights = [v.numpy() for _, v in agent.checkpoint_table()]
  names = [n for n, _ in agent.checkpoint_table()]
  np.savez(out, names=np.array(names), replicas=replicas, images=np.stack([np.asarray(i) for i in images]),
           metrics=np.array([[m[k] for k in sorted(m)] for m in metrics]), metric_names=np.array(sorted(metrics[0])),
           **{f'w{i}': w for i, w in enumerate(weights)})
  print(f'{name}: {replicas} replicas: model_loss {[round(m["model_loss"], 4) for m in metrics]}')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
