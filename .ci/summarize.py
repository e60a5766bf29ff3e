"""Turn the tox log into one 'N passed, N failed, N skipped' line (exit 1 on any failure or if none ran).

The counts are trial's, added up over every environment that ran trial (the
compiled and the pure-Python suite, the fuzz). A tox environment that
failed without a failing trial summary of its own (mypy, a build that
failed, a run killed by a sanitizer's abort) counts as one failed test, so
the line never reads as a clean run when tox did not pass. The fuzz's case
count (its 'fuzz: N cases ...' line) is repeated on stderr.
"""

import re
import sys
from typing import Dict, List

# tox 4 starts every command of an environment with "ENV: commands[N]> ..."
# and ends with one "  ENV: OK (...)" or "  ENV: FAIL code N (...)" line each.
SECTION = re.compile(r"^([\w.-]+): commands(?:_pre|_post)?\[\d+\]>", re.M)
ENV_FAILED = re.compile(r"^\s+([\w.-]+): FAIL\b", re.M)
FUZZ = re.compile(r"^fuzz: (\d+) cases in [\d.]+ s .*?, seed \d+, (\d+) differences", re.M)


def sections(text: str) -> Dict[str, str]:
    """The log of each tox environment that ran a command, by name."""
    found: Dict[str, List[str]] = {}
    marks = list(SECTION.finditer(text))
    for mark, following in zip(marks, marks[1:] + [None]):
        end = following.start() if following is not None else len(text)
        found.setdefault(mark.group(1), []).append(text[mark.start():end])
    return {name: "".join(parts) for name, parts in found.items()}


def main(path: str) -> int:
    text = open(path, errors="replace").read()
    ran = re.findall(r"^Ran (\d+) tests? in", text, re.M)
    results = re.findall(r"^(PASSED|FAILED) \(([^)]*)\)", text, re.M)
    if not ran or not results:
        print("0 passed, 1 failed")
        print("ci: no trial summary found: the test command did not run",
              file=sys.stderr)
        return 1
    total = sum(int(n) for n in ran)
    counts: Dict[str, int] = {}
    for _, fields in results:
        for k, v in re.findall(r"(\w+)=(\d+)", fields):
            counts[k] = counts.get(k, 0) + int(v)
    failed = (counts.get("failures", 0) + counts.get("errors", 0)
              + counts.get("unexpectedSuccesses", 0))
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    skipped = counts.get("skips", 0)
    logs = sections(text)
    for env in ENV_FAILED.findall(text):
        if not re.search(r"^FAILED \(", logs.get(env, ""), re.M):
            failed += 1
            print(f"ci: tox environment {env} failed without a failing test "
                  f"summary: counted as 1 failed", file=sys.stderr)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    for cases, differences in FUZZ.findall(text):
        print(f"ci: the fuzz ran {cases} cases, {differences} differences", file=sys.stderr)
    if total == 0:
        print("ci: zero tests ran", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
