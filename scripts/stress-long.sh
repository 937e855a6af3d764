#!/usr/bin/env bash
# A longer stress-ng run than CI's, inside a unionfs mount over a lower layer:
# the 15 filesystem stressors, 2 workers each, with --verify. Reports
# stress-ng's verdict, the daemon's RSS and whether the lower changed.
#
#   scripts/stress-long.sh [SECONDS] [WORKDIR]     (default 120 s)
set -euo pipefail
secs=${1:-120}
work=${2:-/var/tmp/unionfs-stress}
bin=${UNIONFS_BIN:-$(dirname "$0")/../target/release/unionfs}
[ -x "$bin" ] || cargo build --release --manifest-path "$(dirname "$0")/../Cargo.toml"
command -v stress-ng >/dev/null || apt-get install -y -qq stress-ng >/dev/null

rm -rf "$work"; mkdir -p "$work/lower/base" "$work/upper" "$work/mnt"
for i in $(seq 1 200); do echo "lower $i" > "$work/lower/base/$i"; done
before=$(cd "$work/lower" && find . -printf '%p %m %s %T@\n' | sort | md5sum)
"$bin" mount --lower "$work/lower" --upper "$work/upper" "$work/mnt"
trap '"$bin" umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt"' EXIT
pid=$(cat /run/unionfs/*.pid | while read -r p; do
  grep -qa -- "$work/mnt" /proc/"$p"/cmdline 2>/dev/null && echo "$p"; done | head -1)

cd "$work/mnt"
stress-ng --temp-path "$work/mnt" \
  --dir 2 --rename 2 --link 2 --symlink 2 --filename 2 --dentry 2 --hdd 2 --chmod 2 \
  --xattr 2 --fallocate 2 --lockf 2 --mmap 2 --readahead 2 --seek 2 --sync-file 2 \
  --hdd-bytes 64M --fallocate-bytes 64M --mmap-bytes 64M --readahead-bytes 64M \
  --seek-size 64M --sync-file-bytes 64M --timeout "${secs}s" --verify --metrics-brief 2>&1 |
  grep -E "successful|unsuccessful|fail|error" || true
cd /
ls "$work/mnt/base/1" >/dev/null && echo "daemon alive and answering"
awk '/VmRSS|VmHWM/ {print "daemon " $1 " " $2 " " $3}' /proc/"$pid"/status
after=$(cd "$work/lower" && find . -printf '%p %m %s %T@\n' | sort | md5sum)
[ "$before" = "$after" ] && echo "lower unchanged" || { echo "LOWER CHANGED"; exit 1; }
