#!/bin/bash
# Issue 17 learning curves: every variant in its own process with one thread, all started together, so that they share
# the same (fluctuating) load of the shared 2-core box at equal wall minutes; then merged into one table and figure.
# CPU scale (g_ch = d_ch = 8, batch 16; the EMA scaled down to the run: decay 0.99, start at step 100), early
# training: NOT a 9-hour GPU result, and fid_mnv2 is not Kaggle's score.
# usage: tests/bench/results/issue17/run.sh SEED MINUTES OUT
set -u
SEED=${1:-0}; MIN=${2:-40}; OUT=${3:-/tmp/i17runs/seed$SEED}
W="g_ch=8,d_ch=8,batch_size=16,ema_decay=0.99,ema_start=100"
OLD="d_arch=biggan-pytorch,crop_styles=box,crop_filter=lanczos,sample_bn=running"  # the defaults before issue 17
NAMES="before after item1-D item3-crops item3-boxfilter"
declare -A V=(
  [before]="kaggle:$W,$OLD"
  [after]="kaggle:$W"  # the new defaults: 2nd-place D, square crops, box filter, sample_bn batch
  [item1-D]="kaggle:$W,$OLD,d_arch=2nd-place"
  [item3-crops]="kaggle:$W,$OLD,crop_styles=square,crop_filter=box"
  [item3-boxfilter]="kaggle:$W,$OLD,crop_filter=box"
)
mkdir -p "$OUT"
for name in $NAMES; do
  extra=""; case $name in before|after) extra="--sampling-variants bn";; esac  # item 2: the same G, 3 ways
  OMP_NUM_THREADS=1 nice -n 10 python tests/bench/bench_quality.py --threads 1 --seed "$SEED" --minutes "$MIN" \
    --score-every 600 --score-n 500 --final-n 1000 $extra --variant "$name=${V[$name]}" --out "$OUT/$name" \
    > "$OUT/$name.log" 2>&1 &
done
wait
python tests/bench/bench_quality.py --merge $(for n in $NAMES; do echo "$OUT/$n"; done) --out "$OUT/merged" \
  --note "5 variants at once, 1 thread each, on a shared loaded 2-core box; seed $SEED"
