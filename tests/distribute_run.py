"""Runs a few train steps of a tiny agent on fixed batches and seeds; writes its weights and metrics to an npz.

  python tests/distribute_run.py OUT.npz INIT.pkl EPISODES [dreamer flags]
  python tests/distribute_run.py ONE.npz,MIRRORED.npz INIT.pkl EPISODES [dreamer flags]

With INIT.pkl missing the agent saves its initial weights there first. Run once on one device and again with
`--distribute mirrored --cpu_devices 2` or as each worker of a TF_CONFIG cluster: the weights must agree. Given two
outputs, one process makes both runs, on one device and then with `--distribute mirrored --cpu_devices 2` added
(the process's start, TensorFlow's import, is most of a tiny run's time).
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dreamer  # noqa: E402
import tools  # noqa: E402
import wrappers  # noqa: E402

STEPS = 3


def main(outs, init, episodes, argv):
  """Environment: FLOAT16=1 forces mixed_float16 (the GPU policy, with loss scaling) on the CPU; NAN_STEP=i puts
  NaN images in the second half of batch i, which belongs to the second replica when there are two."""
  outs = outs.split(',')
  argvs = [argv, argv + ['--distribute', 'mirrored', '--cpu_devices', '2']][:len(outs)]
  configs = [dreamer.parse_args(['--logdir', str(pathlib.Path(outs[0]).parent)] + a) for a in argvs]
  dreamer.setup(configs[-1])  # The devices of the last (the mirrored) run; the one-device run uses the first.
  for out, config in zip(outs, configs):
    run(out, pathlib.Path(init), episodes, config)


def run(out, init, episodes, config):
  strategy = dreamer.make_strategy(config)
  keras.mixed_precision.set_global_policy('mixed_float16' if os.environ.get('FLOAT16') else
                                          dreamer.resolve_precision(config))
  agent = dreamer.Dreamer(config, wrappers.spaces.Box(-1, 1, (6,)), strategy=strategy)
  if init.exists():
    agent.load(init)
  else:
    agent.save(init, 0)
  # The same global batches for every run: the first windows of the episodes, in order.
  batches = []
  stream = tools.load_episodes(pathlib.Path(episodes), 1, config.batch_length, seed=0)
  for _ in range(STEPS):
    rows = [next(stream) for _ in range(config.batch_size)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if os.environ.get('NAN_STEP') == str(len(batches)):
      batch['image'] = batch['image'].astype(np.float32)
      batch['image'][config.batch_size // 2:] = np.nan
    batches.append(dreamer.preprocess({k: tf.constant(v) for k, v in batch.items()}, config))
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
  print(f'{replicas} replicas: model_loss {[round(m["model_loss"], 4) for m in metrics]}')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
