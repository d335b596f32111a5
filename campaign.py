"""Campaigns: training runs of tasks x methods x seeds to a step budget, resumable, at the lowest CPU priority.

  python campaign.py --outdir ~/campaigns/reproduction --tasks dmc_walker_walk dmc_cheetah_run \
      --methods dreamer_cpu --seeds 0 1 --steps 1e5 --copy docs/reproduction/runs

Each run is `python dreamer.py --logdir OUTDIR/<task>/<method>/<seed> --task <task> --seed <seed> --steps <steps>`
with the method's flags (METHODS, or `NAME="--flag value ..."` on the command line) and `--flags`, one after
another. Started again, the same command resumes the unfinished run from its logdir (dreamer.py resumes from the
episodes and checkpoint on disk) and skips the finished ones. A finished run is evaluated once
(`--eval_only True --eval_episodes N`, eval.json). Its small files (config.json, metrics.jsonl, eval.json and
run.json: wall seconds, steps, the machine and the code's commit of every stretch it ran) are copied to `--copy
<dir>/<task>/<method>/<seed>/` every few minutes, to be committed, so that the evidence outlives the machine; the
replay stays in OUTDIR. A run whose logdir is gone while its copy exists starts again from nothing, and run.json
records that (`restarts`). `--outdir OUTDIR --pause` / `--resume` stop and continue the campaign running there
and its run (logged in OUTDIR/pauses.log; each stretch's `paused_seconds` counts them). No TensorFlow in this
process.
"""

import argparse
import datetime
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent

# A method is a named set of flags. dreamer is the paper's configuration (all defaults); the rest are the `cpu`
# preset and the paper's ablations (README, "Ablations").
METHODS = dict(
    dreamer=[],
    dreamer_cpu=['--preset', 'cpu'],
    dreamer_nstep=['--value_estimate', 'nstep'],
    no_value=['--value_estimate', 'reward'],
    planet=['--behavior', 'cem'],
    contrastive=['--representation', 'contrastive'],
    reward_only=['--representation', 'reward'],
)
SMALL_FILES = ('config.json', 'metrics.jsonl', 'eval.json', 'run.json')
COPY_EVERY = 60  # Seconds between copies of a running run's small files: a machine stopped under a run loses at
# most this much of its record in run.json (its seconds and steps; the run itself resumes from its checkpoint).
PIDS = 'campaign.pid'  # In --outdir while a campaign runs: its process id and its current run's (JSON).
PAUSES = 'pauses.log'  # In --outdir: a line '<time> STOP' per --pause and '<time> CONT' per --resume.


class CampaignError(Exception):
  """A bad argument: the message names it."""


def parse_methods(specs):
  """['dreamer_cpu', 'tiny=--preset debug'] -> {name: flags}."""
  methods = {}
  for spec in specs:
    name, sep, flags = spec.partition('=')
    if sep:
      methods[name] = shlex.split(flags)
    elif spec in METHODS:
      methods[spec] = METHODS[spec]
    else:
      raise CampaignError(f"--methods {spec}: not a known method ({', '.join(METHODS)}); define one as "
                          f'NAME="--flag value ..."')
    if not name or '/' in name:
      raise CampaignError(f'--methods {spec}: a method name must be a non-empty folder name.')
  return methods


def read_json(path, default=None):
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return default


def write_json(path, data):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + '.tmp')
  temporary.write_text(json.dumps(data, indent=1) + '\n')
  os.replace(temporary, path)


def last_step(logdir):
  """The largest `step` in a run's metrics.jsonl (0 without one)."""
  step = 0
  try:
    lines = (pathlib.Path(logdir) / 'metrics.jsonl').read_text().splitlines()
  except OSError:
    return 0
  for line in lines:
    try:
      step = max(step, int(json.loads(line).get('step', 0)))
    except ValueError:
      pass  # A line cut by a kill.
  return step


def machine_lines(log_text):
  """The CPU and precision lines dreamer.py printed at its last start, e.g. ('AMD EPYC (AVX2, ...)', 'float32')."""
  cpu = precision = None
  for line in log_text.splitlines():
    if line.startswith('CPU: '):
      cpu = line[len('CPU: '):].rstrip('.')
    elif line.startswith('Precision: '):
      precision = line.rsplit(' runs as ', 1)[-1].split(' on ')[0]
  return cpu, precision


