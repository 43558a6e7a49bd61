"""Peak memory of a piece of work, measured in a fresh Python process (Linux).

Linux resets a process's peak resident set when "5" is written to /proc/self/clear_refs, so the
peak after the work (VmHWM), minus the resident set just before it (VmRSS), is what it added.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_growth_mb(setup: str, work: str) -> float:
    """Run ``setup``, then ``work``, in a fresh interpreter; the peak RSS growth (MB) of ``work``."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = "\n".join([
        "import sys", f"sys.path.insert(0, {here!r})", "from peak_memory import rss_mb",
        textwrap.dedent(setup),
        "open('/proc/self/clear_refs', 'w').write('5')", "before = rss_mb('VmRSS')",
        textwrap.dedent(work),
        "print(rss_mb('VmHWM') - before)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])
