#!/usr/bin/env python3
"""Benchmarks unionfs against kernel overlayfs and fuse-overlayfs 1.x / 2.x
on one fixed layer set, interleaved over several rounds (fio and metadata
workloads, the walks also counted in FUSE round trips), then N mounts of one
layer set (page cache by memory cgroup, daemon RSS per mount, mount time).
Prints, and writes to docs/benchmarks.md, min / median / max of every figure,
the ratios and the goals table. Run as root via scripts/bench.sh; see --help.
"""
import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout


def drop_caches(what=3):
    """3: page cache and slab; 2: dentries and inodes only (FUSE mounts
    then get FORGETs for every node the kernel let go)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{what}\n")


# ---------------------------------------------------------------- layers

FILES_PER_DIR, DIRS_PER_PARENT, PARENTS_PER_TOP = 9, 20, 10


def tree_dir(i):
    """The directory of small file I: 9 files a directory, 20 directories a
    parent, 10 parents a top directory. 20,000 files make 2,348 directories
    (the issue's tree: 20k files in about 2,344)."""
    leaf = i // FILES_PER_DIR
    parent = leaf // DIRS_PER_PARENT
    return os.path.join("tree", f"d{parent // PARENTS_PER_TOP:02d}", f"e{parent % PARENTS_PER_TOP}",
                        f"g{leaf % DIRS_PER_PARENT:02d}")


def tree_dirs(files):
    """Directories in the tree of FILES small files, its root included."""
    dirs = set()
    for i in range(files):
        d = tree_dir(i)
        while d:
            dirs.add(d)
            d = os.path.dirname(d)
    return len(dirs)


def tree_file(i):
    return os.path.join(tree_dir(i), f"f{i % FILES_PER_DIR}")


def build_layers(base_dir, small_files, big_mib, wide):
    done = os.path.join(base_dir, f".complete-v2-{small_files}-{big_mib}-{wide}")
    if os.path.exists(done):
        return
    shutil.rmtree(base_dir, ignore_errors=True)
    base, thin1, thin2 = (os.path.join(base_dir, n) for n in ("base", "thin1", "thin2"))
    for d in (base, thin1, thin2):
        os.makedirs(d)
    for i in range(small_files):
        os.makedirs(os.path.join(base, tree_dir(i)), exist_ok=True)
        with open(os.path.join(base, tree_file(i)), "wb") as f:
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
        for j in (i, i + 1):
            os.makedirs(os.path.join(thin1, tree_dir(j)), exist_ok=True)
        with open(os.path.join(thin1, tree_file(i)), "wb") as f:
            f.write(b"shadowed by thin1\n")
        os.mknod(os.path.join(thin1, tree_file(i + 1)), 0o600 | 0o020000, 0)
    for i in range(0, small_files, 200):
        os.makedirs(os.path.join(thin2, tree_dir(i)), exist_ok=True)
        with open(os.path.join(thin2, tree_dir(i), "added"), "wb") as f:
            f.write(b"thin2\n")
    with tarfile.open(os.path.join(base_dir, "tree.tar"), "w") as t:
        t.add(os.path.join(base, "tree"), arcname="tree")
    open(done, "w").close()


# ---------------------------------------------------------------- mounts

class Impl:
    def __init__(self, name, command):
        self.name, self._command = name, command

    def mount(self, layers, upper, work, mnt, preexec_fn=None, extra=""):
        """Mounts (`extra` appended to the command) and returns the seconds
        until the mount answered (its root listed)."""
        lowers = ":".join(os.path.join(layers, n) for n in ("thin2", "thin1", "base"))
        t0 = time.perf_counter()
        sh(f"{self._command(lowers, upper, work, mnt)} {extra}", preexec_fn=preexec_fn)
        deadline = time.time() + 20
        while not os.path.ismount(mnt):
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} did not mount")
            time.sleep(0.001)
        os.listdir(mnt)
        return time.perf_counter() - t0

    def daemon_pids(self, mnts):
        """The FUSE daemon serving each mountpoint (None for the kernel): the
        process with the mountpoint as a whole argument and /dev/fuse open."""
        if self.name == "kernel":
            return [None] * len(mnts)
        wanted, found = set(mnts), {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().decode(errors="replace").split("\0")
                hits = wanted.intersection(args)
                if hits and any(os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse"
                                for fd in os.listdir(f"/proc/{entry}/fd")):
                    for m in hits:
                        found[m] = int(entry)
            except OSError:
                continue
        return [found.get(m) for m in mnts]

    def daemon_pid(self, mnt):
        return self.daemon_pids([mnt])[0]


def implementations(unionfs, fo1, fo2):
    impls = [Impl("kernel", lambda l, u, w, m:
                  f"mount -t overlay overlay -o lowerdir={l},upperdir={u},workdir={w} {m}")]
    if fo1:
        impls.append(Impl("fuse-overlayfs-1", lambda l, u, w, m:
                          f"{fo1} -o lowerdir={l},upperdir={u},workdir={w} {m}"))
    if fo2:
        impls.append(Impl("fuse-overlayfs-2", lambda l, u, w, m:
                          f"{fo2} -o lowerdir={l},upperdir={u},workdir={w} {m}"))
    impls.append(Impl("unionfs", lambda l, u, w, m:
                      f"{unionfs} mount --lower {l} --upper {u} --work {w} {m}"))
    impls.append(Impl("unionfs-passthrough-upper", lambda l, u, w, m:
                      f"{unionfs} mount --lower {l} --upper {u} --work {w} {m} -o passthrough=upper"))
    impls.append(Impl("unionfs-dev-fuse", lambda l, u, w, m:
                      f"{unionfs} mount --lower {l} --upper {u} --work {w} {m} -o noio_uring"))
    impls.append(Impl("unionfs-nocache-readdir", lambda l, u, w, m:
                      f"{unionfs} mount --lower {l} --upper {u} --work {w} {m} -o nocache_readdir"))
    return impls


# Run unless --impls names others: the nocache_readdir mount is there to
# show what the kernel's listing cache costs and saves, on demand.
DEFAULT_IMPLS = "kernel,fuse-overlayfs-1,fuse-overlayfs-2,unionfs,unionfs-passthrough-upper"


def unmount(mnt):
    for _ in range(50):
        if not os.path.ismount(mnt):
            return
        if subprocess.run(["umount", mnt], capture_output=True).returncode != 0:
            time.sleep(0.1)
    subprocess.run(["umount", "-l", mnt], capture_output=True)


def wait_gone(pids, timeout=30):
    deadline = time.time() + timeout
    while any(p and os.path.exists(f"/proc/{p}") for p in pids) and time.time() < deadline:
        time.sleep(0.05)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))