def paused_seconds(log_text, begin, end):
  """Seconds of [begin, end] (datetimes) that fall inside the pauses of a PAUSES log (a pause still open lasts
  to `end`); lines that do not parse are skipped."""
  overlap = lambda a, b: max(0.0, (min(b, end) - max(a, begin)).total_seconds())
  total, stopped = 0.0, None
  for line in log_text.splitlines():
    parts = line.split()
    try:
      time_, what = datetime.datetime.fromisoformat(parts[0]), parts[1]
    except (IndexError, ValueError):
      continue
    if what == 'STOP' and stopped is None:
      stopped = time_
    elif what == 'CONT' and stopped is not None:
      total += overlap(stopped, time_)
      stopped = None
  return total + (overlap(stopped, end) if stopped is not None else 0.0)


def running(pid, script):
  """Whether process `pid` is alive and runs `script` (by its command line in /proc)."""
  try:
    return script in pathlib.Path(f'/proc/{int(pid)}/cmdline').read_bytes().decode(errors='replace')
  except (TypeError, ValueError, OSError):
    return False


def pause(outdir, stop):
  """--pause / --resume: SIGSTOP or SIGCONT the campaign running in `outdir` and its run (the run's process
  group: dreamer.py and its environment workers), and log it in PAUSES so that run.json counts the pause."""
  pids = read_json(outdir / PIDS) or {}
  sig = signal.SIGSTOP if stop else signal.SIGCONT
  # A stale file's process id may belong to another program by now: only signal what runs our scripts.
  if not running(pids.get('campaign'), 'campaign.py'):
    raise CampaignError(f'no campaign is running in --outdir {outdir} (its {PIDS} names no live campaign.py).')
  os.kill(pids['campaign'], sig)
  if running(pids.get('run'), 'dreamer.py'):
    try:
      os.killpg(pids['run'], sig)
    except ProcessLookupError:
      pass  # The run ended in between; the campaign starts the next one when it continues.
  with (outdir / PAUSES).open('a') as log:
    log.write(f"{now()} {'STOP' if stop else 'CONT'}\n")
  print(f"{'Paused' if stop else 'Resumed'} the campaign in {outdir}.")


def lowest_priority():
  """In the child, a session of its own (so that a Ctrl-C at the terminal reaches the campaign alone, which stops
  the run once): nice 19, and the same for the session's autogroup, through which Linux shares the CPU between
  sessions first (nice alone does not lower a run in a session of its own)."""
  os.setsid()
  os.nice(19)
  try:
    pathlib.Path('/proc/self/autogroup').write_text('19')
  except OSError:
    pass


