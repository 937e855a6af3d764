#!/usr/bin/env bash
# Benchmarks unionfs beside kernel overlayfs and fuse-overlayfs 1.x and 2.x
# (fio and metadata workloads, interleaved rounds, medians and ratios) and
# writes docs/benchmarks.md. As root:
#
#   scripts/bench.sh [--rounds N] [--only PREFIX,...] [--files N] [--big-mib N]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null && command -v fuse-overlayfs >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio fuse-overlayfs fuse3 >/dev/null
}
[ -x /opt/fuse-overlayfs2/bin/fuse-overlayfs ] ||
  cargo install --locked --quiet fuse-overlayfs --root /opt/fuse-overlayfs2
python3 -c 'import matplotlib' 2>/dev/null || pip install --quiet matplotlib
cargo build --release --locked --quiet
exec python3 scripts/bench.py "$@"
