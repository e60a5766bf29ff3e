"""Run tests under AddressSanitizer and UndefinedBehaviorSanitizer (``tox -e fuzz``).

Usage: ``python -m tests.fuzz.sanitized DIRECTORY [TEST ...]`` from the
checkout. It copies the package and the tests into DIRECTORY, builds the
extension there in place with ``TIGERTUNNEL_SANITIZE=1`` (``setup.py``),
and runs trial there (``tests.fuzz`` unless tests are named) with the ASan
runtime preloaded into Python, which is not built with it. The
checkout's own build is left alone: a sanitized module only loads into a
process that preloads the runtime.

The run uses ``PYTHONMALLOC=malloc`` (so Python's objects, whose buffers
the extension reads and writes, come from ASan's checked allocator),
aborts at the first error of either sanitizer, and has leak detection off:
CPython does not free everything at exit, so LeakSanitizer reports on
every run. Trial runs two workers (``-j2``: the fuzz is cut into two
shards); afterwards the sanitizers' reports are printed, and, when all
passed, one ``fuzz: N cases ...`` line for the shards together. Exit
status: trial's (1 if a sanitizer reported anything), or 2 with one line
when the toolchain has no ASan runtime or the build fails.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from typing import Dict, List, Optional

#: What is copied from the checkout: enough to build the extension and run the tests.
TREE = ["tigertunnel", "tests", "twisted", "setup.py", "setup.cfg", "pyproject.toml",
        "README.rst"]
IGNORE = shutil.ignore_patterns("*.so", "__pycache__", "_trial_temp*", ".hypothesis",
                                "dropin.cache")
#: The whole run is bounded even if a test hangs (seconds).
RUN_LIMIT = 1800


def asan_runtime() -> str:
    """The path of the compiler's shared ASan runtime; ``RuntimeError`` when there is none."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    try:
        path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot ask {cc} for its ASan runtime: {e}") from None
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"{cc} has no shared ASan runtime (libasan.so)")
    return os.path.realpath(path)


def sanitized_environment(tree: str) -> Dict[str, str]:
    """The environment of the build and the run in ``tree``.

    The sanitizers write their reports into ``tree/sanitizer/`` (a trial
    worker's stderr ends up in a file under ``_trial_temp``);
    :func:`main` prints them.
    """
    env = dict(os.environ)
    logs = os.path.join(tree, "sanitizer")
    env.update({
        "TIGERTUNNEL_SANITIZE": "1",
        "TIGERTUNNEL_REQUIRE_COMPILED": "1",
        "TIGERTUNNEL_FUZZ_REPORT": os.path.join(tree, "fuzz-report"),
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:strict_init_order=1:"
                        f"log_path={logs}/asan",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={logs}/ubsan",
    })
    env.pop("TIGERTUNNEL_PURE", None)
    return env


def print_sanitizer_reports(tree: str) -> int:
    """Print every report the sanitizers wrote in ``tree``; return how many there were."""
    logs = os.path.join(tree, "sanitizer")
    names = sorted(os.listdir(logs)) if os.path.isdir(logs) else []
    for name in names:
        with open(os.path.join(logs, name), errors="replace") as f:
            print(f"fuzz: sanitizer report {name}:\n{f.read()}", flush=True)
    return len(names)


def fuzz_line(tree: str) -> Optional[str]:
    """One line for what the fuzz's shards ran, or ``None`` if none reported."""
    directory = os.path.join(tree, "fuzz-report")
    shards = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        with open(os.path.join(directory, name)) as f:
            shards.append(json.load(f))
    if not shards:
        return None
    counts: Dict[str, int] = {}
    for shard in shards:
        for target, n in shard["counts"].items():
            counts[target] = counts.get(target, 0) + n
    detail = ", ".join(f"{target} {n}" for target, n in counts.items())
    return (f"fuzz: {sum(s['cases'] for s in shards)} cases in "
            f"{max(s['seconds'] for s in shards):.1f} s "
            f"(cpu {sum(s['cpu'] for s in shards):.1f} s, {len(shards)} processes), "
            f"seed {shards[0]['seed']}, 0 differences ({detail})")


def copy_tree(source: str, destination: str) -> None:
    """Copy what :data:`TREE` names from ``source`` into an empty ``destination``."""
    shutil.rmtree(destination, ignore_errors=True)
    os.makedirs(destination)
    for name in TREE:
        path = os.path.join(source, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(destination, name), ignore=IGNORE)
        elif os.path.exists(path):
            shutil.copy2(path, destination)


def main(argv: List[str]) -> int:
    if len(argv) < 1:
        print("usage: python -m tests.fuzz.sanitized DIRECTORY [TEST ...]", file=sys.stderr)
        return 2
    destination, tests = os.path.abspath(argv[0]), argv[1:] or ["tests.fuzz"]
    try:
        runtime = asan_runtime()
    except RuntimeError as e:
        print(f"fuzz: {e}", file=sys.stderr)
        return 2
    copy_tree(os.getcwd(), destination)
    env = sanitized_environment(destination)
    os.makedirs(env["TIGERTUNNEL_FUZZ_REPORT"])
    os.makedirs(os.path.join(destination, "sanitizer"))
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace",
                            "--force"], cwd=destination, env=env, timeout=600)
    if build.returncode != 0:
        print(f"fuzz: the sanitizer build failed (status {build.returncode})",
              file=sys.stderr)
        return 2
    env["LD_PRELOAD"] = " ".join(filter(None, [runtime, env.get("LD_PRELOAD", "")]))
    print(f"fuzz: running {' '.join(tests)} in {destination} with LD_PRELOAD={runtime}",
          flush=True)
    run = subprocess.run([sys.executable, "-m", "twisted.trial", "--random=0", "-j2", *tests],
                         cwd=destination, env=env, timeout=RUN_LIMIT)
    reports = print_sanitizer_reports(destination)
    line = fuzz_line(destination)
    if run.returncode == 0 and reports == 0 and line is not None:
        print(line, flush=True)
    return run.returncode or (1 if reports else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
