"""`voice-agent serve` with tracemalloc driven by files, for the memory
benchmarks (benchmarks/memory.py --trace, benchmarks/soak.py --trace): run as
`python -c TRACED_SERVER serve ...` with VOICE_AGENT_BENCH_TRACE=PATH. When
PATH.start appears, tracemalloc starts (4 frames); when PATH.go appears, the
Python allocations made since and still alive are written to PATH: a `total`
line, then the 25 largest sites (`size count file:line`), then the 10 largest
by 4-frame traceback (`size count` and an indented frame a line)."""

from __future__ import annotations

import textwrap

TRACED_SERVER = textwrap.dedent(
    """
    import os, sys, threading, time, tracemalloc
    trace = os.environ.get("VOICE_AGENT_BENCH_TRACE")
    def wait_for(path):
        while not os.path.exists(path):
            time.sleep(0.2)
    if trace:
        def watch():
            wait_for(trace + ".start")
            tracemalloc.start(4)
            wait_for(trace + ".go")
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            stats = snap.statistics("lineno")
            with open(trace + ".tmp", "w") as f:
                total = sum(s.size for s in stats)
                f.write(f"total {total}\\n")
                for s in stats[:25]:
                    frame = s.traceback[0]
                    f.write(f"{s.size} {s.count} {frame.filename}:{frame.lineno}\\n")
                for s in snap.statistics("traceback")[:10]:
                    f.write(f"{s.size} {s.count}\\n")
                    for frame in s.traceback:
                        f.write(f"    {frame.filename}:{frame.lineno}\\n")
            os.replace(trace + ".tmp", trace)
        threading.Thread(target=watch, daemon=True).start()
    from voice_agent.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)
