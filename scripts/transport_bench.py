#!/usr/bin/env python3
"""What the FUSE transport costs: the classic /dev/fuse loop against FUSE over
io_uring, in the trivial server of examples/fuse_transport.rs, beside kernel
overlayfs and unionfs, all on a private tmpfs. Rounds are interleaved (every
implementation once per round, the order reversed every other round); each
workload gets a fresh mount. Prints min/median/max per implementation.

Run as root from the checkout (see docs/performance.md, "FUSE over io_uring:
measured"):

    cargo build --release --example fuse_transport && cargo build --release
    scripts/transport_bench.py --rounds 5

FUSE over io_uring needs /sys/module/fuse/parameters/enable_uring=Y; the
script sets it for the run and puts back the value it found.
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def unmount(cmd, mnt):
    """Unmount, retrying while the kernel still finishes releases (EBUSY)."""
    for _ in range(100):
        if subprocess.run(cmd + [mnt], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"cannot unmount {mnt}")


def wait_mounted(mnt, proc=None):
    deadline = time.time() + 20
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        if time.time() > deadline:
            raise RuntimeError(f"{mnt} did not mount")
        time.sleep(0.01)


class Trivial:
    """examples/fuse_transport.rs with the given arguments."""

    def __init__(self, name, binary, args):
        self.name, self.binary, self.args = name, binary, args
        self.proc = None

    def mount(self, scratch, mnt, extra=()):
        self.proc = subprocess.Popen([self.binary, mnt] + self.args + list(extra),
                                     stderr=subprocess.PIPE, text=True)
        wait_mounted(mnt, self.proc)

    def server_pid(self, mnt):
        return self.proc.pid

    def unmount(self, mnt):
        unmount(["umount"], mnt)
        try:
            err = self.proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            pid = self.proc.pid
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stack") as f:
                    print(f"{self.name} thread {tid} after umount:\n{f.read()}", file=sys.stderr)
            raise
        m = re.search(r"requests total=(\d+) ring=(\d+)", err)
        if self.proc.returncode != 0 or not m:
            raise RuntimeError(f"{self.name}: {err}")
        return int(m.group(1))


class Overlay:
    """Kernel overlayfs, or unionfs, over an empty lower, upper on the tmpfs."""

    def __init__(self, name, unionfs=None):
        self.name, self.unionfs = name, unionfs

    def mount(self, scratch, mnt):
        lower, upper, work = (os.path.join(scratch, n) for n in ("lower", "upper", "work"))
        for d in (lower, upper, work):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        if self.unionfs:
            sh(self.unionfs, "mount", "--lower", lower, "--upper", upper, "--work", work, mnt)
        else:
            sh("mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir={lower},upperdir={upper},workdir={work}", mnt)
        wait_mounted(mnt)

    def server_pid(self, mnt):
        if not self.unionfs:
            return None
        out = subprocess.run(["pgrep", "-f", mnt], capture_output=True, text=True).stdout.split()
        return int(out[0])

    def unmount(self, mnt):
        unmount([self.unionfs, "umount"] if self.unionfs else ["umount"], mnt)
        return None


def create_files(d, n):
    os.mkdir(d)
    for i in range(n):
        fd = os.open(os.path.join(d, f"c{i}"), os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"x" * 100)
        os.close(fd)


def cpu_ns(pid):
    """CPU time of every thread of pid so far (schedstat: ns on a CPU)."""
    if pid is None:
        return 0
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total


def children_cpu_ns():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((r.ru_utime + r.ru_stime) * 1e9)


def timed(fn, server):
    """Wall time, and the CPU time of the caller (this process and its
    children) and of the server while fn ran."""
    c0, s0 = time.process_time_ns() + children_cpu_ns(), cpu_ns(server)
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    c1, s1 = time.process_time_ns() + children_cpu_ns(), cpu_ns(server)
    return t, c1 - c0, s1 - s0


def make_tarball(scratch, files):
    src = os.path.join(scratch, "src")
    for i in range(files):
        d = os.path.join(src, "tree", f"d{i // 2000:02d}", f"e{(i // 100) % 20:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i % 100:03d}"), "wb") as f:
            f.write(os.urandom(512 + (i * 37) % 3584))
    tarball = os.path.join(scratch, "tree.tar")
    with tarfile.open(tarball, "w") as t:
        t.add(os.path.join(src, "tree"), arcname="tree")
    shutil.rmtree(src)
    with tarfile.open(tarball) as t:
        entries = len(t.getmembers())
    return tarball, entries


class Bench:
    """Every measurement of one run, by implementation and workload."""

    WORKLOADS = ("create", "rm", "untar")

    def __init__(self, impls, args, scratch):
        self.args, self.scratch = args, scratch
        self.mnt = os.path.join(scratch, "mnt")
        self.wall = {i.name: {w: [] for w in self.WORKLOADS} for i in impls}
        self.cpu = {i.name: {w: [] for w in self.WORKLOADS} for i in impls}
        # Requests served per mount (trivial servers): create, create+rm, untar.
        self.requests = {i.name: {w: [] for w in self.WORKLOADS} for i in impls}
        self.roundtrip = {i.name: [] for i in impls if isinstance(i, Trivial)}
        self.tarball, self.entries = None, 0

    def run(self, impl, workload, fn):
        t, client, server = timed(fn, impl.server_pid(self.mnt))
        self.wall[impl.name][workload].append(t)
        self.cpu[impl.name][workload].append((client, server))

    def workloads(self, impl):
        mnt, created = self.mnt, os.path.join(self.mnt, "created")
        impl.mount(self.scratch, mnt)
        self.run(impl, "create", lambda: create_files(created, self.args.files))
        self.requests[impl.name]["create"].append(impl.unmount(mnt))

        impl.mount(self.scratch, mnt)
        create_files(created, self.args.files)
        self.run(impl, "rm", lambda: sh("rm", "-rf", created))
        self.requests[impl.name]["rm"].append(impl.unmount(mnt))

        impl.mount(self.scratch, mnt)
        dest = os.path.join(mnt, "untarred")
        os.mkdir(dest)
        self.run(impl, "untar", lambda: sh("tar", "-C", dest, "-xf", self.tarball))
        self.requests[impl.name]["untar"].append(impl.unmount(mnt))

    def roundtrips(self, impl):
        impl.mount(self.scratch, self.mnt, ["--ttl", "0"])
        fd = os.open(os.path.join(self.mnt, "f"), os.O_CREAT | os.O_RDWR, 0o644)

        def stats():
            for _ in range(self.args.roundtrip):
                os.fstat(fd)
        sample = timed(stats, impl.server_pid(self.mnt))
        os.close(fd)
        impl.unmount(self.mnt)
        self.roundtrip[impl.name].append(sample)

    def report(self, impls):
        args = self.args
        n_of = {"create": args.files, "rm": args.files, "untar": self.entries}
        units = {"create": "kfiles/s", "rm": "kfiles/s", "untar": "kentries/s"}
        header = "| workload | " + " | ".join(i.name for i in impls) + " |\n|---|" + "---|" * len(impls)
        if not args.roundtrip_only:
            print(f"\n{args.rounds} rounds; create {args.files} files (open O_CREAT, write 100 B, close), "
                  f"rm -rf of them, untar of {self.entries} entries; rates min / median / max\n")
            print(header)
            for w in self.WORKLOADS:
                cells = []
                for i in impls:
                    rates = sorted(n_of[w] / t / 1000 for t in self.wall[i.name][w])
                    cells.append(f"{rates[0]:.1f} / {statistics.median(rates):.1f} / {rates[-1]:.1f}")
                print(f"| {w} ({units[w]}) | " + " | ".join(cells) + " |")
            print("\nCPU time per file or entry, median, in us: caller + server = total\n")
            print(header)
            for w in self.WORKLOADS:
                cells = []
                for i in impls:
                    samples, n = self.cpu[i.name][w], n_of[w] * 1000
                    client = statistics.median(c for c, _ in samples) / n
                    server = statistics.median(s for _, s in samples) / n
                    total = statistics.median(c + s for c, s in samples) / n
                    cells.append(f"{client:.1f} + {server:.1f} = {total:.1f}")
                print(f"| {w} | " + " | ".join(cells) + " |")
            trivial = [i for i in impls if isinstance(i, Trivial)]
            if trivial:
                print("\nrequests per workload (median) and requests/s at the median time:\n")
            for i in trivial:
                req = self.requests[i.name]
                create = statistics.median(req["create"])
                counts = {"create": create, "rm": statistics.median(req["rm"]) - create,
                          "untar": statistics.median(req["untar"])}
                parts = []
                for w, count in counts.items():
                    t = statistics.median(self.wall[i.name][w])
                    parts.append(f"{w} {count:.0f} req, {count / t / 1000:.1f} kreq/s")
                print(f"* {i.name}: " + "; ".join(parts))
        if args.roundtrip:
            n = args.roundtrip
            print(f"\nGETATTR round trip ({n} fstat calls, attributes not cached), us per call: "
                  "wall min / median / max; CPU caller + server = total (medians)\n")
            for name, samples in self.roundtrip.items():
                walls = sorted(t / n * 1e6 for t, _, _ in samples)
                client = statistics.median(c for _, c, _ in samples) / n / 1000
                server = statistics.median(s for _, _, s in samples) / n / 1000
                total = statistics.median(c + s for _, c, s in samples) / n / 1000
                print(f"* {name}: {walls[0]:.2f} / {statistics.median(walls):.2f} / {walls[-1]:.2f}; "
                      f"{client:.2f} + {server:.2f} = {total:.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"wall": self.wall, "cpu": self.cpu, "requests": self.requests,
                           "roundtrip": self.roundtrip, "entries": self.entries}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--files", type=int, default=10000, help="files created, then removed")
    ap.add_argument("--tar-files", type=int, default=5000, help="files in the untarred tree")
    ap.add_argument("--only", default="classic,uring,kernel,unionfs",
                    help="comma-separated implementations, from: " + ", ".join(KNOWN))
    ap.add_argument("--example", default=os.path.join(ROOT, "target/release/examples/fuse_transport"))
    ap.add_argument("--unionfs", default=os.path.join(ROOT, "target/release/unionfs"))
    ap.add_argument("--unionfs-b", help="another unionfs build, as implementation unionfs-b")
    ap.add_argument("--roundtrip", type=int, default=0,
                    help="also time this many fstat calls per round on the trivial servers "
                         "mounted with --ttl 0: one GETATTR round trip each")
    ap.add_argument("--roundtrip-only", action="store_true", help="only the round trips")
    ap.add_argument("--json", help="write every measurement here")
    args = ap.parse_args()

    impls = []
    for name in args.only.split(","):
        kind, extra = KNOWN[name]
        binary = {"unionfs": args.unionfs, "unionfs-b": args.unionfs_b}.get(kind)
        impls.append(Trivial(name, args.example, extra) if kind == "trivial" else Overlay(name, binary))

    old_param = open(URING_PARAM).read().strip() if os.path.exists(URING_PARAM) else None
    scratch = tempfile.mkdtemp(prefix="transport-bench-")
    sh("mount", "-t", "tmpfs", "-o", "size=4g", "transport-bench", scratch)
    bench = Bench(impls, args, scratch)
    try:
        if old_param is not None:
            with open(URING_PARAM, "w") as f:
                f.write("Y\n")
        os.makedirs(bench.mnt)
        bench.tarball, bench.entries = make_tarball(scratch, args.tar_files)
        for r in range(args.rounds):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                if not args.roundtrip_only:
                    bench.workloads(impl)
                if args.roundtrip and isinstance(impl, Trivial):
                    bench.roundtrips(impl)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        if os.path.ismount(bench.mnt):
            subprocess.run(["umount", "-l", bench.mnt])
        for impl in impls:
            if isinstance(impl, Trivial) and impl.proc and impl.proc.poll() is None:
                impl.proc.wait(timeout=30)
        for _ in range(300):
            if subprocess.run(["umount", scratch], capture_output=True).returncode == 0:
                os.rmdir(scratch)
                break
            time.sleep(0.1)
        else:
            print(f"could not unmount {scratch}", file=sys.stderr)
        if old_param is not None:
            with open(URING_PARAM, "w") as f:
                f.write(old_param + "\n")
    bench.report(impls)


# name: (kind, arguments of the trivial server)
KNOWN = {
    "classic": ("trivial", ["--transport", "classic", "--threads", "2"]),
    "uring": ("trivial", ["--transport", "uring", "--depth", "4"]),
    "kernel": ("kernel", None),
    "unionfs": ("unionfs", None),
    "unionfs-b": ("unionfs-b", None),
    "classic-1": ("trivial", ["--transport", "classic", "--threads", "1"]),
    "uring-d1": ("trivial", ["--transport", "uring", "--depth", "1"]),
    "uring-nopin": ("trivial", ["--transport", "uring", "--depth", "4", "--no-pin"]),
    "uring-coop": ("trivial", ["--transport", "uring", "--depth", "4", "--ring-flags", "coop"]),
    "uring-defer": ("trivial", ["--transport", "uring", "--depth", "4", "--ring-flags", "defer"]),
}


if __name__ == "__main__":
    main()
