#!/bin/bash
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
run() { taskset -c $1 timeout 200 python tests/_dev_sweep.py "${@:2}" 2>&1 | grep RESULT; }
run 0,1 a_b256_dyn6_600 b256_enc 1e-3 dyn6 600 &
run 2,3 b_b256_dyn_600 b256_enc 1e-3 dyn 600 &
run 4,5 c_b256_lr2_dyn_600 b256_enc 2e-3 dyn 600 &
run 6,7 d_b64_dyn_600 b64_enc 1e-3 dyn 600 &
run 8,9 e_b256_dyn_600_rand b256_rand 1e-3 dyn 600 &
run 10,11 f_b64_dyn6_600 b64_enc 1e-3 dyn6 600 &
run 12,13 g_b256_dyn6_500 b256_enc 1e-3 dyn6 500 &
run 14,15 h_b64_dyn_600_rand b64_rand 1e-3 dyn 600 &
wait
