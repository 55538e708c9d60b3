#!/usr/bin/env bash
# Morgana beside restic on one endpoint, alternating, round after round. This host's speed
# drifts by tens of percent within minutes, so a single run of each (bench/e2e.sh) can be
# off by a third; the median of per-round ratios is what to quote for a small change.
#
#   bench/ab.sh [ROUNDS] [WORKDIR]        (default 5 rounds in bench/out-ab)
#
# Each round: Morgana's initial sync into a new appliance, restic's backup into a new
# repository, then each one's restore into a new ext4 (as root); caches dropped before each.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROUNDS=${1:-5}
WORK=${2:-$REPO/bench/out-ab}
command -v restic >/dev/null || { echo "bench/ab.sh needs restic: apt-get install restic" >&2; exit 1; }
. bench/lib.sh

cargo build --release -q -p morgana -p morgana-agent
BIN=$REPO/target/release
rm -rf "$WORK"; mkdir -p "$WORK"
echo "generating one endpoint tree in $WORK ..." >&2
python3 bench/gen.py base "$WORK/base" 1
cp -a "$WORK/base" "$WORK/ep"
python3 bench/gen.py user "$WORK/ep" 0 1
LOGICAL=$(du -sb --apparent-size "$WORK/ep" | cut -f1)
trap 'kill "${SERVE:-}" 2>/dev/null || true; unmount_targets' EXIT
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$WORK/restic-repo

printf '%-8s %10s %10s %10s %10s\n' round "m sync s" "r sync s" "m rest. s" "r rest. s"
for r in $(seq "$ROUNDS"); do
    M=$WORK/m; rm -rf "$M"; mkdir -p "$M"
    "$BIN/morgana" serve --data-dir "$M/data" --listen 127.0.0.1:0 > "$M/serve.out" 2> "$M/serve.err" &
    SERVE=$!
    for _ in $(seq 100); do grep -q listening "$M/serve.out" 2>/dev/null && break; sleep 0.1; done
    URL=$(sed -n 's/^morgana listening on //p' "$M/serve.out")
    "$BIN/morgana-agent" enroll --server "$URL" --token "$("$BIN/morgana" enroll-token --data-dir "$M/data")" \
        --root "$WORK/ep" --state-dir "$M/state" > /dev/null
    drop_caches; m_sync=$(seconds "$BIN/morgana-agent" sync --state-dir "$M/state")
    rm -rf "$RESTIC_REPOSITORY"; restic init -q
    drop_caches; r_sync=$(seconds restic backup -q --host ep "$WORK/ep")
    unmount_targets
    restore_target m-restore; drop_caches
    m_rest=$(seconds "$BIN/morgana-agent" restore --snapshot latest --to "$TO" --state-dir "$M/state")
    kill $SERVE; wait $SERVE 2>/dev/null || true
    restore_target r-restore; drop_caches
    r_rest=$(seconds restic restore -q latest --host ep --target "$TO")
    printf '%-8s %10.2f %10.2f %10.2f %10.2f\n' "$r" "$m_sync" "$r_sync" "$m_rest" "$r_rest"
    echo "$m_sync $r_sync $m_rest $r_rest" >> "$WORK/rounds"
done
unmount_targets
col() { awk -v c="$1" '{ print $c }' "$WORK/rounds" | median; }
ratio() { awk -v n="$1" -v d="$2" '{ print $n / $d }' "$WORK/rounds" | median; }
printf '%-8s %10.2f %10.2f %10.2f %10.2f\n' median "$(col 1)" "$(col 2)" "$(col 3)" "$(col 4)"
echo
echo "$((LOGICAL / 1048576)) MiB endpoint; medians of per-round ratios (restic time ÷ morgana time, higher is better):"
printf '  initial sync %.2f×   restore %.2f×\n' "$(ratio 2 1)" "$(ratio 4 3)"
