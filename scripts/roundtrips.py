#!/usr/bin/env python3
"""FUSE requests per entry, by opcode, of the writing workloads of
scripts/bench.py (create 10k, untar, rm -rf of the lower tree), from the
daemon's request counters; their time beside kernel overlayfs,
interleaved; and how long the daemon takes per request, by opcode (from the
kernel's fuse_request_send/end tracepoints: queued to answered, the
daemon's wakeup included). Layers, upper and work dir live on a tmpfs this
script mounts and unmounts. As root, after `cargo build --release`:

  scripts/roundtrips.py count [--files N] [--only create,untar,rm]
  scripts/roundtrips.py time [--rounds R] [--unionfs BIN[,BIN...]]
  scripts/roundtrips.py latency [--unionfs BIN[,BIN...]]
"""
import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

WORKLOADS = {"create": bench.create_small, "untar": bench.untar, "rm": bench.rm_tree}


class Ctx:
    """What bench's workloads get: the tarball, and `timed`, which keeps the
    time of the part the workload times."""

    def __init__(self, tarball):
        self.tarball, self.elapsed = tarball, None

    def timed(self, fn):
        self.elapsed, result = bench.timed(fn)
        return self.elapsed, result


class Mount:
    """A fresh upper and work dir over the layers, mounted by IMPL (`kernel`
    or a unionfs binary); with LOG the daemon logs its request counts there."""

    def __init__(self, root, layers, impl, log=None):
        self.root, self.layers, self.impl, self.log = root, layers, impl, log

    def __enter__(self):
        run = os.path.join(self.root, "run")
        bench.sh(f"rm -rf {run}")
        up, wk, self.mnt = (os.path.join(run, n) for n in ("upper", "work", "mnt"))
        for d in (up, wk, self.mnt):
            os.makedirs(d)
        if self.impl == "kernel":
            command = "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}".format
        else:
            debug = f" --debug --log-file {self.log}" if self.log else ""
            command = (self.impl + " mount --lower {} --upper {} --work {} {}" + debug).format
            # The counts alone, not a line per failed request.
            os.environ["RUST_LOG"] = "unionfs=warn,unionfs::fuse::stats=debug"
        impl = bench.Impl(self.impl, command)
        impl.mount(self.layers, up, wk, self.mnt)
        self.pid = impl.daemon_pid(self.mnt)
        return self

    def counts(self):
        """The daemon's counts so far (it logs them on SIGUSR1)."""
        size = os.path.getsize(self.log)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.time() + 5
        while time.time() < deadline:
            time.sleep(0.05)
            with open(self.log) as f:
                f.seek(size)
                m = re.search(r"requests=(.*total=\d+)", f.read())
            if m:
                return {k: int(v) for k, v in (kv.rsplit("=", 1) for kv in m.group(1).split())}
        raise RuntimeError(f"no request counts in {self.log}")

    def cpu_ns(self):
        """CPU time of the daemon's threads so far."""
        if not self.pid:
            return 0
        total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total

    def __exit__(self, *exc):
        bench.unmount(self.mnt)
        bench.wait_gone([self.pid])


def entries(root, layers, name, ctx):
    """Entries a workload makes or removes: files it creates, archive
    members, names of the merged tree (counted on kernel overlayfs)."""
    if name == "create":
        return 10000
    if name == "untar":
        return int(bench.sh(f"tar -tf {ctx.tarball} | wc -l"))
    with Mount(root, layers, "kernel") as m:
        return int(bench.sh(f"find {m.mnt}/tree | wc -l"))


def count(args, root, layers, ctx):
    for name in args.only.split(","):
        log = os.path.join(root, "daemon.log")
        n = entries(root, layers, name, ctx)
        with Mount(root, layers, args.unionfs, log) as m:
            before = m.counts()
            WORKLOADS[name](m.mnt, ctx)
            time.sleep(0.2)  # RELEASE and FORGET come after the syscalls return
            after = m.counts()
        print(f"{name}: {n} entries, requests per entry")
        for op, total in after.items():
            if total - before.get(op, 0):
                print(f"  {op:36s} {total - before.get(op, 0):8d} {(total - before.get(op, 0)) / n:6.2f}")


def spread(values):
    return f"{min(values):7.3f} {statistics.median(values):7.3f} {max(values):7.3f}"


