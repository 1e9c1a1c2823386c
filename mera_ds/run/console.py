"""What a person sees of a run on the console, and where everything else goes.

The console shows, for each step, a progress bar while it runs (its name, step/steps, loss,
tokens/s, ETA; a status line until a training job reports its first step) and one line when it
ends (what it produced, its wall time); and warnings and errors, each in one line naming the log
file that says more. The rest goes to files under RUN/logs/ (paths from run.layout):

    RUN/logs/mera.log                    this command's own log at DEBUG: what `-v` shows
    RUN/logs/<step>/rank-<r>.log         the output of rank r of a step (stdout, stderr, logging)

`mera -v` shows everything on the console as it comes, as before (RUN/logs/ then holds mera.log
only). Where the console is not a terminal (CI, `ray job submit`, Slurm), a bar would write a
carriage return per update: a plain progress line is printed instead each 10% of a job's steps,
and at least every 30 s while it advances.

Progress comes from the training loop's `progress` callback (train.recipe.train_loop): called
in this process by the in-process executor, relayed from Ray Train's rank 0 by the Ray executor.
An s3:// run directory's log files are written locally and uploaded when their step ends.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Iterator, Optional

from tqdm import tqdm

from mera_ds.errors import MeraError
from mera_ds.storage import is_remote, url_to_fs

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The console's own lines (steps' summaries, progress lines, workers' warnings): always shown.
CONSOLE = logging.getLogger("mera_ds.console")
PLAIN_EVERY = 0.1       # of a job's steps, between plain progress lines
PLAIN_SECONDS = 30.0    # at most between plain progress lines while a job advances

log = logging.getLogger("mera_ds.run")
_console: Optional["Console"] = None
_capture: Optional[str] = None  # the log file this process's output goes to now


def setup(verbose: bool) -> None:
    """Called by the `mera` command before it runs anything: whether -v was given."""
    global _console
    _console = Console(verbose)


def open_log(url: str) -> None:
    """Start a run's log (RUN/logs/mera.log) and, without -v, keep the console to the steps,
    warnings and errors. Once per command; nothing outside the `mera` command."""
    if _console is not None and _console.log_url is None:
        _console.open(url)


def quiet() -> bool:
    """Whether steps keep their output off the console (in their log files): not with -v."""
    return _console is not None and not _console.verbose


def tell(line: str) -> None:
    """One line for the person at the console (on rank 0), and the log."""
    if _console is None or _console.rank == 0:
        CONSOLE.info(line)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """The console while step `name` runs: its status line or progress bar; the run's log is
    uploaded when it ends (an s3:// run directory)."""
    if _console is None:
        yield
        return
    try:
        with _console.running(name) if _console.shows_steps else contextlib.nullcontext():
            yield
    finally:
        _console.sync()


def progress() -> Optional[Callable]:
    """The running step's progress callback for train.recipe.run_job, if the console shows it."""
    return _console.progress() if _console is not None else None


def deliver(event: tuple) -> None:
    """An event relayed from a step's process on the cluster (cluster.connect.send):
    ("update", *progress arguments) or ("record", step, rank, level, message, log file)."""
    kind, *args = event
    if kind == "update" and _console is not None:
        _console.update(*args)
    elif kind == "record":
        name, rank, level, message, url = args
        tell(f"{name} rank {rank}: {level} {message} (see {url})")


def surfaces(record: logging.LogRecord) -> bool:
    """Whether a log record reaches a quiet console: mera's warnings and anyone's errors, but
    not Ray's own (its failures reach the console as the step's error line)."""
    if record.name == "ray" or record.name.startswith("ray."):
        return False
    return record.levelno >= logging.ERROR or (
        record.levelno >= logging.WARNING and record.name.startswith("mera_ds"))


@contextlib.contextmanager
def own_output(url: str) -> Iterator[None]:
    """A step run in this process: its output into its log file `url` when the console is
    quiet, and its error naming that file."""
    if not quiet():
        yield
        return
    try:
        with captured(url):
            yield
    except MeraError as e:
        raise type(e)(f"{e} (see {url})") from e


@contextlib.contextmanager
def captured(url: Optional[str], forward: Optional[Callable[[str, str], None]] = None):
    """This process's output into the log file `url` while the block runs: file descriptors 1
    and 2 (so C++ and subprocess output too) and logging at INFO, with the traceback of an error
    that ends the block. Records that would surface on a console also go to
    `forward(level, message)`. None: nothing captured."""
    global _capture
    if url is None:
        yield
        return
    local = _local_copy(url)
    root = logging.getLogger()
    handlers, level, previous = root.handlers[:], root.level, _capture
    sys.stdout.flush()
    sys.stderr.flush()
    with open(local, "a", buffering=1) as f:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        to_file = logging.StreamHandler(f)
        to_file.setFormatter(logging.Formatter(FORMAT))
        to_file.setLevel(logging.INFO)
        # The file replaces the handlers that wrote to the standard streams (Ray's): the same
        # records would come twice through fd 2.
        root.handlers = [h for h in handlers if not _on_std_stream(h)] + [to_file]
        if forward:
            root.addHandler(_Forward(forward))
        if level > logging.INFO:
            root.setLevel(logging.INFO)
        _capture = url
        try:
            yield
        except BaseException:
            traceback.print_exc(file=f)
            raise
        finally:
            _capture = previous
            root.handlers, root.level = handlers, level
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            if local != url:
                _upload(local, url)


class PlainProgress:
    """A job's progress as plain lines, for a console that is not a terminal: one when another
    10% of the steps are done, or PLAIN_SECONDS after the last while the job advances."""

    def __init__(self, name: str, steps: int, start: int, clock=time.monotonic):
        self.name, self.steps, self.n, self.start = name, steps, start, start
        self.every = max(1, math.ceil(steps * PLAIN_EVERY))
        self.clock, self.t0 = clock, clock()
        self.last_n, self.last_t = start, self.t0
        self.loss = self.tokens_per_s = None

    def update(self, step: int, loss: Optional[float] = None,
               tokens_per_s: Optional[float] = None) -> Optional[str]:
        """The line to print now, if one is due."""
        self.n, now = step, self.clock()
        if loss is not None:
            self.loss, self.tokens_per_s = loss, tokens_per_s
        due = step >= self.steps or step // self.every > self.last_n // self.every or (
            step > self.last_n and now - self.last_t >= PLAIN_SECONDS)
        if not due:
            return None
        self.last_n, self.last_t = step, now
        line = f"{self.name} step {step}/{self.steps}"
        if self.loss is not None:
            line += f" loss {self.loss:.4f} {self.tokens_per_s:.0f} tok/s"
        if self.start < step < self.steps:
            eta = (self.steps - step) * (now - self.t0) / (step - self.start)
            line += f" eta {tqdm.format_interval(eta)}"
        return line


