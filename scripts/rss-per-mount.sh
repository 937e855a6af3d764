#!/usr/bin/env bash
# Daemon memory per mount, unionfs beside fuse-overlayfs 1.x and 2.x: RSS
# idle, after walking a 20k-file tree of three layers (find, then a stat
# walk, and one read of a 256 MiB file), and after the kernel forgets the
# nodes (drop_caches). Needs root; uses a release build.
#
#   scripts/rss-per-mount.sh [WORKDIR]          (default /var/tmp/unionfs-rss)
#
# UNIONFS_BIN, FUSE_OVERLAYFS1, FUSE_OVERLAYFS2 override the binaries; one
# that is missing is skipped.
set -euo pipefail
work=${1:-/var/tmp/unionfs-rss}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${UNIONFS_BIN:-$root/target/release/unionfs}
fo1=${FUSE_OVERLAYFS1:-/usr/bin/fuse-overlayfs}
fo2=${FUSE_OVERLAYFS2:-/opt/fuse-overlayfs2/bin/fuse-overlayfs}
[ -n "${UNIONFS_BIN:-}" ] || cargo build --release --quiet --manifest-path "$root/Cargo.toml"

# base: 20,000 files of 0.5-4 KiB in 12 x 14 x 13 directories and a 256 MiB
# file; thin1 shadows every 20th file and whites out the next; thin2 adds
# a file to every 10th leaf directory. 2,366 directories merged.
layers=$work/layers
if [ ! -f "$layers/.complete" ]; then
  rm -rf "$layers"
  python3 - "$layers" <<'PY'
import os, sys
layers = sys.argv[1]
leaves = [f"tree/a{a:02d}/b{b:02d}/c{c:02d}" for a in range(12) for b in range(14) for c in range(13)]
for n, leaf in enumerate(leaves):
    os.makedirs(os.path.join(layers, "base", leaf))
    if n % 10 == 0:
        os.makedirs(os.path.join(layers, "thin2", leaf))
        open(os.path.join(layers, "thin2", leaf, "added"), "w").write("thin2\n")
for i in range(20000):
    leaf = leaves[i % len(leaves)]
    name = f"f{i // len(leaves):02d}"
    with open(os.path.join(layers, "base", leaf, name), "wb") as f:
        f.write(os.urandom(512 + (i * 37) % 3584))
    if i % 20 in (0, 1):
        os.makedirs(os.path.join(layers, "thin1", leaf), exist_ok=True)
        if i % 20 == 0:
            open(os.path.join(layers, "thin1", leaf, name), "w").write("shadowed by thin1\n")
        else:
            os.mknod(os.path.join(layers, "thin1", leaf, name), 0o600 | 0o020000, 0)
with open(os.path.join(layers, "base", "big.bin"), "wb") as f:
    chunk = os.urandom(1 << 20)
    for _ in range(256):
        f.write(chunk)
PY
  touch "$layers/.complete"
fi
lowers=$layers/thin2:$layers/thin1:$layers/base

kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
report() { # PID STAGE: "RSS (anon/file)" in KiB
  [ -z "${SMAPS:-}" ] || cp "/proc/$1/smaps" "$work/smaps-$impl-$2"
  printf '%d (%d/%d)' "$(kib "$1" VmRSS)" "$(kib "$1" RssAnon)" "$(kib "$1" RssFile)"
}
walk() {
  cat "$1/big.bin" >/dev/null
  find "$1" >/dev/null
  python3 -c 'import os, sys
for d, _, fs in os.walk(sys.argv[1]):
    for f in fs: os.lstat(os.path.join(d, f))' "$1"
}

mnt=""
cleanup() { [ -z "$mnt" ] || ! mountpoint -q "$mnt" || umount "$mnt" || umount -l "$mnt"; }
trap cleanup EXIT

printf '%-18s %-22s %-22s %-22s %s\n' implementation "idle KiB (anon/file)" "after walk" "after forget" "peak"
for impl in unionfs fuse-overlayfs-1 fuse-overlayfs-2; do
  run=$work/run-$impl
  rm -rf "$run"; mkdir -p "$run/upper" "$run/work" "$run/mnt"
  mnt=$run/mnt
  case $impl in
    unionfs) [ -x "$bin" ] || continue
      "$bin" mount --lower "$lowers" --upper "$run/upper" --work "$run/work" "$mnt"
      pattern=" mount --lower .*$mnt\$" ;;
    fuse-overlayfs-1) [ -x "$fo1" ] || continue
      "$fo1" -o "lowerdir=$lowers,upperdir=$run/upper,workdir=$run/work" "$mnt"
      pattern="fuse-overlayfs .*$mnt\$" ;;
    fuse-overlayfs-2) [ -x "$fo2" ] || continue
      "$fo2" -o "lowerdir=$lowers,upperdir=$run/upper,workdir=$run/work" "$mnt"
      pattern="fuse-overlayfs .*$mnt\$" ;;
  esac
  for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
  pid=$(pgrep -n -f -- "$pattern") || { echo "$impl: no daemon found" >&2; exit 1; }
  sleep 1
  idle=$(report "$pid" idle)
  walk "$mnt"
  walked=$(report "$pid" walk)
  echo 2 > /proc/sys/vm/drop_caches
  sleep 3
  forgot=$(report "$pid" forget)
  printf '%-18s %-22s %-22s %-22s %d\n' "$impl" "$idle" "$walked" "$forgot" "$(kib "$pid" VmHWM)"
  umount "$mnt"
  mnt=""
done
