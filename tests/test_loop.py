"""The training loop's own schedule (loop.py): when videos are written, and what a stop inside the pretraining
round leaves for the restart. On a real tiny agent, real batches from episode files and real event files."""

import hashlib
import json

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf

import dreamer
import loop
import tools
from helpers import tiny_agent


def gifs(logdir):
  """{tag: [(step, frames)]} of the GIF summaries in a logdir's event files."""
  found = {}
  for path in sorted(logdir.glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.HasField('image'):
          frames = iio.imread(value.image.encoded_image_string, index=None, extension='.gif')
          found.setdefault(value.tag, []).append((event.step, len(frames)))
  return found


def test_test_videos_are_bounded_in_frames_and_spaced_by_video_every(tmp_path):
  writer = tf.summary.create_file_writer(str(tmp_path))
  logger = loop.Logger(tmp_path, writer, 1000, video_every=100, video_frames=7)
  counter = loop.Counter(tmp_path / 'episodes', 1)
  rng = np.random.RandomState(0)
  episode = dict(image=rng.randint(0, 255, (21, 64, 64, 3), np.uint8), reward=np.ones(21, np.float32))
  for stored in (0, 50, 100, 150, 260, 270):
    counter.stored = stored
    logger.episode(episode, 'test', counter)
  logger.episode(episode, 'train', counter)  # Training episodes have no video.
  writer.flush()
  assert gifs(tmp_path) == {'sim/test/video/gif': [(0, 7), (100, 7), (260, 7)]}
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines if 'test/return' in line] == [0, 50, 100, 150, 260, 270]


@pytest.fixture
def tiny(tmp_path):
  """Makes a tiny real agent (helpers.tiny_agent) that trains 5 updates first, then 2 every 10 env steps."""
  yield lambda *argv: tiny_agent(tmp_path, '--train_steps', '2', '--pretrain', '5', '--train_every', '10',
                                 '--log_every', '10', *argv)


def act(trainer, calls):
  """`calls` training policy steps of one environment, as tools.simulate makes them."""
  policy, state = trainer.policy(training=True), None
  obs = {'image': np.zeros((1, 64, 64, 3), np.uint8)}
  for index in range(calls):
    _, state = policy(obs, np.array([index == 0]), state)


def test_the_openl_video_follows_video_every_and_the_pretraining_round_comes_first(tiny, tmp_path, capsys):
  agent, dataset, config = tiny('--video_every', '30')
  writer = tf.summary.create_file_writer(str(tmp_path))
  counter = loop.Counter(tmp_path / 'episodes', config.action_repeat)
  start = counter.step
  trainer = loop.Trainer(agent, dataset, config, counter, loop.Logger(tmp_path, writer, config.steps))
  act(trainer, 40)  # 80 env steps: a round every 10 (5 updates first, then 2), a video every 30.
  writer.flush()
  rounds = [int(line.split()[2]) for line in capsys.readouterr().out.splitlines() if line.startswith('Training for')]
  assert rounds == [5] + [2] * 7, rounds
  assert trainer.pretrain_left is None
  openl = gifs(tmp_path)['agent/openl/gif']
  assert [step - start for step, _ in openl] == [0, 30, 60], openl
  assert {frames for _, frames in openl} == {config.batch_length}


def test_a_stop_inside_the_pretraining_round_saves_what_it_owes(tiny, tmp_path):
  agent, dataset, config = tiny()
  counter = loop.Counter(tmp_path / 'episodes', config.action_repeat)
  trainer = loop.Trainer(agent, dataset, config, counter, loop.Logger(tmp_path, None, config.steps))
  trainer.pretrain_left = 3  # As a stop after 2 of the 5 updates leaves it.
  loop.save(config, agent, trainer, counter)
  progress = tmp_path / loop.PRETRAIN_FILE
  own = tmp_path / 'variables.pkl'
  digest = hashlib.sha256(own.read_bytes()).hexdigest()  # The checkpoint the progress belongs to.
  assert json.loads(progress.read_text()) == dict(pretrain=5, done=2, checkpoint=digest)
  assert loop.pretrain_owed(config, own) == 3
  assert loop.pretrain_owed(dreamer.parse_args(['--logdir', str(tmp_path), '--pretrain', '8']), own) == 6
  assert loop.pretrain_owed(dreamer.parse_args(['--logdir', str(tmp_path), '--pretrain', '1']), own) == 0
  other = tmp_path / 'elsewhere' / 'variables.pkl'  # Another run's checkpoint (--checkpoint): pretrained.
  other.parent.mkdir()
  other.write_bytes(own.read_bytes())
  assert loop.pretrain_owed(config, other) == 0
  # A stop between the two writes: the progress names a checkpoint that never reached the disk, so the checkpoint
  # on disk is of an unknown point of the round, and the whole round is made again.
  progress.write_text(json.dumps(dict(pretrain=5, done=4, checkpoint='0' * 64)))
  assert loop.pretrain_owed(config, own) == 5
  progress.write_text(json.dumps(dict(pretrain=5, done=2, checkpoint=digest)))
  restarted = loop.Trainer(agent, dataset, config, counter, loop.Logger(tmp_path, None, config.steps))
  restarted.loaded(loop.pretrain_owed(config, own))
  assert restarted.pretrain_left == 3
  act(restarted, 1)  # The first round trains what the pretraining round owes; the next save drops the file.
  assert restarted.pretrain_left is None
  loop.save(config, agent, restarted, counter)
  assert not progress.exists() and tools.read_checkpoint(own)
  restarted.loaded()  # A checkpoint without the file: pretrained.
  assert restarted.pretrain_left is None
