"""How our programs run and end: one error type, one exit path, and the signal story.

Every program (mixtral.py, chat.py, convert.py, bench.py, server.py) runs its body through
`run_program`, and ends there: 0; 1 with one line `error: what, where, what to do` for bad input
(MixtralError), an allocation refused, or a rank that is gone; 130 after Ctrl-C; 143 after SIGTERM.
Anything else is a bug of ours and keeps its traceback.

Ctrl-C (SIGINT) and SIGTERM, phase by phase:

1. Imports. Each program's first lines set SIGINT to its default action before importing MLX, so a
   Ctrl-C while the libraries load ends the process quietly (no KeyboardInterrupt traceback from
   inside some import).
2. Start. `run_program` turns SIGTERM into `Terminated` (mlx.launch ends the other ranks so when
   one fails) and SIGINT into KeyboardInterrupt. A rank other than 0 ignores Ctrl-C: rank 0 decides
   for all (`quiet_unless_rank0`).
3. Loading. MLX reads .npz through Python's zipfile, called from C++, and an exception raised in
   there can vanish (a destructor's close() swallows it). `signals_held` holds both signals back
   and delivers them between tensors, where no MLX call is under way.
4. Running. chat.py owns Ctrl-C through `CtrlC`: at a prompt it is KeyboardInterrupt, while a reply
   streams it is a stop request checked between tokens and prefill chunks. A watchdog thread makes
   sure a Ctrl-C landing inside CPython's readline window is not left pending.
5. A child process. convert.py converts in a child it answers for (`convert.supervise`): it passes
   signals on and reports the child's death (SIGSEGV, the OOM killer) in one line.
6. Stuck. Python runs a handler only when the main thread next runs Python code, and a main thread
   inside MLX may never come back: an mx.eval waiting on a collective whose peer is gone can wait
   forever. A watcher thread learns of each signal through Python's wakeup fd. As a SIGTERM comes it
   does what was asked with `at_end` (server.py: every open stream's final event); a process that
   has not decided its exit `TERM_GRACE` seconds after it ends at once, with the usual line and 143
   (a write under signals_held is cut then: it leaves a temporary file, never a half-written one).
7. Exit. Once the outcome is decided both signals are ignored, what was asked with `at_end` is done
   (again), its line is printed, and the exit is given `EXIT_GRACE` seconds (an mx.synchronize after
   a lost rank can wait forever, too). Every MLX array is freed, and we wait until MLX's I/O threads
   have dropped their file reads, before the interpreter finalizes: a thread that takes the GIL of a
   finalizing interpreter aborts the process.

A signal's exception raised inside a C extension's import comes out as another exception (sentencepiece
makes it "ImportError: initialization failed"); after a SIGTERM, any failure is the SIGTERM's.
"""

import atexit
import contextlib
import gc
import os
import signal
import sys
import threading
import time
import zipfile

import mlx.core as mx


class MixtralError(Exception):
    """Bad input from the user (a file, a flag, a config value): the CLIs print it as one line."""


class EveryRankError(MixtralError):
    """A MixtralError that every rank meets alike (a plan they all computed): only rank 0 says it."""


class Terminated(BaseException):
    """SIGTERM: mlx.launch ends the other ranks this way when one of them fails."""

    received = False


TERM_GRACE = 10.0  # seconds from a SIGTERM to the end of the process, whatever the main thread is doing
EXIT_GRACE = 10.0  # seconds the exit may take once its outcome is decided


OUT_OF_MEMORY = (
    "free memory, or need less: a smaller --max-context, 4-bit weights, or several machines (README: Memory)"
)


