"""Every random stream of a run and how it derives from --seed, in one place (no TensorFlow here).

- TensorFlow's global generator, numpy and Python: `keras.utils.set_random_seed(seed)` in dreamer.setup (the
  networks' initial weights).
- Acting (the posterior sample, the actor's sample, exploration noise, CEM's candidates): stateless, from
  `act(seed, call, worker)` [2] per policy call, the call index counting on from `first_act(step)` so that a
  resumed run draws new noise. Stateful draws would not do: under XLA (the policy is compiled with it,
  --jit_policy) they ignore TensorFlow's seeds, so every --seed drew the same acting noise (docs/reproduction.md).
- Environments: `env(seed, prefix, index, worker)`, one seed per environment process (train and test apart, the
  workers of a multi-worker run apart).
- The prefill's random actions: the action space seeded with `prefill(seed, worker)`.
- The replay sampler: `dataset(seed, pipeline)` per input pipeline (one per worker under tf.distribute).
- The train step's noise (RSSM samples, imagined actions): stateless, from `train_step(seed, update)` [2], the
  update index counting on from `first_update(step)` so that a resumed run draws new noise; inside the step the
  seed is folded per use (tools.fold), so any number of replicas draws what one device does.
"""

import numpy as np


def env(seed, prefix, index, worker=0):
  """An environment's seed: `prefix` train or test, `index` its number, `worker` the task index of a multi-worker
  run."""
  return 10 ** 6 * worker + seed * 1000 + (0 if prefix == 'train' else 500) + index


def prefill(seed, worker=0):
  return seed + 10 ** 6 * worker


def dataset(seed, pipeline=0):
  return seed + pipeline


def first_update(step):
  """The update index a run starts counting from at env step `step` (0 for a new run)."""
  return step * 1000


def train_step(seed, update):
  """The [2] seed of the train step with this update index."""
  return [seed, update]


def first_act(step):
  """The policy-call index a run starts counting from at env step `step` (0 for a new run); fewer than 1000 calls
  per env step (training calls take at least one env step each, evaluation adds a fraction) keep resumed runs from
  repeating draws."""
  return step * 1000


_ACT = 1  # Tells acting's hashed seeds apart from other streams that may hash their inputs later.


def act(seed, call, worker=0):
  """The [2] int32 seed of the policy call with this index, on this worker of a multi-worker run: a hash of all
  three (numpy's SeedSequence). int32 because XLA reads only the low 32 bits of an int64 seed (call indices pass
  2^32 at 4.3e6 env steps); a hash, so that every bit of the index counts and two calls, or a call and a train
  step (train_step), share a seed only by chance (2^-64). The seeds folded from it for each draw (tools.fold) are
  32-bit hashes, so among millions of calls a few pairs share a draw by chance, as train steps may."""
  state = np.random.SeedSequence([seed % 2 ** 64, _ACT, worker, call]).generate_state(2)  # uint32 [2]
  return state.view(np.int32).tolist()
