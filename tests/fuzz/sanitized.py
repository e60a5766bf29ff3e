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
every run. Exit status: trial's, or 2 with one line when the toolchain has
no ASan runtime or the build fails.
"""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from typing import Dict, List

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


def sanitized_environment() -> Dict[str, str]:
    """The environment of the build and the run."""
    env = dict(os.environ)
    env.update({
        "TIGERTUNNEL_SANITIZE": "1",
        "TIGERTUNNEL_REQUIRE_COMPILED": "1",
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:strict_init_order=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    })
    env.pop("TIGERTUNNEL_PURE", None)
    return env


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
    env = sanitized_environment()
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace",
                            "--force"], cwd=destination, env=env, timeout=600)
    if build.returncode != 0:
        print(f"fuzz: the sanitizer build failed (status {build.returncode})",
              file=sys.stderr)
        return 2
    env["LD_PRELOAD"] = " ".join(filter(None, [runtime, env.get("LD_PRELOAD", "")]))
    print(f"fuzz: running {' '.join(tests)} in {destination} with LD_PRELOAD={runtime}",
          flush=True)
    run = subprocess.run([sys.executable, "-m", "twisted.trial", "--random=0", *tests],
                         cwd=destination, env=env, timeout=RUN_LIMIT)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