def run_program(body, *args, interrupted="interrupted", out_of_memory=OUT_OF_MEMORY):
    """Run a program's body and exit: 0; 1 with one line `error: ...` for a MixtralError (bad input,
    a file, a flag) or a rank that is gone; 130 after Ctrl-C, 143 after SIGTERM. Any other exception
    is a bug of ours and keeps its traceback. Under mlx.launch, only rank 0 speaks; another rank
    prints only its own errors, marked with its rank.

    Every MLX array is freed before the interpreter shuts down: one still alive then can be released
    on an MLX thread that needs the GIL of a finalizing interpreter, and the process aborts
    ("terminate called without an active exception", 1 exit in 5 after loading, on a loaded machine).
    """
    _watch_signals()  # first: a Ctrl-C while the thread starts still meets the import guard's default action
    signal.signal(signal.SIGTERM, _terminated)
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:  # as the import guard left it; chat.py has its own
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, message = _outcome(body, args, interrupted, out_of_memory)
        _ignore_signals()  # the exit is decided: nothing may interrupt it now
    except BaseException:
        # Terminated, raised while another outcome was being handled (mlx.launch after a lost rank), or
        # whatever it became on its way up: raised inside a C extension's import, it surfaces as
        # "ImportError: initialization failed". After a SIGTERM, every failure is the SIGTERM's.
        _ignore_signals()
        if not Terminated.received:
            raise
        code, message = 143, terminated_line()
    _ending.acquire()  # the watcher's forced exit can no longer cut in: this one is bounded below
    threading.Thread(target=_exit_within, args=(EXIT_GRACE, code), daemon=True).start()
    _run_at_end(message or "the program ended")
    if message:
        _say(message)
    with contextlib.suppress(OSError, ValueError):  # what is said is out before anything can hang
        sys.stdout.flush()
    gc.collect()  # the handler is done: the frames that held the model are gone
    with contextlib.suppress(RuntimeError):  # MLX out of threads or memory: the outcome stands as it is
        mx.synchronize()
    _wait_for_npz_readers()
    sys.exit(code)


def _say(message: str):
    """The program's last line, marked with the rank under mlx.launch (read from the environment: a
    forced exit cannot wait on MLX to say it)."""
    rank = launched_rank()
    print(message if not rank else f"[rank {rank}] {message}", file=sys.__stderr__, flush=True)


def launched_rank():
    """This process's rank under mlx.launch (or mpirun), from the environment; None when run alone."""
    return next((int(os.environ[v]) for v in ("MLX_RANK", "OMPI_COMM_WORLD_RANK") if v in os.environ), None)


def _exit_within(seconds: float, code: int):
    time.sleep(seconds)
    os._exit(code)


def _wait_for_npz_readers(timeout: float = 2.0):
    """MLX's I/O threads drop a finished .npz read only after the mx.eval that needed it has returned.
    Dropping it closes a Python file object, GIL taken; a thread that tries to take the GIL while the
    interpreter finalizes aborts the process ("terminate called without an active exception"; 5 exits
    in 90 after a Ctrl-C during loading, here). So sleep, the GIL released, until no zip member is
    open and no thread other than ours is inside Python code (closing one)."""
    ours = {t.ident for t in threading.enumerate()}
    end = time.monotonic() + timeout
    while time.monotonic() < end and (
        any(isinstance(o, zipfile.ZipExtFile) for o in gc.get_objects()) or sys._current_frames().keys() - ours
    ):
        time.sleep(0.002)


TERMINATED = "stopped (SIGTERM: another rank failed, or the run was ended)"  # under mlx.launch
TERMINATED_ALONE = "stopped (SIGTERM)"  # a process of its own: there is no other rank to blame


def terminated_line() -> str:
    return TERMINATED if launched_rank() is not None else TERMINATED_ALONE


