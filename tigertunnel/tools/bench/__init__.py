"""``tigertunnel bench``: what does the tunnel cost a TigerBeetle cluster?

Starts, on 127.0.0.1 and as separate processes, a TB-frame echo backend
(``python -m tigertunnel.tools.echo``), a tunnel server and a tunnel client (the
console script, exactly as in production), and drives them from this
process with a closed-loop load generator: every session keeps one TB frame
in flight (TB clients have one request in flight), waits for its echo,
checks it byte for byte and sends the next.

Each cell (frame size x concurrent sessions x PSK/KEM) runs the same
workload **directly against the echo backend and through the tunnel, in one
run**, and reports frames/s, MB/s, round-trip p50/p99, the ratio to direct,
and the CPU seconds (user+sys, from ``/proc``) the two tunnel processes
consumed per 1,000 round trips and per GB — the figure that stays stable on
a noisy shared machine. The echo backend's and the load generator's CPU per
1,000 round trips are reported too, to show they are not the bottleneck.
At the end: peak RSS of each tunnel process, and RSS with 1,000 idle
sessions.

* :mod:`.run`: the options, the processes, and the order of the cells;
* :mod:`.load`: the load generator (one measured workload on one path);
* :mod:`.report`: the results table and summary lines;
* :mod:`.churn`: ``--churn N``, instead of the cells: N short sessions of
  every kind (clean, abandoned mid-frame, cut by the backend, cut by the
  pool, refused) and the resident memory of each tunnel end after a warm-up
  and per 1,000 sessions.
"""

from tigertunnel.tools.bench.run import BenchOptions, run, run_bench

__all__ = ["BenchOptions", "run", "run_bench"]
