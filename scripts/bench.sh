#!/usr/bin/env bash
# Benchmarks unionfs beside kernel overlayfs and fuse-overlayfs 1.x and 2.x:
# fio and metadata workloads (interleaved rounds; the walks also counted in
# FUSE round trips), then N mounts of the same layers (page cache by memory
# cgroup, daemon RSS per mount, mount time). Writes docs/benchmarks.md with
# min / median / max of every figure, the ratios and the goals table, and
# docs/benchmarks.json and the charts. As root, with nothing else running:
#
#   scripts/bench.sh                       # everything, default sizes
#   scripts/bench.sh [--rounds N] [--only PREFIX,...] [--impls NAME,...] [--files N] [--big-mib N] [--wide N]
#                    [--many-mounts-only | --no-many-mounts] [--mounts 1,10,50]
#                    [--mounts-files N] [--mounts-big-mib N] [--mounts-rounds N] [--output FILE]
#
# A quick check at tiny sizes, leaving docs/ alone:
#
#   scripts/bench.sh --rounds 1 --runtime 1 --files 200 --big-mib 8 --wide 1000 \
#     --mounts 1,2,3 --mounts-files 200 --mounts-big-mib 8 --mounts-rounds 1 \
#     --workdir /var/tmp/unionfs-bench-tiny --output /tmp/bench-tiny/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null && command -v fuse-overlayfs >/dev/null && command -v strace >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio fuse-overlayfs fuse3 strace >/dev/null
}
[ -x /opt/fuse-overlayfs2/bin/fuse-overlayfs ] ||
  cargo install --locked --quiet fuse-overlayfs --root /opt/fuse-overlayfs2
python3 -c 'import matplotlib' 2>/dev/null || pip install --quiet matplotlib
modprobe overlay 2>/dev/null || true
cargo build --release --locked --quiet
exec python3 scripts/bench.py "$@"
