"""The terminal of ``statsd-qmp top``: curses, keys, prompts and the refresh loop.

Owns: the screen (set up and always restored by ``curses.wrapper``, so a crash or ``q``
leaves the terminal usable), painting :func:`topscreen.render`'s lines with attributes,
waiting for keys (``get_wch`` with a timeout), resizes (``KEY_RESIZE``), the line prompts of
``f``, ``g``, ``p`` and ``s``, the help screen, and one worker thread that polls the daemon
when asked, so that keys are answered at once even while a poll waits on a slow or vanished
daemon (a blocking call in the key loop would freeze the screen for the socket timeout).

curses is the standard library's and is what kvm_stat uses; it needs no event loop of its
own, so ``top`` adds no dependency and no second async framework to the project.

Must not import trio, the server, the registry or :mod:`top` (which starts it).
"""

from __future__ import annotations

import contextlib
import curses
import locale
import queue
import threading
import time
from collections.abc import Callable

from .topmodel import DaemonUnavailable, Sample, StatInfo, StatKey, take_baseline
from .topscreen import (
    MAX_INTERVAL,
    MIN_INTERVAL,
    Frame,
    Line,
    ViewState,
    help_lines,
    render,
)

ESCAPE = "\x1b"
KEY_WAIT = 0.1  # longest wait for a key while a poll is under way, in seconds

PollResult = tuple[Sample, dict[StatKey, StatInfo]] | str  # a sample and its schema, or why not


class BackgroundPoller:
    """Runs ``poll`` on a worker thread each time :meth:`request` is called."""

    def __init__(
        self, poll: Callable[[], Sample], schema_of: Callable[[], dict[StatKey, StatInfo]]
    ) -> None:
        self._poll = poll
        self._schema_of = schema_of
        self._wanted = threading.Event()
        self._results: queue.SimpleQueue[PollResult] = queue.SimpleQueue()
        self.busy = False
        # A daemon thread: a poll stuck in a socket timeout must not hold up quitting.
        threading.Thread(target=self._run, name="top-poll", daemon=True).start()

    def request(self) -> None:
        self.busy = True
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            result: PollResult
            try:
                result = (self._poll(), self._schema_of())
            except DaemonUnavailable as exc:
                result = str(exc)
            self._results.put(result)

    def results(self) -> list[PollResult]:
        found = []
        with contextlib.suppress(queue.Empty):
            while True:
                found.append(self._results.get_nowait())
        if found:
            self.busy = False
        return found


def _attributes() -> dict[str, int]:
    return {
        "title": curses.A_BOLD,
        "info": curses.A_NORMAL,
        "alert": curses.A_REVERSE | curses.A_BOLD,
        "header": curses.A_REVERSE,
        "normal": curses.A_NORMAL,
        "selected": curses.A_REVERSE | curses.A_BOLD,
        "total": curses.A_BOLD,
    }


