"""Shared by the benchmark scripts: run a command, timing it and measuring its own peak RSS."""
import json
import os
import re
import subprocess
import sys
import tempfile
import time


def run(cmd):
    """Runs `cmd`; returns (stdout, stderr, wall seconds, peak RSS in MB). Exits on failure."""
    # wait4 gives this child's own peak RSS (getrusage(CHILDREN) would report the max of all).
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=out, stderr=err)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read().decode(), err.read().decode()
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    return stdout, stderr, wall, usage.ru_maxrss / 1024


def loadavg():
    """The 1-minute load average (/proc/loadavg)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def repeated(commands, repeats):
    """Times each of `commands` (name -> argv) `repeats` times, alternating them so that a change
    in the machine's load hits all alike. Returns name -> dict(median_s, min_s, max_s, spread (max
    over min), walls, peak_rss_mb), with the load average before and after under "load"."""
    walls = {name: [] for name in commands}
    rss = {name: 0.0 for name in commands}
    before = loadavg()
    for _ in range(repeats):
        for name, cmd in commands.items():
            _, _, wall, peak = run(cmd)
            walls[name].append(wall)
            rss[name] = max(rss[name], peak)
    after = loadavg()
    out = {}
    for name, w in walls.items():
        s = sorted(w)
        median = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
        out[name] = dict(median_s=median, min_s=s[0], max_s=s[-1], spread=s[-1] / s[0], walls=w,
                         peak_rss_mb=rss[name])
    out["load"] = dict(before=before, after=after)
    return out


class Bench:
    """What the benchmarks share, from the environment scripts/bench-common.sh exports: the
    shrink binary (SHRINK), llama.cpp's tools (BIN, where built), the thread count (THREADS), the
    output folder (OUT), and the scoring protocol: Hamlet, ctx 512, 32 chunks."""

    def __init__(self):
        env = os.environ
        self.shrink, self.bin_dir = env["SHRINK"], env.get("BIN")
        self.threads, self.out = env["THREADS"], env["OUT"]
        self.hamlet = self.asset("shakespeare:eval")

    def shrink_run(self, *args):
        """`shrink --threads THREADS ARGS…` through `run`."""
        return run([self.shrink, "--threads", self.threads, *args])

    def asset(self, name):
        """The cached path of a shrink asset (`shrink data path NAME`), fetched if missing."""
        return subprocess.check_output([self.shrink, "data", "path", name]).decode().split()[0]

    def llama_ppl(self, path):
        """Perplexity of a GGUF on Hamlet by llama-perplexity."""
        _, err, _, _ = run([f"{self.bin_dir}/llama-perplexity", "-m", path, "-f", self.hamlet,
                            "-c", "512", "--chunks", "32", "-t", self.threads])
        return float(re.search(r"Final estimate: PPL = ([0-9.]+)", err).group(1))

    def shrink_ppl(self, path):
        """Perplexity of a model on Hamlet by `shrink eval`."""
        so, _, _, _ = self.shrink_run("eval", path, "--text", "shakespeare:eval", "--ctx", "512",
                                      "--chunks", "32", "--json")
        return json.loads(so)["perplexity"]["ppl"]
