# Sourced by scripts/gpu_check.sh and scripts/gpu_multi_check.sh (both set $out and $scale first): the
# environment of a GPU check and run_part, which runs one part under its time budget and records the result.
GRACE=5  # seconds between timeout's TERM and its KILL
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/.whl-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

names=() budgets=() took=() results=()
run_part() {  # run_part NAME BUDGET_S COMMAND...: the command under timeout; its output to the screen and $out/NAME.log
    local name=$1 budget=$(($2 * scale)) start=$SECONDS rc=0 result
    shift 2
    echo "== $name (budget ${budget} s): $*"
    timeout -k "$GRACE" "$budget" "$@" 2>&1 | tee "$out/$name.log" || rc=$?
    local seconds=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        result=pass
    elif { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$seconds" -ge "$budget" ]; then
        result=timeout
    else
        result="fail (exit $rc)"
    fi
    names+=("$name") budgets+=("$budget") took+=("$seconds") results+=("$result")
}
