#!/bin/sh
# tok/s of the regime shape under settings: label threads batch compile steps
# usage: OUT=/tmp/bench sh bench.sh (from the repository root; env_base.sh copied to OUT)
. $OUT/env_base.sh
run() {
  label=$1; th=$2; bt=$3; comp=$4; it=$5
  uptime_before=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s.%N)
  OMP_NUM_THREADS=$th COMPILE=$comp TRAIN_BATCH_TOKENS=$bt MICRO_BATCH_TOKENS=$bt ITERATIONS=$it RUN_ID=$label LOG_DIR=$OUT nice -n 10 python3 train_gpt.py > $OUT/$label.console 2>&1
  end=$(date +%s.%N)
  last=$(grep "^step:$it/$it train_loss" $OUT/$label.txt | tail -1)
  echo "$label threads=$th batch=$bt compile=$comp steps=$it load_before=$uptime_before load_after=$(cut -d' ' -f1 /proc/loadavg) wall=$(echo "$end - $start" | bc) :: $last"
}
run t1_b8k_c0 1 8192 0 32
run t2_b8k_c0 2 8192 0 32      # stopped by hand after step 16 (4.7x slower)
run t1_b16k_c0 1 16384 0 16
# run t2_b16k_c0 2 16384 0 16   (dropped: two threads had already lost 4.7x)
run t1_b8k_c1 1 8192 1 32      # stopped by hand after step 8 (306 s to compile)
run t1_b8k_c0_r2 1 8192 0 32
