"""Speed of this code against an older commit, measured in turns on this machine.

  python benchmark_ab.py --old 52247b5 [--pairs 2] [--outdir DIR] -- --preset cpu

runs `python dreamer.py --benchmark True <flags>` for the old commit (`git archive` into a temporary directory) and
for this working tree, alternating old, new, old, new, ...: a machine's speed drifts within minutes, so only runs
taken in turns compare two versions (docs/speed.md). Prints each run's figures and the medians per side, and writes
DIR/ab.json (default: a temporary directory). Stop anything else that runs on the machine first. A bad --old
exits with 2, a failed benchmark run with 1 (its log named).
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent

# benchmark.json key -> how the figure is read from it.
FIGURES = {
    'train_step_s': lambda d: d['train_step_s']['median'],
    'first_train_step_s': lambda d: d['first_train_step_s'],
    'kernel_floor_s': lambda d: d['kernel_floor_s'],
    'peak_gflops': lambda d: d['peak_gflops'],
    'policy_step_ms': lambda d: d['policy_step_ms']['median'],
    'hours_per_1e6_env_steps': lambda d: d['hours_per_1e6_env_steps'],
    # Programs in the persistent XLA cache when the run started (DREAMER_XLA_CACHE, runtime.py): 0 means its first
    # step compiled every XLA program; entries from an earlier run of the same code and flags are loaded instead.
    'xla_cache_entries': lambda d: d['xla_cache']['entries'],
}


def figures(data):
  """FIGURES of one benchmark.json; None for those an older commit's benchmark did not measure."""
  values = {}
  for name, read in FIGURES.items():
    try:
      values[name] = read(data)
    except (KeyError, TypeError):
      values[name] = None
  return values


def median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def checkout(commit, directory):
  """The tree of `commit` in `directory` (git archive). Raises SystemExit(2) naming the commit if git cannot."""
  archive = subprocess.run(['git', '-C', str(ROOT), 'archive', commit], capture_output=True)
  if archive.returncode != 0:
    print(f'Error: cannot check out --old {commit}: {archive.stderr.decode().strip()} '
          f'(give a commit, tag or branch of {ROOT}).', file=sys.stderr)
    sys.exit(2)
  subprocess.run(['tar', '-x', '-C', str(directory)], input=archive.stdout, check=True)


def run(code, logdir, flags):
  """One benchmark run of the code in directory `code`; returns its benchmark.json."""
  log = pathlib.Path(str(logdir) + '.log')
  with log.open('w') as out:
    exit_code = subprocess.run([sys.executable, 'dreamer.py', '--logdir', str(logdir), '--benchmark', 'True',
                                *flags], cwd=code, stdout=out, stderr=subprocess.STDOUT).returncode
  if exit_code != 0:
    print(f'Error: the benchmark exited with {exit_code}; see {log}.', file=sys.stderr)
    sys.exit(1)
  return json.loads((pathlib.Path(logdir) / 'benchmark.json').read_text())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--old', required=True, help='the commit to compare with (anything git archive takes)')
  parser.add_argument('--pairs', type=int, default=2, help='old/new pairs, run in turns')
  parser.add_argument('--outdir', type=pathlib.Path, default=None, help='where the runs and ab.json go')
  parser.add_argument('flags', nargs='*', help='dreamer.py flags for both, after --')
  args = parser.parse_args(argv)
  if args.pairs < 1:
    parser.error(f'--pairs must be at least 1, got {args.pairs}')
  outdir = args.outdir or pathlib.Path(tempfile.mkdtemp(prefix='benchmark_ab_'))
  outdir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as old_code:
    checkout(args.old, old_code)
    runs = []
    for pair in range(args.pairs):
      for side, code in (('old', old_code), ('new', ROOT)):
        data = run(code, outdir / f'{side}_{pair}', args.flags)
        values = figures(data)
        runs.append(dict(side=side, pair=pair, device=data.get('device'), **values))
        print(f'{side} {pair}: ' + ', '.join(f'{k} {"n/a" if v is None else f"{v:.4g}"}' for k, v in values.items()),
              flush=True)
  medians = {side: {name: median(r[name] for r in runs if r['side'] == side) for name in FIGURES}
             for side in ('old', 'new')}
  result = dict(old=args.old, new='working tree', flags=args.flags, device=data['device'], runs=runs,
                medians=medians, train_step_speedup=medians['old']['train_step_s'] / medians['new']['train_step_s'])
  (outdir / 'ab.json').write_text(json.dumps(result, indent=1) + '\n')
  print(f'Median train step: old {medians["old"]["train_step_s"]:.3f} s, new {medians["new"]["train_step_s"]:.3f} s '
        f'({result["train_step_speedup"]:.2f}x). Wrote {outdir / "ab.json"}.')
  return result


if __name__ == '__main__':
  main()
