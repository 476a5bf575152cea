"""progress.py: status lines on a terminal and in a log file, and the time left for a grid."""
import io

import pytest

import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_line_is_rewritten_in_place_and_covers_a_longer_one():
    term = Terminal()
    line = progress.StatusLine(term)
    line.status("step 1/9 loss 0.6931", force=True)
    line.status("step 2/9", force=True)
    line.say("done")
    assert term.getvalue() == "\rstep 1/9 loss 0.6931\rstep 2/9            \ndone\n"


def test_a_log_file_gets_whole_lines_at_most_every_interval(monkeypatch):
    log = io.StringIO()
    clock = iter([100.0, 101.0, 100.0 + progress.LOG_INTERVAL + 0.5])
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    line = progress.StatusLine(log)
    line.status("first", force=True)          # the first step is always shown
    line.status("too soon")
    line.status("later")
    assert log.getvalue() == "first\nlater\n"
    quiet = progress.StatusLine(log, quiet=True)
    quiet.say("nothing")
    quiet.status("nothing", force=True)
    assert log.getvalue() == "first\nlater\n"


def test_grid_clock_prices_each_run_at_its_method_s_speed():
    clock = progress.GridClock([("ft", 10), ("lnsr", 10), ("ft", 10), ("lnsr", 10)])
    assert clock.seconds_left(0, 0, 0.0) is None                  # nothing measured yet
    # 4 of ft's 10 steps in 8 s: 2 s a step for the rest of it and for every run (no other speed).
    assert clock.seconds_left(0, 4, 8.0) == pytest.approx(6 * 2 + 30 * 2)
    clock.finished(0, train_seconds=20.0, total_seconds=25.0)     # ft: 2 s a step, 5 s outside
    # lnsr at 5 s a step so far; later ft at 2, later lnsr at the mean of what is measured.
    left = clock.seconds_left(1, 2, 10.0)
    assert left == pytest.approx(8 * 5 + 10 * 2 + 10 * (2 + 5) / 2 + 5 * 3)
    clock.skipped(2)                                              # another worker has it
    assert clock.seconds_left(1, 2, 10.0) == pytest.approx(8 * 5 + 10 * (2 + 5) / 2 + 5 * 2)


def test_format_seconds():
    assert progress.format_seconds(59) == "0:59" and progress.format_seconds(3725) == "1:02:05"