def _outcome(body, args, interrupted, out_of_memory):
    try:
        body(*args)
        return 0, None
    except (Exception, KeyboardInterrupt, Terminated) as e:
        e = _signal_behind(e) or e
        if (
            not isinstance(e, (MixtralError, KeyboardInterrupt, Terminated))
            and not is_lost_peer(e)
            and not is_out_of_memory(e)
        ):
            raise
        # What the failure leaves (a zip writer that cannot close on a full disk) is freed with it:
        # it must not add a traceback-shaped report of what is said here in one line.
        sys.unraisablehook = lambda unraisable: None
        if is_out_of_memory(e):
            return 1, f"error: out of memory ({str(e).strip().splitlines()[-1]}); {out_of_memory}"
        if isinstance(e, EveryRankError) and launched_rank():
            with contextlib.suppress(Terminated):  # mlx.launch ending us once rank 0 has said it
                time.sleep(2.0)  # rank 0 says it: leave it the time to, before mlx.launch ends it for our exit
            return 1, None
        if isinstance(e, MixtralError):
            return 1, f"error: {e}"
        if isinstance(e, RuntimeError):
            return 1, f"error: another rank stopped ({e}); the run is over: see that rank's message"
        return (130, interrupted) if isinstance(e, KeyboardInterrupt) else (143, terminated_line())


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, or MLX's RuntimeError when an allocation (or a thread, under ulimit -v) is refused."""
    text = str(e).lower()
    return (
        isinstance(e, MemoryError)
        or isinstance(e, RuntimeError)
        and any(
            w in text
            for w in (
                "malloc",
                "unable to allocate",
                "resource limit",
                "resource temporarily unavailable",
                "out of memory",
            )
        )
    )


def _signal_behind(e):
    """The KeyboardInterrupt or Terminated that a library re-raised as e (raised inside a C extension's
    import, as sentencepiece's is at load time, a signal's exception becomes ImportError from it)."""
    while e is not None and not isinstance(e, (KeyboardInterrupt, Terminated)):
        e = e.__cause__
    return e


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM back while a model loads. MLX reads .npz through Python's zipfile, called
    from C++ inside mx.load, mx.eval and mx.savez, and a KeyboardInterrupt raised in there can vanish
    (a destructor's close() swallows it): 3 Ctrl-Cs in 90 during loading were lost here, and chat.py
    went on to its prompt. Yields deliver(), which raises what came so far; call it where no MLX call
    is under way. The rest is delivered on leaving."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield lambda: None
        return
    came, owners = [], {}

    def deliver():
        for sig, owner in owners.items():
            signal.signal(sig, owner)
        owners.clear()
        if came:  # the first is enough: the program ends on it, or its owner (chat.py) acts on it once
            sig, came[:] = came[0], []
            signal.raise_signal(sig)  # to its owner's handler, as if it came now

    for sig in (signal.SIGINT, signal.SIGTERM):
        owners[sig] = signal.signal(sig, lambda sig, _: came.append(sig))
    try:
        yield lambda: came and deliver()
    finally:
        deliver()


def _ignore_signals():
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _terminated(*_):
    Terminated.received = True
    raise Terminated


_ending = threading.Lock()  # held by whoever ends the process: run_program, or the watcher
_at_end = []  # what must be done before the process ends, however it ends (at_end)


def at_end(fn):
    """Have fn(why) run once the process's end is decided, before it exits: from run_program's exit
    path (why: the line it ends on), and as soon as a SIGTERM comes (why: "SIGTERM"), from the watcher
    thread, even while the main thread is stuck inside MLX. server.py gives every open stream its final
    event this way. fn may run more than once, on either thread, and must bound its wait."""
    _at_end.append(fn)


def _run_at_end(line: str):
    for fn in _at_end:
        with contextlib.suppress(Exception):  # the exit goes on whatever a hook does
            fn(line)


_on_sigint = []  # CtrlC's kick, once installed


def _watch_signals():
    """Start the watcher thread (from the main thread, once): it learns of each signal through
    Python's wakeup fd, which the C-level handler writes to even while the main thread is stuck."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(r,), name="signals", daemon=True).start()


def _watch(fd: int):
    while True:
        came = os.read(fd, 256)
        if signal.SIGTERM in came and not _ending.locked():
            # The process ends on it, whatever the main thread does: what must be done before the end
            # (server.py: every open stream's final event) is done now. A main thread stuck in a
            # collective whose peer is gone would otherwise hold it until the deadline below.
            _run_at_end("SIGTERM")
            end = time.monotonic() + TERM_GRACE
            while not _ending.locked() and time.monotonic() < end:
                time.sleep(0.05)
            if _ending.acquire(blocking=False):  # still undecided: the main thread is stuck, end without it
                _say(terminated_line())
                os._exit(143)
        if signal.SIGINT in came:
            for kick in _on_sigint:
                kick()


def quiet_unless_rank0():
    """Under mlx.launch, only rank 0 prints; the others follow it and ignore Ctrl-C (rank 0 decides)."""
    if mx.distributed.init().rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def is_lost_peer(e: Exception) -> bool:
    """A collective that failed because another rank is gone (the ring backend says so in seconds)."""
    return isinstance(e, RuntimeError) and str(e).startswith(("[ring]", "[mpi]", "[jaccl]", "[nccl]"))


class CtrlC:
    """The program's one SIGINT handler: KeyboardInterrupt, or, while a reply streams, a stop request.

    Python runs a handler only when the main thread next runs Python code. CPython's readline prints
    the prompt and then blocks in select(), looking for signals only when select() is interrupted: a
    Ctrl-C that lands between the two sets Python's flag, interrupts nothing and waits for the next
    key. A harness that answers the prompt at once hits that window (measured here under load: 1 in 10
    for a bare `input()`, 1 in 3 with a few idle threads as MLX has). So a watchdog thread learns of
    each SIGINT through the wakeup fd and interrupts the main thread with a no-op SIGUSR1 until the
    handler has run.
    """

    def __init__(self):
        self.handled, self.pressed = 0, None  # pressed: a list while a reply streams
        self.accounted, self.exiting = 0, False  # handler runs the watchdog has seen; no kicks at exit

    def install(self):
        """Become the process's SIGINT handler (rank 0 only: the others follow its decisions)."""
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGUSR1, lambda *_: None)  # only interrupts a blocking call
        _on_sigint.append(self._kick)
        atexit.register(setattr, self, "exiting", True)

    def _handle(self, *_):
        self.handled += 1
        if self.pressed is None:
            raise KeyboardInterrupt
        self.pressed.append(True)

    def _kick(self):
        # Kick only while the handler has not run since the last SIGINT we saw (usually it has by the
        # time we read the byte), and never into a process that is exiting.
        end = time.monotonic() + 1  # the window is microseconds; a long mx.eval runs it on return
        while self.handled == self.accounted and time.monotonic() < end and not self.exiting:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            time.sleep(0.02)
        self.accounted = self.handled

    @contextlib.contextmanager
    def stops(self):
        """While a reply streams, Ctrl-C asks it to stop (checked between tokens and prefill chunks)."""
        self.pressed = []
        try:
            yield lambda: bool(self.pressed)
        finally:
            self.pressed = None


