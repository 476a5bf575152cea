#!/usr/bin/env bash
# Stage 3 of docs/LNSR_REGIME.md as a queue: its 60 runs in priority order, seed by seed across
# the arms (ft and the shared reading first, so that each finished seed is a complete pair; the
# independent reading after them, which the protocol drops first if time runs out), one run per
# train.py command. Two workers walk the same list: a worker passes over a run that another live
# worker holds (train.py itself would wait for it) and comes back to it at the end of the list,
# where train.py skips it if finished, waits for it if held, and takes it over if its worker died
# (workers.py). A stopped run goes on from its mid-run checkpoint when a worker reaches it again.
#
#   git worktree add ../regime 8b78d6f          # a checkout of the protocol's commit
#   bash docs/regime_stage3_queue.sh ../regime results/regime/stage3 > worker1.log 2>&1 &
#   sleep 60                                    # the first worker's claim is on disk by then
#   bash docs/regime_stage3_queue.sh ../regime results/regime/stage3 > worker2.log 2>&1 &
#
# Arguments: the checkout to train from, the results folder, and the GLUE folder (default:
# ../shared/glue_data beside this repository); relative paths are read from where the command
# is started. ARMS="independent" (any of ft, shared, independent) walks only those arms. Stop a
# worker with `kill -TERM -- -PGID` (its process group): the run in progress saves a checkpoint.
# Two workers that reach one unclaimed run within the same few seconds both start it; the
# second then waits for the first (the minute between the starts keeps them apart).
set -u
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: bash docs/regime_stage3_queue.sh CHECKOUT RESULTS [GLUE_DIR]  (the header explains each)" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
checkout=$(realpath -m "$1")
results=$(realpath -m "$2")
data_dir=$(realpath -m "${3:-$here/../shared/glue_data}")
arms=${ARMS:-ft shared independent}
for arm in $arms; do
    case $arm in ft|shared|independent) ;; *) echo "error: ARMS: unknown arm '$arm' (ft, shared, independent)" >&2; exit 2 ;; esac
done
# glibc's small-block caches off, as for every run since stage 2 (docs/SPEED.md, change 14; the
# protocol's commit predates train.py setting it itself): without it one LNSR run grew past 12 GiB.
export GLIBC_TUNABLES=${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0
cd "$checkout" || exit 2

held_by_a_live_worker() {   # run folder: workers.py's own rule, at train.py's default --claim-timeout
    python -c 'import sys; sys.path.insert(0, sys.argv[1]); import workers
claim = workers.read_claim(sys.argv[2])
sys.exit(0 if claim is not None and not workers.is_stale(claim, 600) else 1)' "$here" "$1"
}

run_folder() {   # task seed arm
    local task
    case $1 in rte) task=RTE ;; mrpc) task=MRPC ;; cola) task=CoLA ;; sts-b) task=STS-B ;; esac
    echo "$results/$3/$task/$([ "$3" = ft ] && echo ft || echo lnsr)/seed$2"
}

train() {   # task seed arm
    local method
    case $3 in
        ft)          method=(--method ft) ;;
        shared)      method=(--method lnsr --lnsr-sigma 1e-4) ;;
        independent) method=(--method lnsr --lnsr-dropout independent --lnsr-reduction mean --lnsr-weights 0.01) ;;
    esac
    python train.py --task "$1" --model minilm-l6 --precision fp32 --eval-train --curves --threads 1 \
        --data-dir "$data_dir" --seeds "$2" --optimizer adamw --lr 5e-5 --epochs 6 \
        "${method[@]}" --output-dir "$results/$3"
}

passed_over=()
for pass in "ft shared" "independent"; do
    for seed in 1 2 3 4 5; do
        for task in rte mrpc cola sts-b; do
            for arm in $pass; do
                case " $arms " in *" $arm "*) ;; *) continue ;; esac
                folder=$(run_folder "$task" "$seed" "$arm")
                if [ -e "$folder/results.json" ]; then continue; fi
                if held_by_a_live_worker "$folder"; then passed_over+=("$task $seed $arm"); continue; fi
                train "$task" "$seed" "$arm"
            done
        done
    done
done
for run in "${passed_over[@]}"; do
    train $run
done
