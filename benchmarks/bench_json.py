"""The JSON records of a benchmark run (``bench_loss_gpu.py``, ``bench_step_gpu.py``): each printed as
one line when it comes and, where the run was given a path, the whole list rewritten there after
each one, so that a run cut short (a timeout, a crash, a lost machine) keeps what it had measured."""

from __future__ import annotations

import json
import os
import platform


class Records(list):
    """A list of records that ``emit`` writes to ``out`` (when not None) after each one."""

    def __init__(self, out: str | None = None):
        super().__init__()
        self.out = out

    def save(self) -> None:
        if not self.out:
            return
        tmp = f"{self.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(self, f, indent=1)
        os.replace(tmp, self.out)  # a reader never sees half a file


def cpu_name() -> str:
    """This machine's processor, as /proc/cpuinfo names it (else what ``platform`` knows), and its cores."""
    name = platform.processor() or platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def emit(records: list, **kw) -> dict:
    records.append(kw)
    print(json.dumps(kw), flush=True)
    if isinstance(records, Records):
        records.save()
    return kw