def loading_bar(total: int, show: bool):
    """tqdm as one plain line, `loading  12.3/49.6 GB  3.10GB/s  00:12 left` (nothing when not shown)."""
    from tqdm import tqdm  # here: only the programs that load a model draw the line

    fmt = "loading  {n:.1f}/{total:.1f} GB  {rate_fmt}  {remaining} left"
    try:  # a terminal that reports no size (a new pseudo-terminal is 0x0) counts as 80x24: tqdm shows nothing in 0
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        columns = lines = 0
    return tqdm(
        total=total / 1e9,
        unit="GB",
        bar_format=fmt,
        disable=not show,
        leave=False,
        file=sys.stderr,
        mininterval=0.2,
        ncols=columns or 80,
        nrows=lines or 24,
    )


def read_prompt(prompt: str) -> str:
    """The prompt text; '-' reads stdin, which must be UTF-8."""
    if prompt != "-":
        try:
            prompt.encode("utf-8")  # argv decodes with surrogateescape
        except UnicodeEncodeError:
            raise MixtralError("--prompt: not UTF-8 text; convert it first, e.g. with iconv -t UTF-8") from None
        return prompt
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MixtralError(f"stdin: not UTF-8 text (byte {e.start}); convert it first, e.g. iconv -t UTF-8") from None
