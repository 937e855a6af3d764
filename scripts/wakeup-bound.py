#!/usr/bin/env python3
"""What a FUSE round trip costs on this machine, by where the two sides run.

The first warm walk of a FUSE mount costs one GETATTR per directory (the
kernel marks a directory's atime stale after every listing it fetched),
and later warm walks cost none. This mounts the benchmark tree (20k small
files, 3 lowers; uppers on a private tmpfs) with unionfs and kernel
overlayfs and times `find` over it: cold, the first warm walk and a later
one; then untar of the tree into the mount. Each with the daemon and the
walker unpinned, pinned to the same CPU, and pinned to different CPUs. The
gap between the first and a later warm walk, per directory, is the cost of
one round trip. As root, nothing else running:

    scripts/wakeup-bound.py [--rounds N] [--files N]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

PLACEMENTS = {
    # name: (daemon CPUs, walker CPUs)
    "unpinned": (None, None),
    "same CPU": ("0", "0"),
    "different CPUs": ("1", "0"),
}


def pinned(cpus, command):
    return f"taskset -c {cpus} {command}" if cpus else command


def walk(mnt, cpus):
    t0 = time.perf_counter()
    subprocess.run(pinned(cpus, f"find {mnt}/tree") + " >/dev/null", shell=True, check=True)
    return time.perf_counter() - t0


def untar(mnt, tarball, cpus):
    os.mkdir(os.path.join(mnt, "created"))
    t0 = time.perf_counter()
    subprocess.run(pinned(cpus, f"tar -C {mnt}/created -xf {tarball}"), shell=True, check=True)
    return time.perf_counter() - t0


def one_set(impl, placement, layers, run_dir):
    daemon_cpus, walker_cpus = PLACEMENTS[placement]
    upper, work, mnt = (os.path.join(run_dir, d) for d in ("upper", "work", "mnt"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    inner = impl._command
    impl = bench.Impl(impl.name, lambda l, u, w, m: pinned(daemon_cpus, inner(l, u, w, m)))
    impl.mount(layers, upper, work, mnt)
    try:
        bench.drop_caches()
        walks = [walk(mnt, walker_cpus) for _ in range(3)]
        return walks + [untar(mnt, os.path.join(layers, "tree.tar"), walker_cpus)]
    finally:
        bench.unmount(mnt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--workdir", default="/var/tmp/unionfs-wakeup")
    ap.add_argument("--unionfs", default=os.path.join(bench.ROOT, "target/release/unionfs"))
    args = ap.parse_args()
    if os.cpu_count() < 2:
        sys.exit("wakeup-bound: needs two CPUs")
    layers = os.path.join(args.workdir, "layers")
    bench.build_layers(layers, args.files, 1, 0)
    impls = [i for i in bench.implementations(args.unionfs, "", "") if i.name in ("kernel", "unionfs")]
    dirs = bench.tree_dirs(args.files)
    times = {}
    sets = 0
    # Uppers on tmpfs: ext4 without a journal (this machine's) slows new
    # inodes down after many recent deletions, which would blur the figures.
    runs = os.path.join(args.workdir, "runs")
    os.makedirs(runs, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "unionfs-wakeup", runs], check=True)
    try:
        for _ in range(args.rounds):
            for placement in PLACEMENTS:
                for impl in impls:
                    sets += 1
                    run_dir = os.path.join(runs, f"run-{sets}")
                    t = one_set(impl, placement, layers, run_dir)
                    subprocess.run(["rm", "-rf", run_dir], check=True)
                    times.setdefault((impl.name, placement), []).append(t)
    finally:
        subprocess.run(["umount", runs], check=True)
    print(f"find over {args.files} files in {dirs} directories; ms, median of {args.rounds} rounds "
          f"(machine: {os.cpu_count()} CPUs, Linux {os.uname().release})\n")
    print("| placement | mount | find cold | first warm | later warm | first warm - later, per directory "
          "| untar |")
    print("|---|---|---|---|---|---|---|")
    for placement in PLACEMENTS:
        for impl in impls:
            sets = times[(impl.name, placement)]
            cold, warm1, warm2, untarred = (statistics.median(r[k] for r in sets) * 1000 for k in range(4))
            gap = (warm1 - warm2) * 1000 / dirs
            print(f"| {placement} | {impl.name} | {cold:.0f} | {warm1:.1f} | {warm2:.1f} | {gap:.1f} µs "
                  f"| {untarred:.0f} |")


if __name__ == "__main__":
    main()
