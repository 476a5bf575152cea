"""Status lines for long commands, and the time left for a whole grid of runs.

On a terminal one status line is rewritten in place as the work goes; in a log file (stderr
redirected) a plain line is written at the first step of each phase, then every
`LOG_INTERVAL` seconds, and at the end. Phase messages ("loading ...", a run's result) are
whole lines either way.
"""
import sys
import time

LOG_INTERVAL = 10.0          # seconds between status lines in a log file
TTY_INTERVAL = 0.2           # at most this often on a terminal


def format_seconds(s) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StatusLine:
    def __init__(self, stream=None, quiet=False):
        self.quiet = quiet                # shows nothing (the ranks other than 0 of one run)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_print = 0.0
        self.open = False            # a status line is on the terminal, not yet ended
        self.width = 0               # its length, so that a shorter one covers it whole

    def say(self, text: str):
        """A whole line: a phase starting, a result."""
        if self.quiet:
            return
        self.end()
        print(text, file=self.stream, flush=True)

    def status(self, text: str, force: bool = False):
        """The current state; shown now if forced, else when enough time has passed."""
        if self.quiet:
            return
        now = time.time()
        if not force and now - self.last_print < (TTY_INTERVAL if self.tty else LOG_INTERVAL):
            return
        self.last_print = now
        if self.tty:
            text = text[:160]
            print("\r" + text.ljust(self.width), end="", file=self.stream, flush=True)
            self.open, self.width = True, len(text)
        else:
            print(text, file=self.stream, flush=True)

    def end(self):
        if self.open:
            print(file=self.stream, flush=True)
            self.open, self.width = False, 0


class GridClock:
    """Time left for every run of a command.

    Each run's remaining training steps are priced at the seconds per step measured for its
    method (the run in progress: its own speed so far), or, for a method not yet seen, at the
    mean speed of the steps timed so far; each run also pays the mean time measured outside its
    training loop (loading the model onto the device, evaluation).
    """

    def __init__(self, plan):
        self.plan = list(plan)               # [(method, steps)], in the order they run
        self.timed = {}                      # method -> [training seconds, steps]
        self.overheads = []                  # seconds outside the training loop, per run

    def skipped(self, index: int):
        """A run another worker trains: nothing left to do here."""
        self.plan[index] = (self.plan[index][0], 0)

    def finished(self, index: int, train_seconds: float, total_seconds: float, steps_timed: int | None = None):
        """steps_timed: the steps the train_seconds were spent on, if not all of the run's (a run
        that went on from a checkpoint)."""
        method, steps = self.plan[index]
        seconds_steps = self.timed.setdefault(method, [0.0, 0])
        seconds_steps[0] += train_seconds
        seconds_steps[1] += steps if steps_timed is None else steps_timed
        self.overheads.append(max(0.0, total_seconds - train_seconds))

    def seconds_left(self, index: int, steps_done: int, run_seconds: float,
                     steps_timed: int | None = None) -> float | None:
        """None until there is a first speed to go by. run_seconds were spent on steps_timed of
        the steps_done (all of them by default; fewer when the run went on from a checkpoint)."""
        method, steps = self.plan[index]
        known = {m: s / n for m, (s, n) in self.timed.items() if n}
        timed = steps_done if steps_timed is None else steps_timed
        now = run_seconds / timed if timed else None
        rates = list(known.values()) + ([now] if now else [])
        if not rates:
            return None
        default = sum(rates) / len(rates)
        rate = lambda m: known.get(m, default)
        left = (steps - steps_done) * (now or rate(method))
        left += sum(n * rate(m) for m, n in self.plan[index + 1:])
        overhead = sum(self.overheads) / len(self.overheads) if self.overheads else 0.0
        return left + overhead * sum(1 for _, n in self.plan[index:] if n)
