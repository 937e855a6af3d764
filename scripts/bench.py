#!/usr/bin/env python3
"""Benchmarks unionfs against kernel overlayfs and fuse-overlayfs 1.x / 2.x
on one fixed layer set, interleaved over several rounds, and prints (and
writes to docs/benchmarks.md) the medians and the ratios. Run as root via
scripts/bench.sh; see --help.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ---------------------------------------------------------------- layers

def build_layers(base_dir, small_files, big_mib, wide):
    done = os.path.join(base_dir, f".complete-{small_files}-{big_mib}-{wide}")
    if os.path.exists(done):
        return
    shutil.rmtree(base_dir, ignore_errors=True)
    base, thin1, thin2 = (os.path.join(base_dir, n) for n in ("base", "thin1", "thin2"))
    for d in (base, thin1, thin2):
        os.makedirs(d)
    per_dir = 100
    for i in range(small_files):
        d = os.path.join(base, "tree", f"d{i // (per_dir * 20):02d}", f"e{(i // per_dir) % 20:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i % per_dir:03d}"), "wb") as f:
            f.write(os.urandom(512 + (i * 37) % 3584))
    wide_dir = os.path.join(base, "wide")
    os.makedirs(wide_dir)
    for i in range(wide):
        os.close(os.open(os.path.join(wide_dir, f"w{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    with open(os.path.join(base, "big.bin"), "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(big_mib):
            f.write(chunk)
    # Thin layers shadow and white out part of the base.
    for i in range(0, small_files, 20):
        rel = os.path.join("tree", f"d{i // (per_dir * 20):02d}", f"e{(i // per_dir) % 20:02d}")
        os.makedirs(os.path.join(thin1, rel), exist_ok=True)
        with open(os.path.join(thin1, rel, f"f{i % per_dir:03d}"), "wb") as f:
            f.write(b"shadowed by thin1\n")
        j = i + 1
        wh = os.path.join(thin1, rel, f"f{j % per_dir:03d}")
        os.mknod(wh, 0o600 | 0o020000, 0)
    for i in range(0, small_files, 200):
        rel = os.path.join("tree", f"d{i // (per_dir * 20):02d}", f"e{(i // per_dir) % 20:02d}")
        os.makedirs(os.path.join(thin2, rel), exist_ok=True)
        with open(os.path.join(thin2, rel, "added"), "wb") as f:
            f.write(b"thin2\n")
    with tarfile.open(os.path.join(base_dir, "tree.tar"), "w") as t:
        t.add(os.path.join(base, "tree"), arcname="tree")
    open(done, "w").close()


# ---------------------------------------------------------------- mounts

class Impl:
    def __init__(self, name, mount):
        self.name, self._mount = name, mount

    def mount(self, layers, upper, work, mnt):
        lowers = ":".join(os.path.join(layers, n) for n in ("thin2", "thin1", "base"))
        self._mount(lowers, upper, work, mnt)
        deadline = time.time() + 20
        while not os.path.ismount(mnt):
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} did not mount")
            time.sleep(0.01)

    def daemon_pid(self, mnt):
        if self.name == "kernel":
            return None
        out = subprocess.run(["pgrep", "-f", mnt], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None


def implementations(unionfs, fo1, fo2):
    impls = [Impl("kernel", lambda l, u, w, m: sh(
        f"mount -t overlay overlay -o lowerdir={l},upperdir={u},workdir={w} {m}"))]
    if fo1:
        impls.append(Impl("fuse-overlayfs-1", lambda l, u, w, m: sh(
            f"{fo1} -o lowerdir={l},upperdir={u},workdir={w} {m}")))
    if fo2:
        impls.append(Impl("fuse-overlayfs-2", lambda l, u, w, m: sh(
            f"{fo2} -o lowerdir={l},upperdir={u},workdir={w} {m}")))
    impls.append(Impl("unionfs", lambda l, u, w, m: sh(
        f"{unionfs} mount --lower {l} --upper {u} --work {w} {m}")))
    impls.append(Impl("unionfs-passthrough-all", lambda l, u, w, m: sh(
        f"{unionfs} mount --lower {l} --upper {u} --work {w} {m} -o passthrough=all")))
    return impls


def unmount(mnt):
    for _ in range(50):
        if not os.path.ismount(mnt):
            return
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            time.sleep(0.1)
    subprocess.run(["umount", "-l", mnt], capture_output=True)


# ---------------------------------------------------------------- workloads

def fio(mnt, job, file, size="", runtime=0, invalidate=0):
    """Runs benches/JOB.fio in MNT; returns summed (read B/s, write B/s, IOPS)."""
    env = dict(os.environ, FILE=file, SIZE=str(size), RUNTIME=str(runtime), INVALIDATE=str(invalidate))
    out = sh(f"fio --output-format=json {os.path.join(ROOT, 'benches', job + '.fio')}", cwd=mnt, env=env)
    jobs = json.loads(out)["jobs"]
    read = sum(j["read"]["bw_bytes"] for j in jobs)
    write = sum(j["write"]["bw_bytes"] for j in jobs)
    iops = sum(j["read"]["iops"] + j["write"]["iops"] for j in jobs)
    return read, write, iops


def walk_stat(root):
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            os.lstat(os.path.join(dirpath, f))
            n += 1
    return n


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


WORKLOADS = []


def workload(name, unit, higher_is_better=True):
    def register(fn):
        WORKLOADS.append((name, unit, higher_is_better, fn))
        return fn
    return register


@workload("seq read 1 GiB, cold", "MiB/s")
def seq_read_cold(mnt, ctx):
    drop_caches()
    r, _, _ = fio(mnt, "seq-read", "big.bin", f"{ctx.big}M", invalidate=1)
    return r / 2**20


@workload("seq read 1 GiB, warm", "MiB/s")
def seq_read_warm(mnt, ctx):
    fio(mnt, "seq-read", "big.bin", f"{ctx.big}M", invalidate=0)
    r, _, _ = fio(mnt, "seq-read", "big.bin", f"{ctx.big}M", invalidate=0)
    return r / 2**20


@workload("4k random read, 2 jobs, warm", "kIOPS")
def rand_read(mnt, ctx):
    fio(mnt, "seq-read", "big.bin", f"{ctx.big}M", invalidate=0)
    _, _, iops = fio(mnt, "rand-read", "big.bin", f"{ctx.big}M", runtime=ctx.runtime)
    return iops / 1000


@workload("seq write 1 GiB new file, end_fsync", "MiB/s")
def seq_write(mnt, ctx):
    _, w, _ = fio(mnt, "seq-write", "new.bin", f"{ctx.big}M")
    os.unlink(os.path.join(mnt, "new.bin"))
    return w / 2**20


@workload("4k random write, new file", "kIOPS")
def rand_write(mnt, ctx):
    _, _, iops = fio(mnt, "rand-write", "rw.bin", runtime=ctx.runtime)
    os.unlink(os.path.join(mnt, "rw.bin"))
    return iops / 1000


@workload("copy-up of the 1 GiB lower file", "s", higher_is_better=False)
def copy_up(mnt, ctx):
    drop_caches()
    t, _ = timed(lambda: os.close(os.open(os.path.join(mnt, "big.bin"), os.O_WRONLY)))
    return t


@workload("stat every file, cold", "kfiles/s")
def stat_cold(mnt, ctx):
    drop_caches()
    t, n = timed(lambda: walk_stat(os.path.join(mnt, "tree")))
    return n / t / 1000


@workload("stat every file, warm", "kfiles/s")
def stat_warm(mnt, ctx):
    walk_stat(os.path.join(mnt, "tree"))
    t, n = timed(lambda: walk_stat(os.path.join(mnt, "tree")))
    return n / t / 1000


@workload("readdir of a 100k-entry directory", "kentries/s")
def readdir_wide(mnt, ctx):
    drop_caches()
    t, n = timed(lambda: len(os.listdir(os.path.join(mnt, "wide"))))
    return n / t / 1000


@workload("create 10k small files", "kfiles/s")
def create_small(mnt, ctx):
    d = os.path.join(mnt, "created")
    os.mkdir(d)

    def create():
        for i in range(10000):
            fd = os.open(os.path.join(d, f"c{i}"), os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"x" * 100)
            os.close(fd)
        return 10000
    t, n = timed(create)
    return n / t / 1000


@workload("parallel stat walk, 4 processes", "kfiles/s")
def parallel_walk(mnt, ctx):
    walk_stat(os.path.join(mnt, "tree"))
    subtrees = sorted(os.listdir(os.path.join(mnt, "tree")))
    groups = [subtrees[i::4] for i in range(4)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c",
                               "import os,sys\nn=0\nfor r in sys.argv[1:]:\n for d,_,fs in os.walk(r):\n"
                               "  for f in fs: os.lstat(os.path.join(d,f)); n+=1\nprint(n)"]
                              + [os.path.join(mnt, "tree", s) for s in g], stdout=subprocess.PIPE, text=True)
             for g in groups]
    total = sum(int(p.communicate()[0]) for p in procs)
    return total / (time.perf_counter() - t0) / 1000


@workload("untar the tree into the mount", "s", higher_is_better=False)
def untar(mnt, ctx):
    dest = os.path.join(mnt, "untarred")
    os.mkdir(dest)
    t, _ = timed(lambda: sh(f"tar -C {dest} -xf {ctx.tarball}"))
    return t


@workload("rm -rf of the lower tree (whiteouts)", "s", higher_is_better=False)
def rm_tree(mnt, ctx):
    t, _ = timed(lambda: sh(f"rm -rf {os.path.join(mnt, 'tree')}"))
    return t


# ---------------------------------------------------------------- main

class Ctx:
    pass


UNIONFS = ("unionfs", "unionfs-passthrough-all")
PEERS = ("kernel", "fuse-overlayfs-2")


def ratio(med, higher, mine, other):
    """How many times faster `mine` is than `other` (> 1: mine is faster)."""
    if med.get(other) in (None, 0) or med.get(mine) in (None, 0):
        return None
    return med[mine] / med[other] if higher else med[other] / med[mine]


def draw_chart(data, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = data["workloads"][::-1]
    series = [(u, p) for u in UNIONFS for p in PEERS]
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.8))
    height = 0.8 / len(series)
    for k, (u, p) in enumerate(series):
        values = [ratio(r["medians"], r["higher_is_better"], u, p) or 0 for r in rows]
        ax.barh([i + (k - (len(series) - 1) / 2) * height for i in range(len(rows))], values,
                height=height, label=f"{u} / {p}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["name"] for r in rows])
    ax.set_xlabel("ratio (> 1: unionfs faster)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--wide", type=int, default=100000)
    ap.add_argument("--runtime", type=int, default=10, help="seconds of each time-based fio job")
    ap.add_argument("--workdir", default="/var/tmp/unionfs-bench")
    ap.add_argument("--unionfs", default=os.path.join(ROOT, "target/release/unionfs"))
    ap.add_argument("--fuse-overlayfs-1", default=shutil.which("fuse-overlayfs") or "")
    ap.add_argument("--fuse-overlayfs-2", default="/opt/fuse-overlayfs2/bin/fuse-overlayfs")
    ap.add_argument("--only", default="", help="comma-separated workload name prefixes")
    ap.add_argument("--output", default=os.path.join(ROOT, "docs/benchmarks.md"))
    ap.add_argument("--chart-only", action="store_true", help="redraw the PNG from the --output table")
    args = ap.parse_args()
    png = os.path.splitext(args.output)[0] + ".png"
    data_file = os.path.splitext(args.output)[0] + ".json"
    if args.chart_only:
        with open(data_file) as f:
            draw_chart(json.load(f), png)
        return
    fo2 = args.fuse_overlayfs_2 if os.path.exists(args.fuse_overlayfs_2) else ""

    layers = os.path.join(args.workdir, "layers")
    build_layers(layers, args.files, args.big_mib, args.wide)
    ctx = Ctx()
    ctx.big, ctx.runtime, ctx.tarball = args.big_mib, args.runtime, os.path.join(layers, "tree.tar")
    impls = implementations(args.unionfs, args.fuse_overlayfs_1, fo2)
    chosen = [w for w in WORKLOADS if not args.only or any(w[0].startswith(p) for p in args.only.split(","))]
    results = {(w[0], i.name): [] for w in chosen for i in impls}
    peak_rss = {i.name: 0 for i in impls}

    runs = 0
    for rnd in range(args.rounds):
        for name, unit, _, fn in chosen:
            for impl in impls:
                # A fresh path for every mount: a FUSE daemon that exits late
                # may unmount whatever sits on its old mountpoint by then
                # (fuse-overlayfs 2.x does).
                runs += 1
                run_dir = os.path.join(args.workdir, f"run-{runs}")
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.rmtree(os.path.join(args.workdir, f"run-{runs - 2}"), ignore_errors=True)
                upper, work, mnt = (os.path.join(run_dir, n) for n in ("upper", "work", "mnt"))
                for d in (upper, work, mnt):
                    os.makedirs(d)
                # Writeback left by the previous run must not land in this one.
                os.sync()
                impl.mount(layers, upper, work, mnt)
                try:
                    value = fn(mnt, ctx)
                    pid = impl.daemon_pid(mnt)
                    if pid:
                        with open(f"/proc/{pid}/status") as f:
                            hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
                        peak_rss[impl.name] = max(peak_rss[impl.name], hwm)
                finally:
                    unmount(mnt)
                results[(name, impl.name)].append(value)
                print(f"round {rnd + 1} {name:42} {impl.name:17} {value:10.2f} {unit}", flush=True)

    names = [i.name for i in impls]
    pairs = [(u, p) for u in UNIONFS if u in names for p in PEERS if p in names]
    lines = ["| workload | unit | " + " | ".join(names) + " | "
             + " | ".join(f"{u}/{p}" for u, p in pairs) + " |",
             "|---|---|" + "---|" * (len(names) + len(pairs))]
    data = {"workloads": []}
    for name, unit, higher, _ in chosen:
        med = {n: statistics.median(results[(name, n)]) for n in names}
        data["workloads"].append({"name": name, "unit": unit, "higher_is_better": higher,
                                  "medians": med, "runs": {n: results[(name, n)] for n in names}})
        cells = [ratio(med, higher, u, p) for u, p in pairs]
        lines.append(f"| {name} | {unit} | " + " | ".join(f"{med[n]:.2f}" for n in names) + " | "
                     + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines.append("| daemon peak RSS | MiB | " + " | ".join(
        "-" if n == "kernel" else f"{peak_rss[n] / 1024:.1f}" for n in names) + " |" + " - |" * len(pairs))
    data["peak_rss_kib"] = peak_rss
    table = "\n".join(lines)
    print(table)
    uname = os.uname()
    with open(data_file, "w") as f:
        json.dump(data, f, indent=1)
    with open(args.output, "w") as f:
        f.write("# Benchmarks\n\nMedians of interleaved rounds; ratios > 1 mean unionfs is faster "
                "(for times: the other takes longer). `unionfs` is the default mount; "
                "`unionfs-passthrough-all` adds `-o passthrough=all` (lower files passed through "
                "too, see README).\n\n")
        f.write(f"Command: `scripts/bench.sh {' '.join(sys.argv[1:])}`\n\n")
        f.write(f"Machine: {os.cpu_count()} cores, Linux {uname.release}, layers on "
                f"{sh('findmnt -no FSTYPE -T ' + args.workdir).strip()} ({time.strftime('%Y-%m-%d')}), "
                f"{args.rounds} rounds, {args.files} small files + {args.big_mib} MiB file + "
                f"{args.wide}-entry directory. Every run in `{os.path.basename(data_file)}`.\n\n")
        f.write(table + "\n")
        f.write(f"\n![ratios]({os.path.basename(png)})\n")
    draw_chart(data, png)


if __name__ == "__main__":
    main()
