#!/usr/bin/env bash
# Stage 3 of docs/LNSR_REGIME.md as a queue: the 60 runs in priority order, one run per train.py
# command, so that a worker never holds more than one run. Start it twice, a minute apart, for
# two one-thread workers: a worker passes over a run whose claim another worker touched in the last
# ten minutes (train.py itself would wait for it), train.py skips a finished run, and a run whose
# worker stopped is picked up from its mid-run checkpoint by the next start. ft and the shared reading come first, seed by seed (each finished seed is a complete
# pair), the independent reading after them (the protocol drops it first if time runs out).
#
#   git worktree add ../regime 8b78d6f        # the protocol's commit
#   bash docs/regime_stage3_queue.sh ../regime $PWD/results/regime/stage3 &
#   bash docs/regime_stage3_queue.sh ../regime $PWD/results/regime/stage3 &
#
# ARMS="independent" bash docs/regime_stage3_queue.sh ... walks only the named arms.
set -u
checkout=$1
results=$2
data_dir=${3:-$(cd "$(dirname "$0")/.." && pwd)/../shared/glue_data}
arms=${ARMS:-ft shared independent}
# glibc's small-block caches off, as for every run since stage 2 (docs/SPEED.md, change 14; the
# protocol's commit predates train.py setting it itself): without it one LNSR run grows past 12 GiB.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0}
cd "$checkout" || exit 2

held_by_a_live_worker() {   # run folder: a claim touched in the last 10 minutes, no results
    [ -d "$1" ] && [ ! -e "$1/results.json" ] && [ -n "$(find "$1" -maxdepth 1 -name 'claim.*.json' -mmin -10)" ]
}

task_folder() {
    case $1 in rte) echo RTE ;; mrpc) echo MRPC ;; cola) echo CoLA ;; sts-b) echo STS-B ;; esac
}

run_one() {   # task seed arm
    local method folder
    folder=$results/$3/$(task_folder "$1")/$([ "$3" = ft ] && echo ft || echo lnsr)/seed$2
    if held_by_a_live_worker "$folder"; then return; fi
    case $3 in
        ft)          method=(--method ft) ;;
        shared)      method=(--method lnsr --lnsr-sigma 1e-4) ;;
        independent) method=(--method lnsr --lnsr-dropout independent --lnsr-reduction mean --lnsr-weights 0.01) ;;
    esac
    python train.py --task "$1" --model minilm-l6 --precision fp32 --eval-train --curves --threads 1 \
        --data-dir "$data_dir" --seeds "$2" --optimizer adamw --lr 5e-5 --epochs 6 \
        "${method[@]}" --output-dir "$results/$3"
}

for pass in "ft shared" "independent"; do
    for seed in 1 2 3 4 5; do
        for task in rte mrpc cola sts-b; do
            for arm in $pass; do
                case " $arms " in *" $arm "*) run_one "$task" "$seed" "$arm" ;; esac
            done
        done
    done
done