class Run:

  def __init__(self, args, task, method, flags, seed, value=None):
    """`value`: this run's value of the --sweep flag (its folder is then `<flag><value>_s<seed>`)."""
    folder = str(seed) if value is None else f'{args.sweep[0]}{value}_s{seed}'
    swept = [] if value is None else [f'--{args.sweep[0]}', value]
    self.name = f'{task}/{method}/{folder}'
    self.logdir = args.outdir / task / method / folder
    self.copy = args.copy / task / method / folder if args.copy else None
    self.argv = [sys.executable, str(ROOT / 'dreamer.py'), '--logdir', str(self.logdir), '--task', task,
                 '--seed', str(seed), '--steps', str(args.steps), *flags, *args.flags, *swept]
    self.info_path = self.logdir / 'run.json'
    self.outdir = args.outdir

  def started(self, process):
    """Names the run's process in PIDS, for --pause."""
    write_json(self.outdir / PIDS, dict(campaign=os.getpid(), run=process.pid))

  def info(self):
    """run.json: the logdir's, else the copy's (the logdir was lost), else new."""
    info = read_json(self.info_path) or (read_json(self.copy / 'run.json') if self.copy else None)
    return info or dict(command=self.argv[1:], stretches=[], restarts=[], seconds=0.0)

  def save(self, info):
    write_json(self.info_path, info)
    self.copy_small_files()

  def copy_small_files(self):
    if not self.copy:
      return
    self.copy.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
      if (self.logdir / name).exists():
        shutil.copyfile(self.logdir / name, self.copy / (name + '.tmp'))
        os.replace(self.copy / (name + '.tmp'), self.copy / name)

  def finished(self):
    """Evaluated: in the logdir, or in the copy (the evidence is kept; a lost replay is not trained again)."""
    return (self.logdir / 'eval.json').exists() or bool(self.copy and (self.copy / 'eval.json').exists())

  def train(self, limit=None):
    """Trains until --steps (or `limit` wall seconds in all, then SIGTERM: dreamer.py saves and stops). Returns
    the exit code (0 also for a run stopped at its limit)."""
    info = self.info()
    if self.copy and (self.copy / 'run.json').exists() and not self.info_path.exists():
      # The lost run's stretches go with the restart; the seconds and stretches are the new run's.
      info['restarts'].append(dict(time=now(), reason='the logdir was lost; the run starts again from nothing',
                                   steps_before=last_step(self.copy), seconds_before=info['seconds'],
                                   stretches_before=info['stretches']))
      info.update(seconds=0.0, stretches=[])
      info.pop('evaluated', None), info.pop('eval_exit_code', None)
      for name in ('eval.json', 'metrics.jsonl'):  # The copy follows the new run from now on.
        (self.copy / name).unlink(missing_ok=True)
      print(f'{self.name}: its logdir {self.logdir} is gone; the run starts again from nothing.', flush=True)
    self.logdir.mkdir(parents=True, exist_ok=True)
    stretch = dict(start=now(), steps_from=last_step(self.logdir), code=code_version())
    info['stretches'].append(stretch)
    self.save(info)
    left = None if limit is None else limit - info['seconds']
    if left is not None and left <= 0:
      return 0
    begin = time.time()
    with (self.logdir / 'train.log').open('a') as log:
      offset = log.tell()
      process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lowest_priority)
      self.started(process)
      try:
        while True:
          remaining = None if left is None else max(0.0, left - (time.time() - begin))
          try:
            code = process.wait(timeout=COPY_EVERY if remaining is None else min(COPY_EVERY, remaining))
            break
          except subprocess.TimeoutExpired:
            self.update(info, stretch, begin, offset)
            if left is not None and time.time() - begin >= left:
              process.send_signal(signal.SIGTERM)  # Saves the checkpoint; exits with 130.
              code = process.wait()
              code = 0 if code == 130 else code
              stretch['stopped'] = f'at the wall-time limit of {limit} s'
              break
      except BaseException:  # Stopped itself (Ctrl-C, SIGTERM): stop the run as a user would, then record.
        process.send_signal(signal.SIGTERM)
        process.wait()
        self.update(info, stretch, begin, offset, code=process.returncode)
        raise
    self.update(info, stretch, begin, offset, code=code)
    return code

  def update(self, info, stretch, begin, offset, code=None):
    """Records the running stretch (its seconds, steps and machine) in run.json and copies the small files."""
    with (self.logdir / 'train.log').open() as f:
      f.seek(offset)
      cpu, precision = machine_lines(f.read())
    seconds = time.time() - begin
    info['seconds'] = info['seconds'] - stretch.get('seconds', 0.0) + seconds
    try:
      pauses = (self.outdir / PAUSES).read_text()
    except OSError:
      pauses = ''
    paused = paused_seconds(pauses, datetime.datetime.fromisoformat(stretch['start']), datetime.datetime.now())
    stretch.update(seconds=round(seconds, 1), paused_seconds=round(paused, 1), steps_to=last_step(self.logdir),
                   device=cpu, precision=precision)
    if code is not None:
      stretch.update(end=now(), exit_code=code)
    info['seconds'] = round(info['seconds'], 1)
    self.save(info)

  def evaluate(self, episodes):
    argv = self.argv + ['--eval_only', 'True', '--eval_episodes', str(episodes)]
    with (self.logdir / 'eval.log').open('w') as log:
      process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lowest_priority)
      self.started(process)
      try:
        code = process.wait()
      except BaseException:
        process.send_signal(signal.SIGTERM)
        process.wait()
        raise
    info = self.info()
    info.update(evaluated=now(), eval_exit_code=code)
    self.save(info)
    return code


