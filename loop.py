"""The training loop: when to train, evaluate and checkpoint, and what is logged. The agent (dreamer.Dreamer)
computes (policy, train step returning metrics, checkpoint table); everything that schedules, counts steps,
logs or writes files about the run's progress lives here.

The schedule is the reference's: prefill with random actions up to --prefill env steps; build the agent with one
train step on a real batch; then, until --steps: one test episode, --eval_every env steps of collection (training
--train_steps updates every --train_every env steps, --pretrain the first time, scalars every --log_every), save
variables.pkl.
"""

import hashlib
import json
import pathlib
import sys
import time

import tensorflow as tf
import tqdm

import seeds
import tools
import wrappers


class NonFiniteError(RuntimeError):
  """Every train step of a round was non-finite."""


class Counter:
  """The run's one step count (the reference's count_steps). Read from the episode files once (their names give
  their lengths), then kept up to date by the loop: `stored` env steps in the episodes on disk and `episodes`
  their number (advanced when an episode is saved), `step` the env steps the agent has taken (advanced per
  training policy step, as the reference's agent step; schedules, scalar logs and the checkpoint's `_step` use
  it)."""

  def __init__(self, datadir, action_repeat):
    self.action_repeat = action_repeat
    self.episodes, transitions = tools.count_episodes(datadir)
    self.stored = transitions * action_repeat
    self.step = self.stored

  def add_episode(self, episode):
    self.episodes += 1
    self.stored += (len(episode['reward']) - 1) * self.action_repeat

  def add_steps(self, agent_steps):
    self.step += agent_steps * self.action_repeat


class Logger:
  """Writes metrics.jsonl, TensorBoard summaries and the console lines of a run."""

  def __init__(self, logdir, writer, total_steps, video_every=1, video_frames=None):
    self._logdir = logdir
    self._writer = writer
    self._total = total_steps
    # Test videos at most every `video_every` env steps, of at most `video_frames` frames: a GIF of a whole Atari
    # game (up to 27,000 frames) at every evaluation grew event files by gigabytes.
    self._should_video = tools.Every(video_every)
    self._video_frames = video_frames
    self._returns = {}  # The latest train and test return, for the progress line.
    self._last = None  # (step, time) of the last scalar log, for fps.

  def write(self, step, metrics):
    """metrics: [(name, value)] -> one metrics.jsonl line {"step": step, ...}."""
    with (self._logdir / 'metrics.jsonl').open('a') as f:
      f.write(json.dumps(dict([('step', step)] + list(metrics))) + '\n')

  def scalars(self, step, metrics, scope):
    if self._writer is not None:
      with self._writer.as_default():
        for name, value in metrics:
          tf.summary.scalar(f'{scope}/{name}', value, step)

  def video(self, name, video, step):
    if self._writer is not None:
      with self._writer.as_default():
        tools.video_summary(name, video, step)

  def episode(self, episode, prefix, counter):
    """A finished train or test episode: console line, metrics.jsonl, `sim/*` scalars, the test video."""
    ret = tools.episode_return(episode)
    transitions = len(episode['reward']) - 1
    print(f'{prefix.title()} episode of length {transitions * counter.action_repeat} with return {ret:.1f}.')
    metrics = [(f'{prefix}/return', ret), (f'{prefix}/length', transitions), ('episodes', counter.episodes)]
    self._returns[f'{prefix}/return'] = ret
    self.write(counter.stored, metrics)
    self.scalars(counter.stored, metrics, 'sim')
    if prefix == 'test' and self._should_video(counter.stored):
      self.video(f'sim/{prefix}/video', episode['image'][None, :self._video_frames], counter.stored)

  def train_metrics(self, step, metrics):
    """The agent's scalars since the last log, with fps; console lines with the progress of the run."""
    metrics = list(metrics)
    now = time.time()
    fps = None
    if self._last is not None:
      fps = (step - self._last[0]) / (now - self._last[1])
      metrics.append(('fps', fps))
    self._last = (step, now)
    self.write(step, metrics)
    self.scalars(step, metrics, 'agent')
    self.flush()
    print(f'[{step}]', ' / '.join(f'{k} {v:.1f}' for k, v in metrics))
    parts = [f'step {step}/{self._total}']
    if fps:
      parts.append(f'{fps:.1f} steps/s')
    parts += [f'{k} {v:.1f}' for k, v in sorted(self._returns.items(), reverse=True)]
    if fps:
      parts.append(f'time left {max(0, self._total - step) / fps / 3600:.1f} h')
    print('Progress:', ' | '.join(parts), flush=True)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()


