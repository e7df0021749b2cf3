#!/usr/bin/env bash
# Everything issue 6 needs a GPU for, in one call: the CUDA tests, W1's loader alone, then W1 and W2 with the views
# rendered on the device (the default) and, for comparison, in the workers, and W1 with --compile; then a 1-process
# NCCL torchrun smoke test of `dinopre train` and W1 in DDP on every GPU of the machine. Results go to $RESULTS
# (default: $OUT or benchmarks/results), one JSON per run plus the test and smoke logs.
#
#     bash benchmarks/gpu_suite.sh            # from the repository root, on a machine with a CUDA GPU
set -uo pipefail
cd "$(dirname "$0")/.."
results="${RESULTS:-${OUT:-benchmarks/results}}"
mkdir -p "$results"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
python3 -m pytest -q -p no:cacheprovider tests/data/test_batch_augment.py tests/model/test_method.py tests/train/test_engine.py \
    -k "gpu or cuda or compiled or resume" 2>&1 | tee "$results/gpu_tests.log"
workers=$(( $(nproc) - 1 ))
python3 benchmarks/bench.py W1 --data-only --steps 20 --warmup 3 --images 4096 --set num_workers="$workers" \
    --json "$results/W1_data_only.json"
summary='import json,sys; r=json.load(sys.stdin); print(sys.argv[1], round(r["images_per_sec"]), "img/s, wait", round(r["data_wait_share"], 3), "mem", round(r["peak_memory_gib"], 2), "GiB, mfu", r["mfu"] and round(r["mfu"], 3), r["step_breakdown_ms"])'
run() {  # NAME then bench.py arguments
    local name=$1; shift
    python3 benchmarks/bench.py --steps 40 --warmup 10 --breakdown-steps 5 --images 4096 \
        --set num_workers="$workers" --json "$results/$name.json" "$@" | python3 -c "$summary" "$name"
}
run W1_device W1
run W2_device W2
run W1_workers W1 --set augment_on=workers
run W2_workers W2 --set augment_on=workers
run W1_compiled W1 --set compile=true

# Several processes (issue 12): torchrun with NCCL on one GPU must train, checkpoint and export like one process.
smoke="$results/torchrun_smoke"
rm -rf "$smoke"
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m dinopre train face --demo --epochs 2 \
    --output-dir "$smoke" --export-backbone "$smoke/backbone.pt" --quiet > "$results/torchrun_smoke.log" 2>&1
echo "torchrun NCCL smoke: exit $? ($(python3 -c "import json,sys; e=json.load(open(sys.argv[1]))['environment']; \
print('world_size', e['world_size'], 'device', e['device'])" "$smoke/params.json" 2>&1))"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 1 ]; then
    run "W1_ddp_$gpus" W1 --processes "$gpus" --set batch_size=$((128 * gpus)) --set num_workers=$((workers / gpus))
fi
