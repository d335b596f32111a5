#!/bin/sh
# The paper's ablations on one task, every variant at one size and one step budget (see docs/ablations.md).
# Not run by the tests: each run takes from tens of minutes to hours on a 2-core CPU. Usage:
#   sh docs/run_ablations.sh [task] [steps] [seed]      (defaults: dmc_walker_walk 100000 0)
# Environment (all optional):
#   FLAGS="..."          flags added to every run (default: --preset cpu)
#   EVAL_EPISODES=N      episodes of the final evaluation of each run (default 10)
#   PLANET_SECONDS=S     stop the planet run after S seconds of training (SIGTERM, which saves its checkpoint), so
#                        that it gets the CPU time of the slowest Dreamer run instead of its environment steps;
#                        'auto' takes the longest wall time among the other variants' runs (default: no limit)
#   HORIZONS="5 10 ..."  the horizon sweep's horizons (default "5 10 20 30"; "" skips the sweep)
# Writes runs/ablations/<task>/<method>/<seed>/ and runs/horizons/<task>/<method>/h<H>_s<seed>/, then the figures.
# A run that stops resumes from its logdir when the script is started again; a finished run is skipped.
# Beside other work: `nice` alone does not lower the runs' share of the CPU when they are started in a session of
# their own (setsid, or another terminal): Linux shares the CPU between sessions first (autogroup). Lower the
# session's share too: echo 19 > /proc/<pid of the script>/autogroup
set -e
TASK=${1:-dmc_walker_walk}
STEPS=${2:-100000}
SEED=${3:-0}
FLAGS=${FLAGS:---preset cpu}
EVAL_EPISODES=${EVAL_EPISODES:-10}
HORIZONS=${HORIZONS-5 10 20 30}
COMMON="--task $TASK --steps $STEPS --seed $SEED $FLAGS"

LIMIT=  # When set, run() stops training after this many seconds of wall time in all (only the planet run).

run() {  # run <folder> <flags...>: train, then evaluate the final checkpoint (eval.json); the wall time goes to <folder>/seconds.
  dir=$1; shift
  if [ -f "$dir/eval.json" ]; then return 0; fi
  mkdir -p "$dir"
  spent=$(cat "$dir/seconds" 2>/dev/null || echo 0)
  start=$(date +%s)
  if [ -z "$LIMIT" ]; then
    python dreamer.py --logdir "$dir" $COMMON "$@"
  elif [ $(( LIMIT - spent )) -gt 0 ]; then  # (timeout 0 would mean no limit)
    timeout -s TERM $(( LIMIT - spent )) python dreamer.py --logdir "$dir" $COMMON "$@" || true
  fi
  echo $(( $(date +%s) - start + spent )) > "$dir/seconds.tmp"
  mv "$dir/seconds.tmp" "$dir/seconds"
  python dreamer.py --logdir "$dir" $COMMON "$@" --eval_only True --eval_episodes "$EVAL_EPISODES"
}

A=runs/ablations/$TASK
run $A/dreamer/$SEED
run $A/no_value/$SEED --value_estimate reward
run $A/dreamer_nstep/$SEED --value_estimate nstep
run $A/contrastive/$SEED --representation contrastive
run $A/reward_only/$SEED --representation reward
if [ "$PLANET_SECONDS" = auto ]; then
  PLANET_SECONDS=$(cat $A/*/$SEED/seconds | sort -n | tail -1)
fi
LIMIT=$PLANET_SECONDS
run $A/planet/$SEED --behavior cem
LIMIT=

# Final return against the imagination horizon (the paper's horizon figure: Dreamer, n-step and no value).
H=runs/horizons/$TASK
for h in $HORIZONS; do
  run $H/dreamer/h${h}_s$SEED --horizon $h
  run $H/dreamer_nstep/h${h}_s$SEED --horizon $h --value_estimate nstep
  run $H/no_value/h${h}_s$SEED --horizon $h --value_estimate reward
done
if [ -n "$HORIZONS" ]; then
  for method in dreamer dreamer_nstep no_value; do  # Horizon 15 (the default) is the ablation run above.
    mkdir -p $H/$method
    ln -sfn "$PWD/$A/$method/$SEED" "$H/$method/h15_s$SEED"
  done
fi

python plotting.py --indir runs/ablations --outdir docs/ablations --tasks "$TASK" --no_paper --bins 2500
if [ -n "$HORIZONS" ]; then
  python plotting.py --indir runs/horizons --outdir docs/ablations --tasks "$TASK" --figure horizon --bins 2500
fi