def timing(args, root, layers, ctx):
    impls = ["kernel"] + args.unionfs.split(",")
    for name in args.only.split(","):
        n = entries(root, layers, name, ctx)
        seconds = {i: [] for i in impls}
        cpu = {i: [] for i in impls}
        for _ in range(args.rounds):
            for impl in impls:
                with Mount(root, layers, impl) as m:
                    c0 = m.cpu_ns()
                    WORKLOADS[name](m.mnt, ctx)
                    cpu[impl].append((m.cpu_ns() - c0) / 1e3 / n)
                seconds[impl].append(ctx.elapsed)
        print(f"{name}: {n} entries, {args.rounds} rounds; seconds min median max, "
              "kernel/this (medians), daemon CPU us/entry min median max")
        kernel = statistics.median(seconds["kernel"])
        for impl in impls:
            ratio = kernel / statistics.median(seconds[impl])
            print(f"  {impl:40s} {spread(seconds[impl])}  {ratio:5.2f}  {spread(cpu[impl])}")
        sys.stdout.flush()


TRACEFS = "/sys/kernel/tracing"
LINE = re.compile(r"\s(\d+\.\d+): fuse_request_(send|end): connection \d+ req (\d+)(?: opcode \d+ \((\w+)\))?")


def write(path, value):
    with open(path, "w") as f:
        f.write(value)


def latencies(trace):
    """Microseconds from send to end of each request in a trace, by opcode
    (FORGET and BATCH_FORGET, which get no answer, are not there)."""
    sent, by_op = {}, {}
    for line in trace.splitlines():
        m = LINE.search(line)
        if not m:
            continue
        ts, kind, req, op = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        if kind == "send":
            sent[req] = (ts, op)
        elif req in sent:
            t0, op = sent.pop(req)
            by_op.setdefault(op, []).append((ts - t0) * 1e6)
    return by_op


def latency(args, root, layers, ctx):
    mounted = not os.path.exists(os.path.join(TRACEFS, "events"))
    if mounted:
        bench.sh(f"mount -t tracefs tracefs {TRACEFS}")
    inst = os.path.join(TRACEFS, "instances", f"unionfs-roundtrips-{os.getpid()}")
    os.mkdir(inst)
    try:
        write(os.path.join(inst, "buffer_size_kb"), "65536")
        for name in args.only.split(","):
            print(f"{name}: microseconds from queued to answered, min median p90, by opcode")
            for impl in args.unionfs.split(","):
                with Mount(root, layers, impl) as m:
                    conn = os.minor(os.stat(m.mnt).st_dev)
                    for event in ("fuse_request_send", "fuse_request_end"):
                        write(os.path.join(inst, "events/fuse", event, "filter"), f"connection == {conn}")
                    write(os.path.join(inst, "trace"), "")
                    write(os.path.join(inst, "events/fuse/enable"), "1")
                    WORKLOADS[name](m.mnt, ctx)
                    time.sleep(0.2)
                    write(os.path.join(inst, "events/fuse/enable"), "0")
                with open(os.path.join(inst, "trace")) as f:
                    by_op = latencies(f.read())
                for op, v in sorted(by_op.items(), key=lambda kv: -len(kv[1])):
                    if len(v) >= 100:
                        v.sort()
                        print(f"  {impl:40s} {op:20s} {len(v):7d} {v[0]:6.1f} {statistics.median(v):6.1f}"
                              f" {v[len(v) * 9 // 10]:6.1f}")
    finally:
        os.rmdir(inst)
        if mounted:
            bench.unmount(TRACEFS)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["count", "time", "latency"])
    ap.add_argument("--files", type=int, default=20000, help="small files in the lower tree")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="create,untar,rm")
    ap.add_argument("--unionfs", default=os.path.join(bench.ROOT, "target/release/unionfs"),
                    help="binary (count), or binaries separated by commas (time, latency)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="unionfs-roundtrips-")
    bench.sh(f"mount -t tmpfs -o size=4g tmpfs {root}")
    try:
        layers = os.path.join(root, "layers")
        bench.build_layers(layers, args.files, 0, 0)
        ctx = Ctx(os.path.join(layers, "tree.tar"))
        {"count": count, "time": timing, "latency": latency}[args.mode](args, root, layers, ctx)
    finally:
        bench.unmount(root)
        os.rmdir(root)


if __name__ == "__main__":
    main()
