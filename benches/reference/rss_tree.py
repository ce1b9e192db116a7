"""Runs a command in its own session and prints the peak, over time, of
the summed resident memory of every process in that session, sampled
every 0.2 s: the memory of a run that starts helper processes (Ray's
raylet, GCS and workers) as well as of one that does not. Two sums: RSS
(pages shared between processes, e.g. libtorch mapped by every worker,
counted once per process) and PSS (each shared page split among its
processes: what the tree costs the machine). `/usr/bin/time -v` reports
only the largest single process's RSS.

    python rss_tree.py -- COMMAND ARGS...
"""

import os
import subprocess
import sys
import time


def session_memory(sid):
    """(summed RSS, summed PSS, processes) of session `sid`, in bytes."""
    rss = pss = n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getsid(int(pid)) != sid:
                continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            n += 1
        except (OSError, ValueError):
            pass
    return rss, pss, n


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    child = subprocess.Popen(argv, start_new_session=True)
    peak_rss = peak_pss = most = 0
    start = time.time()
    while child.poll() is None:
        rss, pss, n = session_memory(child.pid)
        peak_rss, peak_pss, most = max(peak_rss, rss), max(peak_pss, pss), max(most, n)
        time.sleep(0.2)
    # Ray may leave processes behind in the session: stop them.
    subprocess.run(["pkill", "-s", str(child.pid)], check=False)
    print(f"rss_tree: exit {child.returncode}, {time.time() - start:.1f} s, up to {most} processes, "
          f"peak summed RSS {peak_rss / 2**20:.0f} MiB, peak summed PSS {peak_pss / 2**20:.0f} MiB",
          flush=True)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