def progress_bar(total, description, unit):
  """A progress bar with rate and time left on stderr (tqdm), for work that takes minutes."""
  return tqdm.tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, mininterval=1.0, leave=False,
                   file=sys.stderr)


class Trainer:
  """Trains the agent on its schedule while it acts: `policy(training)` is the function tools.simulate steps the
  environments with. As in the reference, the schedule is also checked during evaluation, so the very first call of
  a run (the first test episode) does the pretraining round."""

  def __init__(self, agent, dataset, config, counter, logger):
    self._agent = agent
    self._dataset = dataset
    self._c = config
    self._counter = counter
    self._logger = logger
    # Updates the pretraining round (the first round of the run) still owes; None once it is done.
    self.pretrain_left = config.pretrain
    self._should_train = tools.Every(config.train_every)
    self._should_log = tools.Every(config.log_every)
    self._should_video = tools.Every(config.video_every)
    # The open-loop video shows the decoder's predictions: variants without a decoder have none.
    self._openl = config.log_images and config.batch_length > 5 and agent.has_decoder
    if config.log_images and not agent.has_decoder:
      print(f'Note: --representation {config.representation} trains no image decoder, so no agent/openl video '
            'is written.')
    self._updates = seeds.first_update(counter.step)
    self._acts = seeds.first_act(counter.step)  # The next policy call's index (its draws: seeds.act).
    self._nonfinite = 0  # Train steps skipped for non-finite gradients since the last log.

  def build(self):
    """The reference's build step: one real update on a real batch (it also creates every variable)."""
    self._train_step(next(self._dataset))

  def loaded(self, pretrain_left=None):
    """A loaded agent skips the pretraining round, or trains the `pretrain_left` updates it still owes (a run
    stopped inside that round, see PRETRAIN_FILE)."""
    self.pretrain_left = pretrain_left or None

  def policy(self, training):
    def act(obs, reset, state):
      step = self._counter.step
      if self._should_train(step):
        self._train_round(step)
      action, state = self._agent.policy(obs, reset, state, training, step, self._acts)
      self._acts += 1
      if training:
        self._counter.add_steps(len(reset))
      return action, state
    return act

  def _train_step(self, data):
    self._updates += 1
    return self._agent.train(data, seeds.train_step(self._c.seed, self._updates))

  def _train_round(self, step):
    log = self._should_log(step)
    video = self._openl and self._should_video(step)
    pretraining = self.pretrain_left is not None
    n = self.pretrain_left if pretraining else self._c.train_steps
    print(f'Training for {n} steps.')
    skipped = 0.0
    with progress_bar(n, f'Training at step {step}', 'update') as bar:
      for index in range(n):
        data = next(self._dataset)
        if video and index == 0:
          self._logger.video('agent/openl', self._agent.openl(data), step)
        skipped += self._train_step(data)['nonfinite']  # Tensors: read once per round, below.
        if pretraining:
          self.pretrain_left -= 1  # What a stop now would still owe.
        bar.update()
    if pretraining:
      self.pretrain_left = None
    skipped = int(skipped)
    self._nonfinite += skipped
    if n and skipped == n:
      raise NonFiniteError(
          f'All {n} train steps of this round at step {step} had non-finite losses or gradients and were '
          'skipped; the run stops. The last checkpoint is untouched. Try a lower learning rate, --precision 32 '
          'or --grad_clip.')
    if log:
      metrics = list(self._agent.pop_metrics().items()) + [('nonfinite_steps', self._nonfinite)]
      self._nonfinite = 0
      self._logger.train_metrics(step, metrics)


def random_policy(actspace):
  """Uniform random actions, for the prefill."""
  return lambda obs, reset, state: ([actspace.sample() for _ in reset], None)