# ---------------------------------------------------------------- measuring

class RoundTrips:
    """Counts the requests a FUSE daemon serves while the block runs (and
    0.2 s after): every request is one successful read(2) (readv, splice) of
    /dev/fuse by one of its threads, whatever the daemon. strace follows all
    of them; a read blocked when it attaches is restarted, so it is seen.
    Checked against fuse-overlayfs' -d log and unionfs' fuser debug log."""

    def __init__(self, pid, log):
        self.pid, self.log, self.count = pid, log, None

    def __enter__(self):
        self.strace = subprocess.Popen(["strace", "-f", "-y", "-qq", "-s", "0", "-e", "trace=read,readv,splice",
                                        "-o", self.log, "-p", str(self.pid)], stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not self._attached():
            if time.time() > deadline or self.strace.poll() is not None:
                self.strace.kill()
                raise RuntimeError(f"strace did not attach to {self.pid}")
            time.sleep(0.01)
        return self

    def _attached(self):
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/status") as f:
                    if next(l for l in f if l.startswith("TracerPid")).split()[1] != str(self.strace.pid):
                        return False
        except OSError:
            return False
        return True

    def __exit__(self, *exc):
        # Requests the kernel sends after the block returns (RELEASEDIR of
        # the last directory closed) belong to it too.
        time.sleep(0.2)
        self.strace.send_signal(signal.SIGINT)
        self.strace.wait()
        self.count = self.parse(self.log)
        if not os.environ.get("KEEP_STRACE"):
            os.unlink(self.log)

    @staticmethod
    def parse(log):
        """Successful reads of /dev/fuse in an `strace -f -y` log, also those
        split into `<unfinished ...>` and `<... read resumed>` lines."""
        start = re.compile(r"^(\d+)\s+(?:read|readv|splice)\(\d+<([^>]*)>")
        resumed = re.compile(r"^(\d+)\s+<\.\.\. (?:read|readv|splice) resumed>")
        returned = re.compile(r"\)\s+=\s+(-?\d+)")
        pending, n = {}, 0
        with open(log) as f:
            for line in f:
                m = start.match(line)
                if m:
                    tid, path = m.groups()
                    if line.rstrip().endswith("<unfinished ...>"):
                        pending[tid] = path
                        continue
                else:
                    m = resumed.match(line)
                    if not m:
                        continue
                    path = pending.pop(m.group(1), None)
                r = returned.search(line)
                if path == "/dev/fuse" and r and int(r.group(1)) > 0:
                    n += 1
        return n


class Cgroup:
    """A fresh memory cgroup below this process' own. Processes join it
    through `join` as a preexec_fn; `page_cache` is what they (and their
    children) have charged to it. Used on cgroup v1; on v2 the parent must
    have the memory controller enabled for its children."""

    def __init__(self, name):
        v1 = os.path.exists("/sys/fs/cgroup/memory/memory.stat")
        with open("/proc/self/cgroup") as f:
            own = next(l.rstrip("\n").split(":", 2)[2] for l in f
                       if ("memory" in l.split(":")[1].split(",") if v1 else l.startswith("0::")))
        self.v1 = v1
        self.path = os.path.join("/sys/fs/cgroup/memory" if v1 else "/sys/fs/cgroup", own.lstrip("/"), name)

    def __enter__(self):
        os.mkdir(self.path)
        return self

    def join(self):
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def page_cache(self):
        """Bytes of page cache charged here: total_cache (cgroup v1, this
        cgroup and below), or file (v2)."""
        with open(os.path.join(self.path, "memory.stat")) as f:
            stat = dict(l.split() for l in f)
        return int(stat["total_cache"] if self.v1 else stat["file"])

    def __exit__(self, *exc):
        deadline = time.time() + 30
        while True:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                if not f.read().strip() or time.time() > deadline:
                    break
            time.sleep(0.05)
        if self.v1:
            try:
                with open(os.path.join(self.path, "memory.force_empty"), "w") as f:
                    f.write("0")
            except OSError:
                pass
        try:
            os.rmdir(self.path)
        except OSError as e:
            print(f"warning: cgroup {self.path} left: {e}", file=sys.stderr)


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


def find(root):
    """find(1) over ROOT; the number of entries it printed."""
    out = subprocess.run(["find", root], check=True, stdout=subprocess.PIPE).stdout
    return out.count(b"\n")


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


Workload = collections.namedtuple("Workload", "name unit higher_is_better fn counted min_rounds")
WORKLOADS = []


def workload(name, unit, higher_is_better=True, counted=False, min_rounds=1):
    """COUNTED: a second pass on a fresh mount counts the FUSE round trips of
    the part the workload times (ctx.timed). MIN_ROUNDS: run at least that
    often, whatever --rounds says."""
    def register(fn):
        WORKLOADS.append(Workload(name, unit, higher_is_better, fn, counted, min_rounds))
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


@workload("copy-up of the 1 GiB lower file, cold", "s", higher_is_better=False)
def copy_up(mnt, ctx):
    drop_caches()
    t, _ = ctx.timed(lambda: os.close(os.open(os.path.join(mnt, "big.bin"), os.O_WRONLY)))
    return t


@workload("copy-up of the 1 GiB lower file, in page cache", "s", higher_is_better=False, min_rounds=5)
def copy_up_cached(mnt, ctx):
    with open(os.path.join(ctx.layers, "base", "big.bin"), "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    t, _ = ctx.timed(lambda: os.close(os.open(os.path.join(mnt, "big.bin"), os.O_WRONLY)))
    return t


@workload("stat every file, cold", "kfiles/s", counted=True)
def stat_cold(mnt, ctx):
    drop_caches()
    t, n = ctx.timed(lambda: walk_stat(os.path.join(mnt, "tree")))
    return n / t / 1000


@workload("stat every file, warm", "kfiles/s", counted=True)
def stat_warm(mnt, ctx):
    walk_stat(os.path.join(mnt, "tree"))
    t, n = ctx.timed(lambda: walk_stat(os.path.join(mnt, "tree")))
    return n / t / 1000


@workload("find, cold", "kentries/s", counted=True)
def find_cold(mnt, ctx):
    drop_caches()
    t, n = ctx.timed(lambda: find(os.path.join(mnt, "tree")))
    return n / t / 1000


@workload("find, warm", "kentries/s", counted=True)
def find_warm(mnt, ctx):
    find(os.path.join(mnt, "tree"))
    t, n = ctx.timed(lambda: find(os.path.join(mnt, "tree")))
    return n / t / 1000


@workload("readdir of a 100k-entry directory", "kentries/s")
def readdir_wide(mnt, ctx):
    drop_caches()
    t, n = ctx.timed(lambda: len(os.listdir(os.path.join(mnt, "wide"))))
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
    t, n = ctx.timed(create)
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
    t, _ = ctx.timed(lambda: sh(f"tar -C {dest} -xf {ctx.tarball}"))
    return t


@workload("rm -rf of the lower tree (whiteouts)", "s", higher_is_better=False)
def rm_tree(mnt, ctx):
    t, _ = ctx.timed(lambda: sh(f"rm -rf {os.path.join(mnt, 'tree')}"))
    return t


@workload("rm -rf of the 100k-entry directory (whiteouts)", "s", higher_is_better=False)
def rm_wide(mnt, ctx):
    t, _ = ctx.timed(lambda: sh(f"rm -rf {os.path.join(mnt, 'wide')}"))
    return t


class Ctx:
    """What workloads get besides the mountpoint. `timed` times a callable;
    while `count_pid` is set it also counts that daemon's round trips into
    `round_trips`."""
    count_pid = None
    round_trips = None

    def timed(self, fn):
        if self.count_pid is None:
            return timed(fn)
        with RoundTrips(self.count_pid, os.path.join(self.workdir, "strace.log")) as rt:
            result = timed(fn)
        self.round_trips = rt.count
        return result


# ---------------------------------------------------------------- many mounts

# Started first, it waits for a line on stdin: the page cache its own start
# (the interpreter, its modules) charges is then in the baseline. It walks
# every mount, waits again, then reads every mount's big file.
WALK_AND_READ = """
import os, sys
print("ready", flush=True)
sys.stdin.readline()
for mnt in sys.argv[1:]:
    for d, _, fs in os.walk(os.path.join(mnt, "tree")):
        for f in fs:
            os.lstat(os.path.join(d, f))
print("walked", flush=True)
sys.stdin.readline()
for mnt in sys.argv[1:]:
    with open(os.path.join(mnt, "big.bin"), "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
print("read", flush=True)
"""


def pss_kib(pid):
    """Proportional set size: shared pages (the binary's and libc's code,
    mapped by every daemon) split between the processes mapping them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def settle_rss(pids, timeout=10):
    """RSS of each daemon once their sum stops falling (after FORGETs)."""
    deadline = time.time() + timeout
    last = [rss_kib(p) for p in pids]
    while True:
        time.sleep(1)
        now = [rss_kib(p) for p in pids]
        if sum(now) >= sum(last) or time.time() > deadline:
            return now
        last = now


def many_mounts_once(impl, n, layers, run_dir, cg_name):
    """N mounts of LAYERS by IMPL, with their daemons and the process that
    walks each and reads its big file once in a fresh memory cgroup, after
    dropping the caches. Returns the figures of this set: page_cache_mib is
    what the walks and reads charged (from a baseline taken once the mounts
    answer and the walker has started), page_cache_all_mib everything,
    mounting and the programs' own files included; daemon RSS idle, after
    the walks, after the reads, after the kernel forgot its nodes."""
    drop_caches()
    mnts, pids, fig = [], [], {"mount_ms": []}
    with Cgroup(cg_name) as cg:
        try:
            for i in range(n):
                upper, work, mnt = (os.path.join(run_dir, f"{d}{i:03d}") for d in ("upper", "work", "mnt"))
                for d in (upper, work, mnt):
                    os.makedirs(d)
                mnts.append(mnt)
                fig["mount_ms"].append(impl.mount(layers, upper, work, mnt, preexec_fn=cg.join) * 1000)
            pids = [p for p in impl.daemon_pids(mnts) if p]
            fig["rss_idle_mib"] = [rss_kib(p) / 1024 for p in pids]
            fig["pss_idle_mib"] = [pss_kib(p) / 1024 for p in pids]
            with subprocess.Popen([sys.executable, "-c", WALK_AND_READ] + mnts, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, preexec_fn=cg.join) as walker:

                def step(expect):
                    if walker.stdout.readline() != expect + "\n":
                        raise RuntimeError(f"the walker did not get to '{expect}'")
                step("ready")
                before = cg.page_cache()
                walker.stdin.write("walk\n")
                walker.stdin.flush()
                step("walked")
                fig["rss_walked_mib"] = [rss_kib(p) / 1024 for p in pids]
                fig["pss_walked_mib"] = [pss_kib(p) / 1024 for p in pids]
                walker.stdin.write("read\n")
                walker.stdin.flush()
                step("read")
                after = cg.page_cache()
                fig["rss_read_mib"] = [rss_kib(p) / 1024 for p in pids]
            fig["page_cache_mib"] = [(after - before) / 2**20]
            fig["page_cache_all_mib"] = [after / 2**20]
            drop_caches(2)
            fig["rss_forgotten_mib"] = [k / 1024 for k in settle_rss(pids)] if pids else []
        finally:
            for mnt in reversed(mnts):
                unmount(mnt)
            wait_gone(pids)
    return fig


def many_mounts(args, impls):
    layers = os.path.join(args.workdir, "layers-mounts")
    build_layers(layers, args.mounts_files, args.mounts_big_mib, 0)
    counts = [int(c) for c in args.mounts.split(",")]
    figures = {i.name: {str(n): collections.defaultdict(list) for n in counts} for i in impls}
    sets = 0
    for rnd in range(args.mounts_rounds):
        for n in counts:
            for impl in impls:
                sets += 1
                run_dir = os.path.join(args.workdir, f"mounts-{sets}")
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.rmtree(os.path.join(args.workdir, f"mounts-{sets - 2}"), ignore_errors=True)
                fig = many_mounts_once(impl, n, layers, run_dir, f"unionfs-bench-{os.getpid()}-{sets}")
                for k, v in fig.items():
                    figures[impl.name][str(n)][k].extend(v)
                rss = "/".join(f"{statistics.median(fig[k]):.1f}" for k in
                               ("rss_idle_mib", "rss_walked_mib", "rss_read_mib", "rss_forgotten_mib") if fig[k])
                print(f"round {rnd + 1} {n:3} mounts {impl.name:24} page cache {fig['page_cache_mib'][0]:8.1f} MiB"
                      f"  mount {statistics.median(fig['mount_ms']):7.1f} ms"
                      + (f"  RSS idle/walked/read/forgotten {rss} MiB" if rss else ""), flush=True)
    for n in range(sets - 1, sets + 1):
        shutil.rmtree(os.path.join(args.workdir, f"mounts-{n}"), ignore_errors=True)
    return {"counts": counts, "files": args.mounts_files, "big_mib": args.mounts_big_mib,
            "rounds": args.mounts_rounds, "figures": figures}


# ---------------------------------------------------------------- report

UNIONFS = ("unionfs", "unionfs-passthrough-upper")
PEERS = ("kernel", "fuse-overlayfs-2")
GOAL_IMPLS = ("kernel", "fuse-overlayfs-1", "fuse-overlayfs-2", "unionfs", "unionfs-passthrough-upper")


def ratio(med, higher, mine, other):
    """How many times faster `mine` is than `other` (> 1: mine is faster)."""
    if med.get(other) in (None, 0) or med.get(mine) in (None, 0):
        return None
    return med[mine] / med[other] if higher else med[other] / med[mine]


def num(v):
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def spread(values):
    """'min / median / max' of VALUES ('-' for none, the value for one)."""
    if not values:
        return "-"
    if len(values) == 1:
        return num(values[0])
    return f"{num(min(values))} / {num(statistics.median(values))} / {num(max(values))}"


def median(values):
    return statistics.median(values) if values else None


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def workloads_table(data, names):
    pairs = [(u, p) for u in UNIONFS if u in names for p in PEERS if p in names]
    rows = []
    for w in data["workloads"]:
        cells = [ratio(w["medians"], w["higher_is_better"], u, p) for u, p in pairs]
        rows.append([w["name"], w["unit"]] + [spread(w["runs"].get(n)) for n in names]
                    + [num(c) for c in cells])
    rows.append(["daemon peak RSS", "MiB"] + ["-" if n == "kernel" else num(data["peak_rss_kib"].get(n, 0) / 1024)
                                              for n in names] + ["-"] * len(pairs))
    return table(["workload", "unit"] + names + [f"{u}/{p}" for u, p in pairs], rows)


MOUNT_FIGURES = (("page_cache_mib", "page cache of the walks and reads, MiB"),
                 ("page_cache_all_mib", "page cache in the cgroup, all, MiB"),
                 ("rss_idle_mib", "daemon RSS per mount, idle, MiB"),
                 ("rss_walked_mib", "daemon RSS per mount after the walks, MiB"),
                 ("rss_read_mib", "daemon RSS per mount after the walks and reads, MiB"),
                 ("rss_forgotten_mib", "daemon RSS per mount after forget, MiB"),
                 ("pss_idle_mib", "daemon PSS per mount, idle, MiB"),
                 ("pss_walked_mib", "daemon PSS per mount after the walks, MiB"),
                 ("mount_ms", "mount time per mount, ms"))


def mounts_table(mounts, names):
    rows = []
    for key, label in MOUNT_FIGURES:
        for n in mounts["counts"]:
            rows.append([label, str(n)] + [spread(mounts["figures"][i][str(n)].get(key)) for i in names])
    return table(["figure", "mounts"] + names, rows)


def goal_rows(data):
    """Each goal of issue #12: its figure for every implementation, unionfs'
    ratio or median (then its passthrough=upper mount's) and met or not,
    judged on the medians."""
    by_name = {w["name"]: w for w in data.get("workloads", [])}
    rows = []

    def add(goal, unit, figures, target, ratios, verdicts):
        rows.append([goal, unit] + [spread(figures.get(i)) for i in GOAL_IMPLS] + [target]
                    + ["; ".join(num(r) for r in ratios) or "-"]
                    + ["; ".join("-" if v is None else "met" if v else "not met" for v in verdicts) or "-"])

    def speed(goal, name, minimum):
        w = by_name.get(name)
        if w is None:
            rows.append([goal, "not run"] + [""] * (len(GOAL_IMPLS) + 3))
            return
        ratios = [ratio(w["medians"], w["higher_is_better"], u, "kernel") for u in UNIONFS]
        add(goal, w["unit"], w["runs"], f">= {minimum} of kernel", ratios,
            [None if r is None else r >= minimum - 1e-9 for r in ratios])
        if w.get("round_trips"):
            add(goal + ": round trips", "requests", w["round_trips"], "(counted)", [], [])

    mounts = data.get("mounts")
    if mounts:
        n_max, figs = str(max(mounts["counts"])), mounts["figures"]

        def at_max(key):
            return {i: figs[i][n_max].get(key, []) for i in figs}
        kernel_one = median(figs.get("kernel", {}).get("1", {}).get("page_cache_mib", []))
        cache = at_max("page_cache_mib")
        ratios = [median(cache[u]) / kernel_one if kernel_one and cache.get(u) else None for u in UNIONFS]
        add(f"1. page cache of {n_max} mounts (kernel, 1 mount: {num(kernel_one)} MiB)", "MiB", cache,
            "<= 1.3 x kernel, 1 mount", ratios, [None if r is None else r <= 1.3 for r in ratios])
    speed("1. warm sequential read of a lower file", "seq read 1 GiB, warm", 0.9)
    if mounts:
        idle, walked, forgotten = at_max("rss_idle_mib"), at_max("rss_walked_mib"), at_max("rss_forgotten_mib")
        for goal, values, target, limit in (
                (f"2. daemon RSS per mount after walking the tree ({n_max} mounts)", walked, "<= 6 MiB",
                 {u: 6 for u in UNIONFS}),
                ("2. daemon RSS per mount, idle", idle, "<= 3 MiB", {u: 3 for u in UNIONFS}),
                ("2. daemon RSS per mount after the kernel forgot the nodes", forgotten, "<= idle + 1 MiB",
                 {u: median(idle.get(u)) + 1 if idle.get(u) else None for u in UNIONFS})):
            meds = [median(values.get(u)) for u in UNIONFS]
            add(goal, "MiB", values, target, meds,
                [None if m is None or limit[u] is None else m <= limit[u] for u, m in zip(UNIONFS, meds)])
    speed("3. find, warm", "find, warm", 0.8)
    speed("3. stat walk, warm", "stat every file, warm", 0.8)
    speed("3. find, cold", "find, cold", 0.5)
    speed("3. stat walk, cold", "stat every file, cold", 0.5)
    speed("4. create 10k small files", "create 10k small files", 0.5)
    speed("4. untar", "untar the tree into the mount", 0.5)
    speed("4. rm -rf of 100k lower files", "rm -rf of the 100k-entry directory (whiteouts)", 0.5)
    speed("5. copy-up of the 1 GiB lower file in page cache", "copy-up of the 1 GiB lower file, in page cache", 1.0)
    return rows


def goals_table(data):
    return table(["goal", "unit"] + list(GOAL_IMPLS)
                 + ["target", "unionfs; passthrough=upper: ratio to kernel or median", "met"],
                 goal_rows(data))


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
    plt.close(fig)


def draw_mounts_chart(mounts, png):
    """Medians against the number of mounts, min-max as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    keys = ("page_cache_mib", "rss_walked_mib", "mount_ms")
    fig, axes = plt.subplots(1, len(keys), figsize=(15, 4.5))
    counts = mounts["counts"]
    colors = dict(zip(mounts["figures"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, key in zip(axes, keys):
        for name, figs in mounts["figures"].items():
            values = [figs[str(n)].get(key) or [] for n in counts]
            if not all(values):
                continue
            med = [statistics.median(v) for v in values]
            err = [[m - min(v) for m, v in zip(med, values)], [max(v) - m for m, v in zip(med, values)]]
            ax.errorbar(counts, med, yerr=err, marker="o", capsize=3, label=name, color=colors[name])
        ax.set_xscale("log")
        ax.set_xticks(counts)
        ax.set_xticklabels([str(n) for n in counts])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("mounts of the same layers")
        ax.set_title(dict(MOUNT_FIGURES)[key])
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(data, args, path, png, mounts_png, data_file):
    uname = os.uname()
    meta = data["meta"]
    with open(path, "w") as f:
        f.write("# Benchmarks\n\nGenerated by `scripts/bench.py` from one run; README and "
                "docs/performance.md refer to these tables. Each cell is min / median / max over the "
                "rounds (over every mount for per-mount figures); ratios and met / not met are taken "
                "from the medians, and ratios > 1 mean unionfs is faster (for times: the other takes "
                "longer). `unionfs` is the default mount (lower files passed through); "
                "`unionfs-passthrough-upper` adds `-o passthrough=upper` (lower files read through "
                "the daemon, the default before; see README).\n\n")
        f.write(f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['date']}, "
                f"{meta['minutes']:.0f} minutes)\n\n")
        uring = meta.get("enable_uring", "?")
        f.write(f"`fuse.enable_uring` was {uring} for the run: unionfs served FUSE over "
                f"{'io_uring' if uring == 'Y' else '/dev/fuse'}"
                f"{' (`unionfs-dev-fuse`: over /dev/fuse, `-o noio_uring`)' if uring == 'Y' else ''}. "
                "Round trips are counted over /dev/fuse.\n\n")
        f.write(f"Machine: {os.cpu_count()} cores, Linux {uname.release}, layers on "
                f"{sh('findmnt -no FSTYPE -T ' + args.workdir).strip()}. Every run in "
                f"`{os.path.basename(data_file)}`.\n\n")
        f.write("## Goals (issue #12)\n\n" + goals_table(data) + "\n\n")
        f.write("Round trips are the requests each daemon read from /dev/fuse during the timed part, "
                "counted by strace on all its threads in a separate pass on a fresh mount. Goal 2 "
                "figures are from the many-mounts scenario below; copy-up times include each "
                "implementation's own fsync (fuse-overlayfs does none).\n")
        if data.get("workloads"):
            f.write(f"\n## Workloads\n\n{meta['rounds']} rounds (copy-up in page cache: at least 5), "
                    f"{args.files} small files in {tree_dirs(args.files)} "
                    f"directories over 3 lowers + {args.big_mib} MiB file + {args.wide}-entry directory; "
                    "implementations interleaved (in another order each round), each run on a fresh mount.\n\n")
            f.write(workloads_table(data, meta["impls"]) + "\n")
            f.write(f"\n![ratios]({os.path.basename(png)})\n")
        if data.get("mounts"):
            m = data["mounts"]
            f.write(f"\n## Many mounts\n\nN mounts of the same 3 lowers ({m['files']} small files + one "
                    f"{m['big_mib']} MiB file), each with its own upper; every mount walked (lstat of "
                    "every file) and its big file read once. Caches dropped before each set; the "
                    "daemons and the reading process in a fresh memory cgroup, whose `total_cache` "
                    "is the page cache (counted from once the mounts answer and the reading process "
                    "has started; the row 'all' counts from the empty cgroup: mount commands, daemon "
                    "binaries and the interpreter too). Daemon RSS: right after mounting (idle), after "
                    "the walks of all mounts, after the reads, and after `echo 2 > "
                    "/proc/sys/vm/drop_caches` made the kernel forget its nodes. Daemon PSS "
                    "(`/proc/PID/smaps_rollup`) splits the pages the daemons share, their binary's "
                    "and libc's code above all, between them: RSS counts them whole in each. "
                    f"{m['rounds']} rounds.\n\n")
            f.write(mounts_table(m, [i for i in meta["impls"] if i in m["figures"]]) + "\n")
            f.write(f"\n![many mounts]({os.path.basename(mounts_png)})\n")


# ---------------------------------------------------------------- main

def run_workloads(args, impls, ctx):
    chosen = [w for w in WORKLOADS if not args.only or any(w.name.startswith(p) for p in args.only.split(","))]
    results = {(w.name, i.name): [] for w in chosen for i in impls}
    trips = {(w.name, i.name): [] for w in chosen if w.counted for i in impls}
    peak_rss = {i.name: 0 for i in impls}
    runs = 0

    def run(impl, w, count):
        # A fresh path for every mount: a FUSE daemon that exits late may
        # unmount whatever sits on its old mountpoint by then (fuse-overlayfs
        # 2.x does).
        nonlocal runs
        runs += 1
        run_dir = os.path.join(args.workdir, f"run-{runs}")
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(args.workdir, f"run-{runs - 2}"), ignore_errors=True)
        upper, work, mnt = (os.path.join(run_dir, n) for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            os.makedirs(d)
        # Writeback left by the previous run must not land in this one.
        os.sync()
        # The kernel sends the same requests over either transport, but
        # strace sees them as reads of /dev/fuse only without io_uring.
        counted_over_dev_fuse = count and impl.name.startswith("unionfs")
        impl.mount(ctx.layers, upper, work, mnt, extra="-o noio_uring" if counted_over_dev_fuse else "")
        try:
            pid = impl.daemon_pid(mnt)
            ctx.count_pid, ctx.round_trips = (pid if count else None), None
            value = w.fn(mnt, ctx)
            if pid:
                with open(f"/proc/{pid}/status") as f:
                    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
                peak_rss[impl.name] = max(peak_rss[impl.name], hwm)
        finally:
            ctx.count_pid = None
            unmount(mnt)
        return ctx.round_trips if count else value

    for rnd in range(max([args.rounds] + [w.min_rounds for w in chosen])):
        for w in chosen:
            if rnd >= max(args.rounds, w.min_rounds):
                continue
            # Each round after the first runs the implementations in another
            # order (seeded, so reruns repeat it): what one run leaves
            # behind (the ext4 below makes new inodes slowly for a while
            # after many deletions) must not always fall on the same
            # implementation. Rotating the order was not enough: every
            # implementation kept the same predecessor.
            order = list(impls)
            if rnd:
                random.Random(rnd).shuffle(order)
            for impl in order:
                value = run(impl, w, False)
                results[(w.name, impl.name)].append(value)
                line = f"round {rnd + 1} {w.name:46} {impl.name:24} {value:10.2f} {w.unit}"
                if w.counted and impl.name != "kernel":
                    n = run(impl, w, True)
                    trips[(w.name, impl.name)].append(n)
                    line += f" {n:8} round trips"
                print(line, flush=True)
    for n in range(runs - 1, runs + 1):
        shutil.rmtree(os.path.join(args.workdir, f"run-{n}"), ignore_errors=True)

    names = [i.name for i in impls]
    data = {"workloads": []}
    for w in chosen:
        runs_of = {n: results[(w.name, n)] for n in names}
        entry = {"name": w.name, "unit": w.unit, "higher_is_better": w.higher_is_better,
                 "medians": {n: statistics.median(v) for n, v in runs_of.items()}, "runs": runs_of}
        if w.counted:
            entry["round_trips"] = {n: trips[(w.name, n)] for n in names if trips[(w.name, n)]}
        data["workloads"].append(entry)
    data["peak_rss_kib"] = peak_rss
    return data


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
    ap.add_argument("--impls", default=DEFAULT_IMPLS,
                    help="comma-separated implementations to run (also: unionfs-nocache-readdir, "
                    "unionfs-dev-fuse)")
    ap.add_argument("--io-uring", choices=["on", "off", "keep"], default="on",
                    help="set fuse.enable_uring (Y or N) for the run and put it back after; unionfs "
                    "serves FUSE over io_uring where the kernel offers it (default: on)")
    ap.add_argument("--mounts", default="1,10,50", help="many mounts: comma-separated numbers of mounts")
    ap.add_argument("--mounts-files", type=int, default=20000, help="many mounts: small files in the layers")
    ap.add_argument("--mounts-big-mib", type=int, default=256, help="many mounts: size of the big file")
    ap.add_argument("--mounts-rounds", type=int, default=3, help="many mounts: rounds")
    scenario = ap.add_mutually_exclusive_group()
    scenario.add_argument("--many-mounts-only", action="store_true", help="run just the many-mounts scenario")
    scenario.add_argument("--no-many-mounts", action="store_true", help="run just the workloads")
    ap.add_argument("--output", default=os.path.join(ROOT, "docs/benchmarks.md"))
    ap.add_argument("--chart-only", action="store_true", help="redraw the PNGs from the --output data")
    args = ap.parse_args()
    png = os.path.splitext(args.output)[0] + ".png"
    mounts_png = os.path.splitext(args.output)[0] + "-mounts.png"
    data_file = os.path.splitext(args.output)[0] + ".json"
    if args.chart_only:
        with open(data_file) as f:
            data = json.load(f)
        if data.get("workloads"):
            draw_chart(data, png)
        if data.get("mounts"):
            draw_mounts_chart(data["mounts"], mounts_png)
        return
    fo2 = args.fuse_overlayfs_2 if os.path.exists(args.fuse_overlayfs_2) else ""

    start = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    wanted = args.impls.split(",")
    impls = [i for i in implementations(args.unionfs, args.fuse_overlayfs_1, fo2) if i.name in wanted]
    unknown = set(wanted) - {i.name for i in impls}
    if unknown:
        sys.exit(f"bench: unknown or missing implementations: {', '.join(sorted(unknown))}")
    data = {}
    uring_before = set_enable_uring(args.io_uring)
    try:
        run_all(args, impls, data)
    finally:
        if uring_before is not None:
            with open(URING_PARAM, "w") as f:
                f.write(uring_before)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    data["meta"] = {"command": " ".join(["scripts/bench.sh"] + sys.argv[1:]), "commit": commit or "?",
                    "date": time.strftime("%Y-%m-%d"), "minutes": (time.time() - start) / 60,
                    "rounds": args.rounds, "impls": [i.name for i in impls],
                    "enable_uring": data.pop("enable_uring")}
    finish(args, data, png, mounts_png, data_file)


URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def set_enable_uring(choice):
    """Sets fuse.enable_uring as asked; returns the value to put back (None
    when nothing was changed)."""
    if choice == "keep" or not os.path.exists(URING_PARAM):
        return None
    with open(URING_PARAM) as f:
        before = f.read().strip()
    with open(URING_PARAM, "w") as f:
        f.write("Y" if choice == "on" else "N")
    return before


def run_all(args, impls, data):
    try:
        with open(URING_PARAM) as f:
            data["enable_uring"] = f.read().strip()
    except OSError:
        data["enable_uring"] = "absent"
    if not args.many_mounts_only:
        ctx = Ctx()
        ctx.layers, ctx.workdir = os.path.join(args.workdir, "layers"), args.workdir
        build_layers(ctx.layers, args.files, args.big_mib, args.wide)
        ctx.big, ctx.runtime, ctx.tarball = args.big_mib, args.runtime, os.path.join(ctx.layers, "tree.tar")
        data.update(run_workloads(args, impls, ctx))
    if not args.no_many_mounts:
        data["mounts"] = many_mounts(args, impls)


def finish(args, data, png, mounts_png, data_file):
    data["goals"] = goal_rows(data)
    if data.get("workloads"):
        print(workloads_table(data, data["meta"]["impls"]))
    if data.get("mounts"):
        print(mounts_table(data["mounts"], data["meta"]["impls"]))
    print(goals_table(data))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(data_file, "w") as f:
        json.dump(data, f, indent=1)
    write_report(data, args, args.output, png, mounts_png, data_file)
    if data.get("workloads"):
        draw_chart(data, png)
    if data.get("mounts"):
        draw_mounts_chart(data["mounts"], mounts_png)


if __name__ == "__main__":
    main()
