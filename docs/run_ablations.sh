#!/bin/sh
# The paper's ablations on one task with the `cpu` preset and one CPU budget per run (see docs/ablations.md).
# Not run by the tests: each run takes hours on a 2-core CPU. Usage:
#   sh docs/run_ablations.sh [task] [steps] [seed]      (defaults: dmc_walker_walk 100000 0)
# Writes runs/ablations/<task>/<method>/<seed>/ and runs/horizons/<task>/<method>/h<H>_s<seed>/, then the figures.
set -e
TASK=${1:-dmc_walker_walk}
STEPS=${2:-100000}
SEED=${3:-0}
COMMON="--task $TASK --preset cpu --steps $STEPS --seed $SEED"

run() {  # run <folder> <flags...>: train, then evaluate the final checkpoint on 10 episodes.
  dir=$1; shift
  python dreamer.py --logdir "$dir" $COMMON "$@"
  python dreamer.py --logdir "$dir" $COMMON "$@" --eval_only True --eval_episodes 10
}

A=runs/ablations/$TASK
run $A/dreamer/$SEED
run $A/dreamer_nstep/$SEED --value_estimate nstep
run $A/no_value/$SEED --value_estimate reward
run $A/planet/$SEED --behavior cem
run $A/contrastive/$SEED --representation contrastive
run $A/reward_only/$SEED --representation reward

# Final return against the imagination horizon (the paper's horizon figure: Dreamer, n-step and no value).
H=runs/horizons/$TASK
for h in 5 10 20 30; do
  run $H/dreamer/h${h}_s$SEED --horizon $h
  run $H/dreamer_nstep/h${h}_s$SEED --horizon $h --value_estimate nstep
  run $H/no_value/h${h}_s$SEED --horizon $h --value_estimate reward
done
for method in dreamer dreamer_nstep no_value; do  # Horizon 15 (the default) is the ablation run above.
  ln -sfn "$PWD/$A/$method/$SEED" "$H/$method/h15_s$SEED"
done

python plotting.py --indir runs/ablations --outdir docs/ablations --tasks "$TASK" --no_paper --bins 1e4
python plotting.py --indir runs/horizons --outdir docs/ablations --tasks "$TASK" --figure horizon --bins 1e4
