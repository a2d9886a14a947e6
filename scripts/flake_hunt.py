#!/usr/bin/env python3
"""Run chosen tests many times, optionally with the CPU kept busy, and count the failures per test.

Why: a test that depends on timing passes on an idle machine and fails at random under load (issue #17: 1 of
435 failed once in CI). Usage:

    python scripts/flake_hunt.py --repeat 20 --stress 4 -- tests/test_server.py -k "limit or idle"

`--repeat N` runs every selected test N times in one pytest process (each repetition a separate test item);
`--stress K` keeps K `stress-ng --cpu` workers running meanwhile (Debian: apt-get install stress-ng);
`--processes P` runs P such pytest processes side by side (a second suite in parallel is load too).
Prints one line per test id with its pass/fail counts and the load average seen.
"""
import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGIN = '''
import pytest
REPEAT = int(__import__("os").environ["FLAKE_HUNT_REPEAT"])

def pytest_generate_tests(metafunc):
    metafunc.fixturenames.append("flake_hunt_round")
    metafunc.parametrize("flake_hunt_round", range(REPEAT), indirect=False)
'''


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--stress", type=int, default=0, help="stress-ng --cpu workers during the runs")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--show-output", action="store_true", help="print the pytest output even when all pass")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    pytest_args = [a for a in args.pytest_args if a != "--"]
    stress = None
    if args.stress:
        if not shutil.which("stress-ng"):
            sys.exit("stress-ng not found: apt-get install stress-ng")
        stress = subprocess.Popen(["stress-ng", "--cpu", str(args.stress), "--quiet"], stdout=subprocess.DEVNULL)
    try:
        with tempfile.TemporaryDirectory() as plugin_dir:
            (pathlib.Path(plugin_dir) / "flake_hunt_plugin.py").write_text(PLUGIN)
            env = {**os.environ, "FLAKE_HUNT_REPEAT": str(args.repeat),
                   "PYTHONPATH": os.pathsep.join([plugin_dir, str(ROOT), os.environ.get("PYTHONPATH", "")])}
            command = [sys.executable, "-m", "pytest", "-p", "flake_hunt_plugin", "-q", "-rA",
                       "-p", "no:cacheprovider", *pytest_args]
            runs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for _ in range(args.processes)]
            outputs = [run.communicate()[0] for run in runs]
    finally:
        if stress is not None:
            stress.terminate()
            stress.wait()
    counts = collections.defaultdict(collections.Counter)
    for output in outputs:
        for outcome, test_id in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", output, flags=re.M):
            counts[re.sub(r"\[\d+\]$|\d+\]$", "", test_id).rstrip("[-")][outcome] += 1
    load = os.getloadavg()
    for test_id, counter in sorted(counts.items()):
        print(f"{test_id}: {counter['PASSED']} passed, {counter['FAILED'] + counter['ERROR']} failed")
    print(f"load average at the end: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min); {os.cpu_count()} CPUs; "
          f"stress-ng workers: {args.stress}; pytest processes: {args.processes}")
    for output in outputs:
        if args.show_output:
            print(output)
        elif "FAILED" in output or "ERROR" in output:
            print(output[-6000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