class _Bar:
    """A job's progress as a tqdm bar on a terminal."""

    def __init__(self, name: str, steps: int, start: int, stream):
        self.bar = tqdm(total=steps, initial=start, desc=name, unit="step", file=stream,
                        leave=False, dynamic_ncols=True)

    @property
    def n(self) -> int:
        return self.bar.n

    def update(self, step: int, loss: Optional[float] = None,
               tokens_per_s: Optional[float] = None) -> None:
        if loss is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:.0f} tok/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class Console:
    """The console of one `mera` command (module functions above reach it)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.rank = int(os.environ.get("RANK", "0"))  # under a launcher, rank 0 shows steps
        self.shows_steps = not verbose and self.rank == 0
        self.log_url = self.local_log = None
        self.stream = sys.stderr
        self.lock = threading.Lock()
        # The running steps (several at once under the dependency schedule): each one's tqdm
        # status line, _Bar or PlainProgress (None: none yet).
        self.bars: dict[str, object] = {}
        self.here = threading.local()  # .step: the step this thread runs

    def open(self, url: str) -> None:
        root = logging.getLogger()
        if self.rank == 0:  # under a launcher, the other ranks write their step logs only
            self.log_url, self.local_log = url, _local_copy(url)
            to_file = logging.FileHandler(self.local_log)
            to_file.setFormatter(logging.Formatter(FORMAT))
            root.addHandler(to_file)
            root.setLevel(logging.DEBUG)
        if self.verbose:
            return
        # The console stays where stderr is now, whatever a step in this process captures.
        self.stream = _duplicate(sys.stderr)
        for h in root.handlers[:]:
            if _on_std_stream(h):
                root.removeHandler(h)
        root.addHandler(_ConsoleHandler(self))

    def write(self, line: str) -> None:
        tqdm.write(line, file=self.stream)

    def tty(self) -> bool:
        """A terminal that bars can be drawn on (one that says it has no width is not)."""
        try:
            return self.stream.isatty() and os.get_terminal_size(self.stream.fileno()).columns > 0
        except (AttributeError, OSError, ValueError):
            return False

    @contextlib.contextmanager
    def running(self, name: str) -> Iterator[None]:
        with self.lock:
            self.bars[name] = tqdm(desc=f"{name}: running", bar_format="{desc}",
                                   file=self.stream, leave=False) if self.tty() else None
        self.here.step = name
        try:
            yield
        finally:
            self.here.step = None
            with self.lock:
                self._close_bar(name)
                del self.bars[name]

    def progress(self) -> Optional[Callable]:
        name = getattr(self.here, "step", None)
        if not self.shows_steps or name is None:
            return None
        return functools.partial(self.update, name)

    def update(self, name: str, step: int, steps: int, loss: Optional[float] = None,
               tokens_per_s: Optional[float] = None) -> None:
        """Progress of step `name`'s job: its first call (step = where it starts), then one
        per training step; a call at a step already passed is a restarted attempt."""
        lines = []
        with self.lock:
            if name not in self.bars:
                return
            bar = self.bars[name]
            if not isinstance(bar, (_Bar, PlainProgress)) or step <= bar.n:
                self._close_bar(name)
                if step:
                    lines.append(f"{name}: resuming at step {step} of {steps}")
                bar = self.bars[name] = (_Bar(name, steps, step, self.stream) if self.tty()
                                         else PlainProgress(name, steps, step))
            lines.append(bar.update(step, loss, tokens_per_s))
        for line in filter(None, lines):
            tell(line)

    def _close_bar(self, name: str) -> None:
        bar = self.bars[name]
        if bar is not None and not isinstance(bar, PlainProgress):
            bar.close()
        self.bars[name] = None

    def see(self) -> Optional[str]:
        """The log file that holds what this process logs now."""
        return _capture or self.log_url

    def sync(self) -> None:
        """Upload the log of an s3:// run directory."""
        if self.local_log is not None and self.local_log != self.log_url:
            for h in logging.getLogger().handlers:
                h.flush()
            _upload(self.local_log, self.log_url, keep=True)


