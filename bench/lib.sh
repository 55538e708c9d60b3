# Shared by the bench scripts: `. bench/lib.sh` after setting WORK (and LOGICAL, the bytes of
# one endpoint, before the first restore_target).

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# settle [SECONDS]: lets the disk absorb what was just written before a tool is timed (20 s,
# or SETTLE_SECONDS). Right after 1.4 GB was copied, a first sync ran 0.7-1.2 s slower than
# 20 s later. Settling alone did not remove this host's drift (in session 11, with 60 s
# before each tool's runs, each tool's three initial syncs still got faster one after the
# other), which is why bench/e2e.sh interleaves the tools.
settle() { sync; sleep "${1:-${SETTLE_SECONDS:-20}}"; }

# seconds CMD...: runs CMD, prints elapsed seconds on stdout; CMD's stdout goes to $WORK/last.out
seconds() {
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > "$WORK/last.out" 2> "$WORK/last.err" || { cat "$WORK/last.err" >&2; return 1; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}

mib_s() { echo "scale=1; $1 / 1048576 / $2" | bc -l; }

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# restore_target NAME: sets TO to a new, empty directory for a restore. As root, it lies on a
# new ext4 of its own: ext4 skips inodes freed in the last minutes when it creates files, so
# a tool restoring just after ~50k files were deleted on a shared filesystem spent seconds
# in that search (a third of our agent's CPU in one profile) while another tool did not.
FRESH=()
restore_target() {
    local mnt=$WORK/$1 img=$WORK/$1.img
    rm -rf "$mnt"; mkdir -p "$mnt"
    if [[ $(id -u) == 0 ]] && command -v mkfs.ext4 >/dev/null \
        && truncate -s $((LOGICAL * 2 + (1 << 30))) "$img" && mkfs.ext4 -q -F "$img" \
        && mount -o loop "$img" "$mnt" 2>/dev/null; then
        FRESH+=("$mnt")
    else
        rm -f "$img"
    fi
    TO=$mnt/r
}

# unmount_targets: removes every filesystem restore_target made.
unmount_targets() {
    local m
    for m in "${FRESH[@]}"; do umount "$m" 2>/dev/null && rm -f "$m.img"; done
    FRESH=()
}
