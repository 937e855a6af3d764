#!/usr/bin/env bash
# Walks a large tree through unionfs and reports the daemon's memory: at
# start, after `find` (the kernel holds every node), and after dropping the
# kernel's caches (which FORGETs them). Needs root.
#
#   scripts/forget-rss.sh [FILES] [WORKDIR]     (default 1000000 files)
set -euo pipefail
files=${1:-1000000}
work=${2:-/var/tmp/unionfs-forget}
per_dir=1000
dirs=$(( (files + per_dir - 1) / per_dir ))
bin=${UNIONFS_BIN:-$(dirname "$0")/../target/release/unionfs}
[ -x "$bin" ] || cargo build --release --manifest-path "$(dirname "$0")/../Cargo.toml"

mkdir -p "$work"
if [ ! -f "$work/lower/.complete-$files" ]; then
  rm -rf "$work/lower"; mkdir -p "$work/lower"
  python3 - "$work/lower" "$dirs" "$per_dir" <<'PY'
import os, sys
root, dirs, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for d in range(dirs):
    p = os.path.join(root, "d%05d" % d)
    os.mkdir(p)
    for f in range(per):
        os.close(os.open(os.path.join(p, "f%04d" % f), os.O_CREAT | os.O_WRONLY, 0o644))
PY
  touch "$work/lower/.complete-$files"
fi
rm -rf "$work/upper" "$work/.upper.unionfs-work"; mkdir -p "$work/upper" "$work/mnt"
"$bin" mount --lower "$work/lower" --upper "$work/upper" "$work/mnt"
trap '"$bin" umount "$work/mnt" || umount -l "$work/mnt"' EXIT
pid=$(pgrep -n -f -- " mount --lower .* $work/mnt\$")
rss() { awk '/VmRSS/ {print $2}' /proc/"$pid"/status; }
hwm() { awk '/VmHWM/ {print $2}' /proc/"$pid"/status; }
fds() { ls /proc/"$pid"/fd | wc -l; }

echo 3 > /proc/sys/vm/drop_caches
start_rss=$(rss)
t0=$(date +%s.%N)
count=$(find "$work/mnt" | wc -l)
t1=$(date +%s.%N)
walk_rss=$(rss); walk_fds=$(fds)
echo 2 > /proc/sys/vm/drop_caches
sleep 5
after_rss=$(rss); after_fds=$(fds)
printf 'objects walked: %s in %.1f s\n' "$count" "$(echo "$t1 - $t0" | bc)"
printf 'daemon RSS: start %d KiB, after find %d KiB (%d fds), after drop_caches %d KiB (%d fds), peak %d KiB\n' \
  "$start_rss" "$walk_rss" "$walk_fds" "$after_rss" "$after_fds" "$(hwm)"