def train(config, datadir, agent, dataset, train_envs, test_envs, actspace, writer, checkpoint=None):
  """Prefill, build, resume and the evaluate / collect / save rounds until --steps env steps are stored. `agent`
  and `dataset` make the agent and its batches once the prefill is done; `checkpoint` is the variables.pkl to load
  (dreamer.resolve_checkpoint), None for a new agent."""
  counter = Counter(datadir, config.action_repeat)
  logger = Logger(config.logdir, writer, config.steps, config.video_every, config.video_frames)

  def on_train(episode):
    episode = tools.stored(episode, config.precision)
    tools.save_episodes(datadir, [episode])
    counter.add_episode(episode)
    logger.episode(episode, 'train', counter)
  prefill(config, train_envs, actspace, counter, on_train)
  logger.flush()
  counter.step = counter.stored  # The agent starts from the steps stored (as the reference's count_steps).

  print(f'Simulating agent for {config.steps - counter.stored} steps.')
  agent, dataset = agent(), dataset()
  trainer = Trainer(agent, dataset, config, counter, logger)
  trainer.build()
  if checkpoint:
    print(f'Load checkpoint {checkpoint}.')
    agent.load(checkpoint)  # The step counter stays the one of the episodes on disk.
    trainer.loaded(pretrain_owed(config, checkpoint))
  on_test = lambda episode: logger.episode(tools.stored(episode, config.precision), 'test', counter)
  state = None
  try:
    while counter.stored < config.steps:
      print('Start evaluation.')
      tools.simulate(trainer.policy(training=False), test_envs, episodes=1, on_episode=on_test)
      logger.flush()
      print('Start collection.')
      steps = config.eval_every // config.action_repeat
      state = tools.simulate(trainer.policy(training=True), train_envs, steps, state=state, on_episode=on_train)
      save(config, agent, trainer, counter)
  except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was learned.
    save(config, agent, trainer, counter)
    print(f'Interrupted; saved {config.logdir / "variables.pkl"}.', file=sys.stderr)
    raise
  except wrappers.WorkerError:  # An environment died; the agent is whole: keep what it learned since the last save.
    save(config, agent, trainer, counter)
    print(f'Saved {config.logdir / "variables.pkl"}; the same command resumes the run.', file=sys.stderr)
    raise


def prefill(config, envs, actspace, counter, on_episode):
  """Random actions until the episodes on disk hold --prefill env steps (a resumed run only tops up)."""
  steps = max(0, config.prefill - counter.stored)
  print(f'Prefill dataset with {steps} steps.')
  with progress_bar(steps, 'Prefill', 'env step') as bar:
    def on_prefill(episode):
      on_episode(episode)
      bar.update((len(episode['reward']) - 1) * config.action_repeat)
    tools.simulate(random_policy(actspace), envs, steps / config.action_repeat, on_episode=on_prefill)


# The pretraining round's progress, beside a variables.pkl saved inside that round (a stop), with the SHA-256 of
# the checkpoint it belongs to. variables.pkl keeps the reference's format, which has no place for it; without this
# file a loaded checkpoint counts as pretrained.
PRETRAIN_FILE = 'pretrain.json'


def save(config, agent, trainer, counter):
  """Writes variables.pkl, and PRETRAIN_FILE while the pretraining round is unfinished: first the progress with the
  digest of the checkpoint about to be written, so that no checkpoint from inside the round is ever on disk without
  it; once the round is done, the file goes after the checkpoint. A stop between the two writes leaves a progress
  file that names another checkpoint, and the restart pretrains the whole round again (pretrain_owed)."""
  progress = config.logdir / PRETRAIN_FILE
  data = agent.checkpoint_bytes(counter.step)
  if trainer.pretrain_left is not None:
    done = max(0, config.pretrain - trainer.pretrain_left)
    tools.write_json(progress, dict(pretrain=config.pretrain, done=done, checkpoint=hashlib.sha256(data).hexdigest()))
    print(f'The pretraining round stopped after {done} of its {config.pretrain} updates; the same command '
          f'resumes it.', file=sys.stderr)
  tools.write_atomic(config.logdir / 'variables.pkl', data)
  if trainer.pretrain_left is None and progress.exists():
    progress.unlink()


def pretrain_owed(config, checkpoint):
  """The updates a loaded checkpoint still owes its pretraining round: the rest of --pretrain when it is the
  logdir's own, saved inside that round; all of it when the progress file names another checkpoint (a stop
  between writing the two); else none."""
  progress = config.logdir / PRETRAIN_FILE
  if not progress.exists() or pathlib.Path(checkpoint).resolve() != (config.logdir / 'variables.pkl').resolve():
    return 0
  info = json.loads(progress.read_text())
  if info.get('checkpoint') != hashlib.sha256(pathlib.Path(checkpoint).read_bytes()).hexdigest():
    print(f'{progress} belongs to another checkpoint (a stop between writing the two): the pretraining round of '
          f'{config.pretrain} updates is made again.')
    return config.pretrain
  owed = max(0, config.pretrain - info['done'])
  print(f'The pretraining round was stopped after {info["done"]} updates; {owed} of --pretrain {config.pretrain} '
        'left.')
  return owed
