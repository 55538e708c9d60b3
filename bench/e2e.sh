#!/usr/bin/env bash
# End-to-end benchmark: Morgana (appliance + agent on this box, TLS over loopback) beside
# restic, borg and rsync on the same generated endpoint trees, in the same run.
#
#   bench/e2e.sh [WORKDIR]        (default bench/out; SCALE=1 gives ~50k entries per endpoint;
#                                  REPS=3 cold runs of each tool's initial sync and restore)
#
# Installs restic, borgbackup and rsync from Debian when they are missing
# (MORGANA_BENCH_INSTALL=0 to skip); a tool that is absent is left out of the table.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${1:-$REPO/bench/out}
. bench/lib.sh
SCALE=${SCALE:-1}
ENDPOINTS=${ENDPOINTS:-5}

if [[ ${MORGANA_BENCH_INSTALL:-1} == 1 ]] && command -v apt-get >/dev/null; then
    missing=()
    for t in restic:restic borg:borgbackup rsync:rsync; do
        command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
    done
    if ((${#missing[@]})); then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

cargo build --release -q -p morgana -p morgana-agent
BIN=$REPO/target/release

rm -rf "$WORK"; mkdir -p "$WORK"
echo "generating $ENDPOINTS endpoint trees (scale $SCALE) in $WORK ..." >&2
python3 bench/gen.py base "$WORK/base" "$SCALE"
for i in $(seq 0 $((ENDPOINTS - 1))); do
    cp -a "$WORK/base" "$WORK/ep$i"
    python3 bench/gen.py user "$WORK/ep$i" "$i" "$SCALE"
done
cp -a "$WORK/ep0" "$WORK/ep0-changed"
python3 bench/gen.py change "$WORK/ep0-changed"
LOGICAL=$(du -sb --apparent-size "$WORK/ep0" | cut -f1)
ENTRIES=$(find "$WORK/ep0" | wc -l)

cp -a "$WORK/ep0" "$WORK/ep0-work"
trap 'morgana_stop; unmount_targets' EXIT

declare -A R
# The tools take turns: each round of initial syncs (and later of restores) runs every tool
# once, the first tool of a round moving one place each round. This host's speed drifts
# within minutes (in session 11 every tool's consecutive runs got faster one after the
# other, even after a 60 s settle), and with each tool's runs back to back the drift was
# charged to whichever tool ran first. Interleaved, every tool sees the same drift.
# Speeds are the median of REPS runs each: one run in a few stalls for tens of seconds
# (a restore that takes 3.3 s once took 46 s right after a large copy).
REPS=${REPS:-3}
TOOLS=(m)
command -v restic >/dev/null && TOOLS+=(r)
command -v borg >/dev/null && TOOLS+=(b)
command -v rsync >/dev/null && TOOLS+=(s)
# rounds KIND: REPS rounds of "${tool}_${KIND}_setup" (untimed) then "${tool}_${KIND}"
# (timed, after a settle) for every tool; R[${tool}_${KIND}] is the median seconds and
# R[${tool}_${KIND}-runs] every run. The last run's repository goes on to the later steps.
rounds() {
    local kind=$1 round i t
    declare -A runs
    for round in $(seq 0 $((REPS - 1))); do
        for i in $(seq 0 $((${#TOOLS[@]} - 1))); do
            t=${TOOLS[$(((i + round) % ${#TOOLS[@]}))]}
            # No appliance runs while another tool is timed; Morgana's setups start one.
            morgana_stop
            "${t}_${kind}_setup"
            settle
            runs[$t]+="$(seconds "${t}_${kind}") "
        done
    done
    for t in "${TOOLS[@]}"; do
        R[${t}_$kind]=$(printf '%s\n' ${runs[$t]} | median)
        R[${t}_$kind-runs]=$(printf '%.2f ' ${runs[$t]})
    done
    morgana_stop
}
# restore_setup NAME: the previous run's target goes, a new one is made, caches dropped.
restore_setup() { unmount_targets; restore_target "$1"; drop_caches; }

# ---------------------------------------------------------------- Morgana
M=$WORK/morgana
RSS_LOG=$WORK/morgana-rss.log; rm -f "$RSS_LOG"
# Every agent run goes through here, so the peak RSS covers the initial syncs too.
agent() {
    python3 -c 'import resource,subprocess,sys
r = subprocess.run(sys.argv[2:])
open(sys.argv[1], "a").write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(r.returncode)' "$RSS_LOG" "$BIN/morgana-agent" "$@"
}
# One port for every appliance of the run: the agents' state keeps the server's URL, and
# the appliance is stopped while the other tools are timed, then started again.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
morgana_stop() {
    if [[ -n ${SERVE:-} ]]; then kill "$SERVE" 2>/dev/null; wait "$SERVE" 2>/dev/null || true; SERVE=; fi
}
morgana_start() {
    rm -f "$M/serve.out"
    "$BIN/morgana" serve --data-dir "$M/data" --listen "127.0.0.1:$PORT" > "$M/serve.out" 2>> "$M/serve.err" &
    SERVE=$!
    for _ in $(seq 100); do grep -q listening "$M/serve.out" 2>/dev/null && break; sleep 0.1; done
    grep -q listening "$M/serve.out" || { echo "morgana serve did not start: see $M/serve.err" >&2; exit 1; }
    URL=$(sed -n 's/^morgana listening on //p' "$M/serve.out")
}
# A new, empty appliance with every endpoint enrolled.
m_init_setup() {
    rm -rf "$M"; mkdir -p "$M"
    morgana_start
    local i root
    for i in $(seq 0 $((ENDPOINTS - 1))); do
        root=$WORK/ep$i; [[ $i == 0 ]] && root=$WORK/ep0-work
        agent enroll --server "$URL" --token "$("$BIN/morgana" enroll-token --data-dir "$M/data")" \
            --root "$root" --state-dir "$M/state$i" > /dev/null
    done
    drop_caches
}
m_init() { agent sync --json --state-dir "$M/state0"; }
m_restore_setup() { restore_setup morgana-restore; morgana_start; }
m_restore() { agent restore --snapshot latest --to "$TO" --state-dir "$M/state0"; }

# ---------------------------------------------------------------- restic
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$WORK/restic-repo
r_init_setup() { rm -rf "$RESTIC_REPOSITORY"; restic init -q; drop_caches; }
r_init() { restic backup -q --host ep0 "$WORK/ep0-work"; }
r_restore_setup() { restore_setup restic-restore; }
r_restore() { restic restore -q latest --host ep0 --target "$TO"; }

# ---------------------------------------------------------------- borg
export BORG_REPO=$WORK/borg-repo BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
b_init_setup() { rm -rf "$BORG_REPO"; borg init -e none "$BORG_REPO"; drop_caches; }
b_init() { borg create --compression lz4 ::ep0-1 "$WORK/ep0-work"; }
b_restore_setup() { restore_setup borg-restore; mkdir -p "$TO"; }
b_restore() { cd "$TO" && borg extract ::ep0-1; }

# ---------------------------------------------------------------- rsync
s_init_setup() { rm -rf "$WORK/rsync-mirror"; drop_caches; }
s_init() { rsync -a "$WORK/ep0-work/" "$WORK/rsync-mirror/"; }
s_restore_setup() { restore_setup rsync-restore; }
s_restore() { rsync -a "$WORK/rsync-mirror/" "$TO/"; }

# ---------------------------------------------------------------- the run
settle 60
rounds init

# No-change re-syncs, one tool after the other, on the tree every tool has just read.
morgana_start
R[m_nochange]=$(seconds agent sync --json --state-dir "$M/state0")
morgana_stop
has() { [[ " ${TOOLS[*]} " == *" $1 "* ]]; }
if has r; then R[r_nochange]=$(seconds restic backup -q --host ep0 "$WORK/ep0-work"); fi
if has b; then R[b_nochange]=$(seconds borg create --compression lz4 ::ep0-2 "$WORK/ep0-work"); fi
if has s; then R[s_nochange]=$(seconds rsync -a --stats "$WORK/ep0-work/" "$WORK/rsync-mirror/"); fi

# The 1 % change, then what each tool sends for it.
rsync -a --delete "$WORK/ep0-changed/" "$WORK/ep0-work/"
morgana_start
R[m_change_sent]=$(agent sync --json --state-dir "$M/state0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_sent"])')
morgana_stop
if has r; then
    R[r_change_sent]=$(restic backup --json --host ep0 "$WORK/ep0-work" | python3 -c 'import json,sys
for l in sys.stdin:
    d = json.loads(l)
    if d.get("message_type") == "summary": print(d["data_added"])')
fi
if has b; then
    R[b_change_sent]=$(borg create --compression lz4 --json ::ep0-3 "$WORK/ep0-work" | python3 -c 'import json,sys; print(json.load(sys.stdin)["archive"]["stats"]["deduplicated_size"])' 2>/dev/null || echo)
fi
if has s; then
    R[s_change_sent]=$(rsync -a --delete --stats "$WORK/ep0-work/" "$WORK/rsync-mirror/" | sed -n 's/^Total bytes sent: //p' | tr -d ,)
fi

rounds restore
unmount_targets

# The other endpoints, for the volume each tool ends with.
morgana_start
for i in $(seq 1 $((ENDPOINTS - 1))); do agent sync --state-dir "$M/state$i" > /dev/null; done
morgana_stop
R[m_rss]=$(sort -n "$RSS_LOG" | tail -1)
R[m_volume]=$(du -sb "$M/data/volumes" | cut -f1)
R[m_catalog]=$(du -cb "$M/data"/catalog.sqlite* | tail -1 | cut -f1)
if has r; then
    for i in $(seq 1 $((ENDPOINTS - 1))); do restic backup -q --host "ep$i" "$WORK/ep$i" >/dev/null; done
    R[r_volume]=$(du -sb "$RESTIC_REPOSITORY" | cut -f1)
fi
if has b; then
    for i in $(seq 1 $((ENDPOINTS - 1))); do borg create --compression lz4 "::ep$i" "$WORK/ep$i"; done
    R[b_volume]=$(du -sb "$BORG_REPO" | cut -f1)
fi

# ---------------------------------------------------------------- table
v() { echo "${R[$1]:-}"; }
ratio() { [[ -n $1 && -n $2 ]] && echo "scale=2; $1 / $2" | bc -l || echo "-"; }
m_speed=$(mib_s "$LOGICAL" "$(v m_init)")
m_rspeed=$(mib_s "$LOGICAL" "$(v m_restore)")
speed() { [[ -n $(v "$1") ]] && mib_s "$LOGICAL" "$(v "$1")" || echo; }
r_speed=$(speed r_init); b_speed=$(speed b_init); s_speed=$(speed s_init)
r_rspeed=$(speed r_restore); b_rspeed=$(speed b_restore); s_rspeed=$(speed s_restore)
echo
echo "endpoint: $ENTRIES entries, $((LOGICAL / 1048576)) MiB; $ENDPOINTS endpoints sharing a base; 1 % of files changed"
printf '%-30s %12s %12s %12s %12s   %s\n' "measure" "morgana" "restic" "borg" "rsync" "morgana ÷ restic / borg / rsync"
row() { printf '%-30s %12s %12s %12s %12s   %s / %s / %s\n' "$1" "$2" "$3" "$4" "$5" "$(ratio "$2" "$3")" "$(ratio "$2" "$4")" "$(ratio "$2" "$5")"; }
row "initial sync MiB/s" "$m_speed" "$r_speed" "$b_speed" "$s_speed"
row "no-change re-sync s" "$(v m_nochange)" "$(v r_nochange)" "$(v b_nochange)" "$(v s_nochange)"
row "bytes sent after 1 % change" "$(v m_change_sent)" "$(v r_change_sent)" "$(v b_change_sent)" "$(v s_change_sent)"
row "restore MiB/s" "$m_rspeed" "$r_rspeed" "$b_rspeed" "$s_rspeed"
row "volume bytes, $ENDPOINTS endpoints" "$(v m_volume)" "$(v r_volume)" "$(v b_volume)" ""
printf '%-30s %12s\n' "morgana catalog bytes" "$(v m_catalog)"
printf '%-30s %12s\n' "agent peak RSS MiB" "$(( $(v m_rss) / 1024 ))"
echo
echo "each run in seconds (speeds above are from the medians):"
for k in m_init r_init b_init s_init m_restore r_restore b_restore s_restore; do
    if [[ -n $(v "$k-runs") ]]; then printf '  %-10s %s\n' "$k" "$(v "$k-runs")"; fi
done
