"""Progress of long steps on stderr: tqdm's bar on a terminal, plain lines in a log.

    with progress.Bar(total, "pruning dpp_edge", unit="node") as bar:
        ...
        bar.update(1)          # one more unit done
        bar.update_to(done)    # or: `done` units done so far (a progress(done) callback)
        bar.update_to(done, total)   # ... of a total the callback reports

A bar redrawn with carriage returns turns into one endless line when stderr is a file or a
pipe, so there each bar writes a plain line when it starts, when it ends, and in between
whenever another tenth of the work is done or `interval` seconds have passed since its last
line (in-between lines only once the step has run `quiet` seconds, 2 by default):

    pruning dpp_edge:  50%| 3/6 node [4.1 s]
"""
import sys
import time


def _count(n, unit_scale):
    if not unit_scale:
        return f"{n:g}"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{suffix}"
    return f"{n:g}"


class Bar:
    """A tqdm-like progress bar: context manager, update(n), update_to(done), close()."""

    def __init__(self, total, desc, unit="it", unit_scale=False, stream=None, interval=10.0,
                 quiet=2.0, clock=time.monotonic):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self._clock, self._interval, self._quiet = clock, interval, quiet
        self._start = self._last_time = clock()
        self._last_tenth = 0
        self._written = None        # n at the last line written
        self._closed = False
        isatty = getattr(self.stream, "isatty", None)
        self._tqdm = None
        if isatty is not None and isatty():
            from tqdm import tqdm
            self._tqdm = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                              file=self.stream)
        else:
            self._write(self._start)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n=1):
        """`n` more units done."""
        self.update_to(self.n + n)

    def update_to(self, done, total=None):
        """`done` units done so far (of `total`, if it is known only now)."""
        step, self.n = done - self.n, done
        if total is not None and total != self.total:
            self.total = total
            if self._tqdm is not None:
                self._tqdm.total = total
        if self._tqdm is not None:
            self._tqdm.update(step)
            return
        tenth = int(10 * done / self.total) if self.total else 0
        now = self._clock()
        if now - self._start < self._quiet:
            return
        if tenth > self._last_tenth or now - self._last_time >= self._interval:
            self._last_tenth = max(tenth, self._last_tenth)
            self._write(now)

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._written != self.n:
            self._write(self._clock())

    def _write(self, now):
        self._last_time, self._written = now, self.n
        percent = f"{100 * self.n / self.total:3.0f}%" if self.total else "  ?%"
        total = _count(self.total, self.unit_scale) if self.total else "?"
        self.stream.write(f"{self.desc}: {percent}| {_count(self.n, self.unit_scale)}/{total} "
                          f"{self.unit} [{now - self._start:.1f} s]\n")
        self.stream.flush()
