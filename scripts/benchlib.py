"""Shared by the benchmark scripts: run a command, timing it and measuring its own peak RSS."""
import os
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
