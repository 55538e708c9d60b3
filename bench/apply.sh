#!/usr/bin/env bash
# Layer apply benchmark: a base layer update that changes 5 % of an OS-like image of 50,000
# files (~2 GiB at SCALE=1: appends, edits in the middle, new and deleted files), applied
# to a target agent that holds v1. Prints one table: wall time of the v2 apply, bytes the
# target downloaded for it beside the bytes of the chunks v2 changed (the dry run's count
# of chunks the target's snapshot lacks), bytes it took from its own files, bytes it wrote,
# beside the v1 apply onto an empty target.
#
#   bench/apply.sh [WORKDIR]    (default bench/out-apply; SCALE=0.05 for a smoke run)
#
# MORGANA_BENCH_PROFILE=debug uses target/debug binaries without building (smoke runs
# only: debug timings mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${1:-$REPO/bench/out-apply}
SCALE=${SCALE:-1}
CHANGE=${CHANGE:-5}
PROFILE=${MORGANA_BENCH_PROFILE:-release}

if [[ $PROFILE == release ]]; then
    cargo build --release -q -p morgana -p morgana-agent
fi
BIN=$REPO/target/$PROFILE

rm -rf "$WORK"; mkdir -p "$WORK"
echo "generating the reference image (scale $SCALE) in $WORK/ref ..." >&2
mkdir -p "$WORK/ref/usr"
python3 bench/gen.py base "$WORK/ref/usr" "$SCALE" 50000 5
mkdir -p "$WORK/target"
FILES=$(find "$WORK/ref" -type f | wc -l)
LOGICAL=$(du -sb --apparent-size "$WORK/ref" | cut -f1)

M=$WORK/data
"$BIN/morgana" serve --data-dir "$M" --listen 127.0.0.1:0 --gc-every off \
    > "$WORK/serve.out" 2> "$WORK/serve.err" &
SERVE=$!
DAEMON=
trap 'kill $SERVE $DAEMON 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q listening "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/^morgana listening on //p' "$WORK/serve.out")
m() { "$BIN/morgana" "$@" --data-dir "$M"; }
enroll() {
    "$BIN/morgana-agent" enroll --server "$URL" --token "$(m enroll-token)" --root "$1" \
        --state-dir "$2" > /dev/null
}
enroll "$WORK/ref" "$WORK/ref-state"
enroll "$WORK/target" "$WORK/target-state"
REF=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["device_id"])' "$WORK/ref-state/device.json")
TGT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["device_id"])' "$WORK/target-state/device.json")
"$BIN/morgana-agent" run --state-dir "$WORK/target-state" --sync-every 1000h \
    > "$WORK/agent.out" 2> "$WORK/agent.err" &
DAEMON=$!

echo "capturing base v1 ..." >&2
"$BIN/morgana-agent" sync --state-dir "$WORK/ref-state" > /dev/null
m reference mark "$REF" > /dev/null
m layer capture-base base --device "$REF" > /dev/null

# apply VERSION: assigns base:VERSION to the target, waits, and prints "wall_seconds
# fetched_bytes fetched_raw_bytes reused_bytes written_bytes proc_write_bytes unchanged
# replaced added removed"
apply() {
    local before after job t0 t1
    before=$(awk '/^write_bytes/ {print $2}' "/proc/$DAEMON/io")
    t0=$(date +%s.%N)
    job=$(m layer assign --device "$TGT" --base "base:$1" --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"][0]["job"])')
    m job wait "$job" --timeout 2h > /dev/null
    t1=$(date +%s.%N)
    after=$(awk '/^write_bytes/ {print $2}' "/proc/$DAEMON/io")
    m layer status --device "$TGT" --files --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["files"]["results"]
print(sys.argv[1], r["fetched_bytes"], r["fetched_raw_bytes"], r["reused_bytes"],
      r["written_bytes"], sys.argv[2], r["unchanged"], r["replaced"], r["added"],
      r["removed"])' \
        "$(echo "$t1 - $t0" | bc -l)" "$((after - before))"
}

echo "applying v1 to the empty target ..." >&2
read -r V1_S V1_FETCHED V1_RAW V1_REUSED V1_WRITTEN V1_IO V1_UNCH V1_REPL V1_ADD V1_REM \
    < <(apply 1)

echo "changing $CHANGE % of the files, capturing base v2 ..." >&2
python3 bench/gen.py change "$WORK/ref/usr" "$CHANGE"
"$BIN/morgana-agent" sync --state-dir "$WORK/ref-state" > /dev/null
m layer capture-base base --device "$REF" > /dev/null
LAYER_BYTES=$(m layer show base --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])')

# The target syncs as it would on its schedule, so the dry run compares with what it holds.
echo "syncing the target, dry run of v2 ..." >&2
m job wait "$(m job sync "$TGT")" --timeout 2h > /dev/null
CHANGED_CHUNK_BYTES=$(m layer assign --device "$TGT" --base base:2 --dry-run --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"][0]["download_bytes"])')

echo "applying v2 to the target ..." >&2
read -r V2_S V2_FETCHED V2_RAW V2_REUSED V2_WRITTEN V2_IO V2_UNCH V2_REPL V2_ADD V2_REM \
    < <(apply 2)

echo
echo "image: $FILES files, $((LOGICAL / 1048576)) MiB (scale $SCALE, $PROFILE build); v2 changes $CHANGE % of the files"
printf '%-44s %16s %16s\n' "measure" "v1 (empty)" "v2 (update)"
row() { printf '%-44s %16s %16s\n' "$1" "$2" "$3"; }
row "apply wall time s (assign to job done)" "$(printf %.2f "$V1_S")" "$(printf %.2f "$V2_S")"
row "bytes of changed chunks (raw, dry run)" "" "$CHANGED_CHUNK_BYTES"
row "bytes downloaded (chunks as stored)" "$V1_FETCHED" "$V2_FETCHED"
row "bytes downloaded (chunks raw)" "$V1_RAW" "$V2_RAW"
row "chunk bytes read from the device's files" "$V1_REUSED" "$V2_REUSED"
row "file bytes written by the apply" "$V1_WRITTEN" "$V2_WRITTEN"
row "agent write_bytes (/proc, incl. snapshot)" "$V1_IO" "$V2_IO"
row "files added / replaced / removed" "$V1_ADD / $V1_REPL / $V1_REM" "$V2_ADD / $V2_REPL / $V2_REM"
row "files unchanged (not fetched, not written)" "$V1_UNCH" "$V2_UNCH"
printf '%-44s %16s %16s\n' "base layer v2 logical bytes" "" "$LAYER_BYTES"
