"""What TB-aware accounting costs per frame: ``python -m tigertunnel.tools.tbcost``.

Times :meth:`TBWatch.frame <tigertunnel.wire.tbwatch.TBWatch.frame>` with
``timeit`` over the frames of each shipped TigerBeetle trace, feeding the
real :class:`~tigertunnel.ops.tbmetrics.TBRecorder` (histograms, counters),
and prints the best of ``--repeat`` runs in nanoseconds per frame, next to
the cost of the bare loop. The single-replica trace is all requests and
replies (the pairing path); the 3-replica trace is mostly replica traffic
(ping, pong, commit: the counting path).
"""

import argparse
import sys
import timeit
from typing import Dict, List, Tuple

from tigertunnel.ops.tbmetrics import TBRecorder
from tigertunnel.tools.traces import CLUSTER3, SINGLE, load_trace
from tigertunnel.wire.tbwatch import FROM_TUNNEL, TO_TUNNEL


def measure(trace: str, number: int, repeat: int) -> Dict[str, float]:
    """ns per frame of ``trace``: ``watch`` (accounting and loop) and ``loop`` (the loop alone)."""
    frames: List[Tuple[int, bytes]] = [
        (TO_TUNNEL if f.dir == "up" else FROM_TUNNEL, f.data[:256])
        for f in load_trace(trace)]
    recorder = TBRecorder("bench")
    frame = recorder.watch.frame

    def watched() -> None:
        for direction, header in frames:
            frame(direction, header, 1.0)

    def bare() -> None:
        for direction, header in frames:
            pass

    per = 1e9 / (number * len(frames))
    return {"frames": float(len(frames)),
            "watch": min(timeit.repeat(watched, number=number, repeat=repeat)) * per,
            "loop": min(timeit.repeat(bare, number=number, repeat=repeat)) * per}


def main(argv: List[str]) -> int:
    """Print ns/frame for each trace; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m tigertunnel.tools.tbcost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--number", type=int, default=2000,
                        help="passes over a trace per run (default 2000)")
    parser.add_argument("-r", "--repeat", type=int, default=5,
                        help="runs; the best counts (default 5)")
    args = parser.parse_args(argv)
    if args.number < 1 or args.repeat < 1:
        parser.error(f"--number and --repeat must be at least 1, not "
                     f"{args.number} / {args.repeat}")
    for trace in (SINGLE, CLUSTER3):
        got = measure(trace, args.number, args.repeat)
        sys.stdout.write(f"{trace}: {got['frames']:.0f} frames, "
                         f"{got['watch']:.0f} ns/frame ({got['loop']:.0f} ns of it "
                         f"the bare loop)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
