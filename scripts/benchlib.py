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


def llama_ppl(bin_dir, path, text, threads):
    """Hamlet-protocol perplexity of a GGUF by llama-perplexity: ctx 512, 32 chunks."""
    import re
    _, err, _, _ = run([f"{bin_dir}/llama-perplexity", "-m", path, "-f", text, "-c", "512", "--chunks", "32", "-t", threads])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", err).group(1))