def code_version():
  """The commit of the code the runs use (`git rev-parse --short HEAD`, with `-dirty` when a tracked Python file
  differs from it; the runs' copied files and the docs do not count), or None outside a git checkout: a stretch's
  results belong to the code it ran. No optional locks: a commit beside it must not find the index locked."""
  git = ['git', '--no-optional-locks', '-C', str(pathlib.Path(__file__).parent)]
  try:
    head = subprocess.run(git + ['rev-parse', '--short', 'HEAD'], capture_output=True, text=True, timeout=30)
    status = subprocess.run(git + ['status', '--porcelain', '--untracked-files=no', '--', '*.py'],
                            capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if head.returncode != 0:
    return None
  return head.stdout.strip() + ('-dirty' if status.stdout.strip() else '')


def now():
  return datetime.datetime.now().isoformat(timespec='seconds')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--outdir', type=pathlib.Path, required=True, help='the runs (replays, checkpoints)')
  parser.add_argument('--tasks', nargs='+')
  parser.add_argument('--methods', nargs='+', help=f'of {", ".join(METHODS)}, or NAME="FLAGS"')
  parser.add_argument('--seeds', nargs='+', type=int, default=[0])
  parser.add_argument('--steps', default='1e5', help='environment steps of every run')
  parser.add_argument('--flags', default='', help='flags added to every run, e.g. "--eval_every 5e3"')
  parser.add_argument('--eval_episodes', type=int, default=10)
  parser.add_argument('--copy', type=pathlib.Path, help='where the small files of each run go (to commit)')
  parser.add_argument('--limit', action='append', default=[], metavar='METHOD=SECONDS',
                      help='stop the runs of METHOD after SECONDS of wall time in all; SECONDS "auto": the '
                      'longest wall time of the other methods\' runs of the same task and seed')
  parser.add_argument('--sweep', nargs='+', metavar='FLAG VALUE', help='run every method once per value of a '
                      'flag, in folders <flag><value>_s<seed> (e.g. --sweep horizon 5 10 20)')
  parser.add_argument('--dry_run', action='store_true', help='only list the runs and their state')
  parser.add_argument('--pause', action='store_true', help='only pause the campaign running in --outdir (SIGSTOP, '
                      'e.g. to measure speed beside it); run.json counts the pause')
  parser.add_argument('--resume', action='store_true', help='only continue the campaign paused in --outdir')
  args = parser.parse_args(argv)
  args.outdir = args.outdir.expanduser()
  if args.pause or args.resume:
    if args.pause and args.resume:
      raise CampaignError('--pause and --resume: give one of them.')
    return args
  if not args.tasks or not args.methods:
    raise CampaignError('--tasks and --methods are required (unless --pause or --resume).')
  args.copy = args.copy.expanduser() if args.copy else None
  args.flags = shlex.split(args.flags)
  try:
    float(args.steps)
  except ValueError:
    raise CampaignError(f'--steps {args.steps}: expected a number of environment steps, e.g. 1e5.') from None
  args.methods = parse_methods(args.methods)
  if args.sweep is not None and len(args.sweep) < 2:
    raise CampaignError('--sweep takes a flag name and at least one value, e.g. --sweep horizon 5 10 20.')
  limits = {}
  for spec in args.limit:
    method, _, seconds = spec.partition('=')
    if method not in args.methods or not (seconds == 'auto' or seconds.replace('.', '', 1).isdigit()):
      raise CampaignError(f'--limit {spec}: expected METHOD=SECONDS or METHOD=auto for one of --methods.')
    limits[method] = seconds
  args.limit = limits
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.pause or args.resume:
    return pause(args.outdir, stop=args.pause) or 0
  if not args.dry_run:
    args.outdir.mkdir(parents=True, exist_ok=True)
    write_json(args.outdir / PIDS, dict(campaign=os.getpid()))
  try:
    return campaign(args)
  finally:
    if not args.dry_run:
      (args.outdir / PIDS).unlink(missing_ok=True)


def campaign(args):
  values = args.sweep[1:] if args.sweep else [None]
  runs = [(Run(args, task, method, flags, seed, value), task, method, seed) for task in args.tasks
          for seed in args.seeds for value in values for method, flags in args.methods.items()]
  # Limited methods run last, so that `auto` can read the others' wall time.
  runs.sort(key=lambda r: r[2] in args.limit)
  for run, task, method, seed in runs:
    state = 'finished' if run.finished() else f'at step {last_step(run.logdir)}'
    if args.dry_run or run.finished():
      print(f'{run.name}: {state}.', flush=True)
      if run.finished():
        run.copy_small_files()
      continue
    limit = args.limit.get(method)
    if limit == 'auto':  # The finished runs of the other methods at the same task, seed and sweep value.
      others = [r.info()['seconds'] for r, t, m, s in runs if (t, s) == (task, seed) and m not in args.limit
                and r.logdir.name == run.logdir.name and r.finished()]
      if not others:
        print(f'{run.name}: waits for a finished run of another method to take its wall time (--limit '
              f'{method}=auto).', flush=True)
        continue
      limit = max(others)
    elif limit is not None:
      limit = float(limit)
    print(f'{run.name}: training ({state}) in {run.logdir}.', flush=True)
    code = run.train(limit)
    if code != 0:
      print(f'{run.name}: dreamer.py exited with {code}; see {run.logdir / "train.log"}. Going on with the next '
            'run.', flush=True)
      continue
    print(f'{run.name}: evaluating ({args.eval_episodes} episodes).', flush=True)
    code = run.evaluate(args.eval_episodes)
    if code != 0:
      print(f'{run.name}: the evaluation exited with {code}; see {run.logdir / "eval.log"}.', flush=True)
  return 0


if __name__ == '__main__':
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(130))  # Stops the running run as Ctrl-C does.
  try:
    sys.exit(main())
  except CampaignError as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    sys.exit(130)