class _ConsoleHandler(logging.Handler):
    """A quiet console: the console's own lines, and records that surface in one line."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.name == CONSOLE.name:
                line = record.getMessage()
            elif surfaces(record):
                line = f"{record.levelname} {_first_line(record.getMessage())}"
                if self.console.see():
                    line += f" (see {self.console.see()})"
            else:
                return
            self.console.write(line)
        except Exception:
            self.handleError(record)


class _Forward(logging.Handler):
    """Records that surface, to a callable (a worker's relay to the driver's console)."""

    def __init__(self, forward: Callable[[str, str], None]):
        super().__init__(logging.WARNING)
        self.forward = forward

    def emit(self, record: logging.LogRecord) -> None:
        if surfaces(record):
            try:
                self.forward(record.levelname, _first_line(record.getMessage()))
            except Exception:
                self.handleError(record)


def _first_line(message: str) -> str:
    return (message.strip().splitlines() or [""])[0]


def _on_std_stream(handler: logging.Handler) -> bool:
    """A handler that writes to file descriptor 1 or 2 (basicConfig's, Ray's)."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler,
                                                                    logging.FileHandler):
        return False
    try:
        return handler.stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError):
        return handler.stream in (sys.stdout, sys.stderr)


def _duplicate(stream):
    """A stream on what `stream` writes to now, unaffected if its descriptor is redirected."""
    try:
        return os.fdopen(os.dup(stream.fileno()), "w", buffering=1,
                         encoding=getattr(stream, "encoding", None), errors="replace")
    except (AttributeError, OSError, ValueError):  # not a real file (pytest's capture)
        return stream


def _local_copy(url: str) -> str:
    """Where a log file is written: `url` itself, or a temporary file for an s3:// url."""
    if is_remote(url):
        fd, local = tempfile.mkstemp(prefix="mera-log-", suffix=".log")
        os.close(fd)
        return local
    os.makedirs(os.path.dirname(url), exist_ok=True)
    return url


def _upload(local: str, url: str, keep: bool = False) -> None:
    """Put a log file written locally at its s3:// url; a failure is only logged (the log is
    not worth a step)."""
    try:
        fs, path = url_to_fs(url)
        fs.put_file(local, path)
    except Exception as e:  # noqa: BLE001 - a log upload never fails the step
        log.warning("%s: log not uploaded: %s", url, e)
    if not keep:
        with contextlib.suppress(OSError):
            os.remove(local)