class Terminal:
    def __init__(
        self,
        screen: curses.window,
        poll: Callable[[], Sample],
        schema_of: Callable[[], dict[StatKey, StatInfo]],
        state: ViewState,
        first: Sample,
        *,
        unicode: bool,
    ) -> None:
        self.screen = screen
        self.poller = BackgroundPoller(poll, schema_of)
        self.state = state
        self.unicode = unicode
        self.frame = Frame(schema_of(), first, None, {})
        self.attributes = _attributes()
        self.next_poll = time.monotonic() + state.interval

    # --- drawing ----------------------------------------------------------------------------

    def paint(self, lines: list[Line]) -> None:
        height, width = self.screen.getmaxyx()
        self.screen.erase()
        for row, line in enumerate(lines[:height]):
            # The bottom-right cell cannot be written without scrolling: stop one short.
            room = width - 1 if row == height - 1 else width
            with contextlib.suppress(curses.error):
                self.screen.addnstr(row, 0, line.text, room, self.attributes[line.style])
        self.screen.refresh()

    def draw(self) -> None:
        height, width = self.screen.getmaxyx()
        self.paint(render(self.state, self.frame, width, height, unicode=self.unicode))

    # --- data -------------------------------------------------------------------------------

    def apply(self, result: PollResult) -> None:
        if isinstance(result, str):
            self.frame.error = result
            return
        sample, schema = result
        self.frame.error = None
        self.frame.schema = schema
        self.frame.previous, self.frame.current = self.frame.current, sample

    # --- input ------------------------------------------------------------------------------

    def prompt(self, question: str) -> str | None:
        """A line of input on the status line; None when Escape cancels it."""
        width = self.screen.getmaxyx()[1]
        text = ""
        curses.curs_set(1)
        self.screen.timeout(-1)
        try:
            while True:
                shown = f" {question}{text}"[: width - 1]
                self.screen.move(1, 0)
                self.screen.clrtoeol()
                with contextlib.suppress(curses.error):
                    self.screen.addstr(1, 0, shown, curses.A_BOLD)
                self.screen.refresh()
                key = self.screen.get_wch()
                if key in ("\n", "\r", curses.KEY_ENTER):
                    return text
                if key == ESCAPE:
                    return None
                if key in ("\x7f", "\b", curses.KEY_BACKSPACE):
                    text = text[:-1]
                elif key == curses.KEY_RESIZE:
                    self.draw()
                elif isinstance(key, str) and key.isprintable():
                    text += key
        finally:
            curses.curs_set(0)

    def show_help(self) -> None:
        height, width = self.screen.getmaxyx()
        self.paint(help_lines(width, height))
        self.screen.timeout(-1)
        self.screen.get_wch()

    def ask_filter(self) -> None:
        current = self.state.filter_text
        answer = self.prompt(f"Regex filter (now {current!r}, Enter for none): ")
        if answer is None:
            return
        try:
            self.state.set_filter(answer)
            self.state.message = ""
        except Exception as exc:
            self.state.message = f'"{answer}": not a valid regular expression ({exc})'

    def ask_guest(self, by_pid: bool) -> None:
        sample = self.frame.current
        names = sorted(sample.vms) if sample is not None else []
        if by_pid:
            answer = self.prompt("VMM pid (Enter or 0 for all guests): ")
        else:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            answer = self.prompt(f"Guest name (Enter for all; {shown}): ")
        if answer is None:
            return
        answer = answer.strip()
        if answer in ("", "0"):
            self.state.select_guest(None)
            self.state.message = ""
            return
        if by_pid:
            if not answer.isdigit():
                self.state.message = f'"{answer}": not a pid'
                return
            found = (
                [vm.name for vm in sample.vms.values() if vm.pid == int(answer)] if sample else []
            )
        else:
            found = [answer] if answer in names else []
        if not found:
            self.state.message = f'"{answer}": not an active guest'
            return
        self.state.select_guest(found[0])
        self.state.message = ""

    def ask_interval(self) -> None:
        answer = self.prompt(
            f"Interval in seconds, {MIN_INTERVAL}-{MAX_INTERVAL} (now {self.state.interval:g}): "
        )
        if answer is None or not answer.strip():
            return
        try:
            value = float(answer)
        except ValueError:
            self.state.message = f'"{answer}": not a number'
            return
        if not MIN_INTERVAL <= value <= MAX_INTERVAL:
            self.state.message = f'"{answer}": must be {MIN_INTERVAL}-{MAX_INTERVAL}'
            return
        self.state.interval = value
        self.state.message = ""
        self.next_poll = time.monotonic() + value

    def handle(self, key: str | int) -> bool:
        """Apply one key; False when it asks to quit."""
        state = self.state
        if key in ("q", "Q"):
            return False
        if key not in (curses.KEY_RESIZE,):
            state.message = "" if key not in ("v",) else state.message
        if key == "f":
            self.ask_filter()
        elif key == "c":
            state.clear()
        elif key in ("g", "p"):
            self.ask_guest(by_pid=key == "p")
        elif key == "b":
            state.toggle_guests()
        elif key == "v":
            state.message = state.toggle_vcpus() or ""
        elif key == "o":
            state.sort_by_total = not state.sort_by_total
        elif key == "r":
            if self.frame.current is not None:
                self.frame.baseline = take_baseline(self.frame.current)
        elif key == "s":
            self.ask_interval()
        elif key == "h":
            self.show_help()
        elif key in ("\n", "\r", curses.KEY_ENTER, curses.KEY_RIGHT):
            state.enter()
        elif key in (curses.KEY_LEFT, curses.KEY_BACKSPACE, "\x7f", ESCAPE):
            state.back()
        elif key == curses.KEY_UP:
            state.move(-1)
        elif key == curses.KEY_DOWN:
            state.move(1)
        elif key == curses.KEY_PPAGE:
            state.move(-(self.screen.getmaxyx()[0] - 5))
        elif key == curses.KEY_NPAGE:
            state.move(self.screen.getmaxyx()[0] - 5)
        elif key == curses.KEY_HOME:
            state.cursor = 0
        elif key == curses.KEY_RESIZE:
            curses.update_lines_cols()
        else:
            self.next_poll = time.monotonic()  # kvm_stat: any other key refreshes at once
        return True

    def loop(self) -> int:
        self.draw()
        while True:
            now = time.monotonic()
            if now >= self.next_poll and not self.poller.busy:
                self.poller.request()
                # On a fixed grid, unless a poll ran over it (a slow or vanished daemon).
                self.next_poll += self.state.interval
                if self.next_poll <= now:
                    self.next_poll = now + self.state.interval
            results = self.poller.results()
            for result in results:
                self.apply(result)
            if results:
                self.draw()
            wait = self.next_poll - time.monotonic()
            if self.poller.busy:
                wait = min(wait, KEY_WAIT)
            self.screen.timeout(max(int(wait * 1000), 1))
            try:
                key = self.screen.get_wch()
            except curses.error:
                continue  # no key within the wait
            if not self.handle(key):
                return 0
            self.draw()


def run_terminal(
    poll: Callable[[], Sample],
    schema_of: Callable[[], dict[StatKey, StatInfo]],
    state: ViewState,
    first: Sample,
) -> int:
    """Run the full-screen view until ``q`` (or Ctrl-C); returns the exit status."""
    locale.setlocale(locale.LC_ALL, "")
    unicode = locale.getpreferredencoding(False).upper().replace("-", "") == "UTF8"

    def main(screen: curses.window) -> int:
        curses.curs_set(0)
        curses.set_escdelay(25)  # Escape cancels a prompt without a second's wait
        screen.keypad(True)
        with contextlib.suppress(curses.error):
            curses.use_default_colors()
        terminal = Terminal(screen, poll, schema_of, state, first, unicode=unicode)
        try:
            return terminal.loop()
        except KeyboardInterrupt:
            return 0

    return curses.wrapper(main)
