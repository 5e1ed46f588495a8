#!/usr/bin/env python3
"""qslice's Mailman 3 slice runner: one slice of one Mailman queue, stopped only between
two messages.

qslice-runner embeds this file, writes it to its state directory and runs it with the
site's Mailman interpreter, one process per slice it owns plus warm spares:

    PYTHON qslice_mailman3.py --config /etc/mailman3/mailman.cfg --runner in

(--config defaults to Mailman's own search, MAILMAN_CONFIG_FILE first; --runner to `in`.)
Python 3.9+ standard library plus Mailman 3; written against Mailman 3.3.10.

Why it exists: Mailman's own `runner` stops on a signal by raising RunnerInterrupt, an
Exception, wherever the runner is, so a stop while it handles a message shunts the
message, or sends a good post to bad/. This runner runs the same Mailman runner class,
but stops itself from inside, between messages.

Channels (line-based UTF-8, one line per command or event):

    fd 0  commands from qslice.
    fd 1  events to qslice, and nothing else: at start the process dup()s fd 1 into a
          private stream and dup2()s fd 2 onto fd 1, so whatever Mailman or a library
          prints to stdout goes to stderr and cannot corrupt the channel. Each event is
          flushed as it is written.
    fd 2  human-readable log lines.

Start-up: install the signal handlers (SIGTERM, SIGINT and SIGUSR1 mean `stop`; SIGHUP
reopens Mailman's logs once Mailman is initialised; no handler ever raises), then
initialise Mailman with the config file (the slow part: 0.7-2 s), then send
`ready <pid>` and wait for commands. Commands sent before `ready` wait in the pipe and
are read as they come; a stop that arrives during initialisation takes effect when
initialisation returns (the process then sends `stopped` instead of `ready`).

Commands:

    go SLICE COUNT EPOCH UNTIL_MS
        Run slice SLICE of COUNT of the runner's queue for claim epoch EPOCH (an integer,
        only logged), taking messages until UNTIL_MS, an absolute time in milliseconds on
        CLOCK_BOOTTIME (which keeps counting through a suspend). COUNT must be a power of
        two >= 1 (Mailman 3 slices queues only that way), 0 <= SLICE < COUNT,
        UNTIL_MS >= 0, and the runner must exist ([runner.NAME]) and manage a queue;
        otherwise: `error <text>`, exit 2. The slice count is set in process (config.push
        of `[runner.NAME] instances: COUNT`), so mailman.cfg's `instances` does not
        matter. The site's shared state is checked (check_site), files Mailman cannot
        serve are quarantined, and then building the runner recovers the slice's .bak
        files, as Mailman does. Then `running SLICE COUNT`, and the runner loop. A second
        `go` is logged on stderr and ignored.
    lease UNTIL_MS
        Messages may be taken until UNTIL_MS (as in go). Replaces the deadline. Ignored
        (logged) before `go`, and once the gate has closed: a closed gate never reopens.
        Absolute deadlines keep a line read late (the process starved of CPU) exact.

Once the slice starts (after Mailman is initialised and the lease checked, before the
slice's .bak files are recovered), the deadline is also a kernel timer (timer_create on
CLOCK_BOOTTIME, delivering SIGKILL), moved by each `lease`: a process frozen past its deadline (a host
paused in the cgroup freezer, a VM stopped) dies the moment it is thawed, before it runs
another instruction, even with a message in hand: its lease may have ended meanwhile and
another node may be serving the slice. qslice's leash kills at the same deadline, but a
thawed leash races the thawed process; the timer does not. A renewal must therefore be
read before the deadline it replaces: the process is killed at the deadline it knows.
    stop
        Finish the message in hand, take no other, send `stopped`, exit 0. A warm spare
        (still waiting for `go`) does so at once. EOF on fd 0 (qslice is gone) and
        SIGTERM/SIGINT/SIGUSR1 mean the same.

Events:

    ready PID               Mailman is initialised; send `go`.
    running SLICE COUNT     the slice runner is built and its loop starts.
    stopped                 stopped as asked, between messages; exit 0 follows.
    fenced                  the deadline passed without a renewal: no message was taken
                            after it; exit 3 follows. (A stop asked for after the deadline
                            has passed also ends in `fenced`: whichever closed the gate
                            first is reported.)
    error TEXT              a `go` or the command line was refused; exit 2 follows.
    quarantined NAME REASON a file Mailman cannot serve was moved into
                            <queue_dir>/.qslice/quarantine/<queue>/.

Exit status: 0 stopped, 1 crashed (traceback on stderr; qslice restarts it), 2 refused,
3 fenced. The runner log (logger mailman.runner) gets one line when the slice runner
starts and one when it stops:

    qslice slice runner: in slice 2/4 epoch 1234 node r1 pid 5678 started
    qslice slice runner: in slice 2/4 epoch 1234 node r1 pid 5678 stopped (stop command)

(node from $QSLICE_NODE, `-` if unset).

How it stops between messages: Runner._one_iteration lists the queue once
(switchboard.files) and then, for each entry, dequeues, processes, finishes and commits.
The switchboard is given a `files` listing whose iteration asks the gate (not stopping,
lease valid) before it hands out each entry, and hands out no more once the gate closes;
closing the gate also sets the runner's stop flag, so run() leaves its loop. The runner
class's own sleep (RetryRunner always sleeps) is kept, made an Event wait that only a
stop or the deadline cuts short. Nothing ever raises inside dequeue, processing or
finish.
"""

import argparse
import fcntl
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import zlib

EXIT_STOPPED = 0
EXIT_CRASHED = 1
EXIT_REFUSED = 2
EXIT_FENCED = 3

# SIGUSR1 is Mailman's third stop signal; handling it keeps a stray one from killing a
# busy runner (its default action is to terminate).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# CLOCK_BOOTTIME keeps counting through a suspend, so a host that sleeps past its lease
# finds it lapsed on waking. Linux-only; elsewhere the monotonic clock is the best there is.
LEASE_CLOCK = getattr(time, 'CLOCK_BOOTTIME', time.CLOCK_MONOTONIC)

class KillTimer:
    """A kernel timer that SIGKILLs this process at an absolute CLOCK_BOOTTIME time.

    Armed and moved with each deadline (`arm`). The kernel delivers the signal at the
    deadline; a process frozen then gets it pending and dies as it is thawed, before it
    runs another instruction (no interpreter check could do that). Linux only: where
    timer_create cannot be had, `available` is False and the leash alone kills."""

    CLOCK_BOOTTIME = 7
    SIGEV_SIGNAL = 0
    TIMER_ABSTIME = 1

    def __init__(self):
        self.available = False
        self.error = ''
        try:
            import ctypes
            import ctypes.util
            self._ctypes = ctypes

            class Timespec(ctypes.Structure):
                _fields_ = [('tv_sec', ctypes.c_long), ('tv_nsec', ctypes.c_long)]

            class Itimerspec(ctypes.Structure):
                _fields_ = [('it_interval', Timespec), ('it_value', Timespec)]

            class Sigevent(ctypes.Structure):
                # struct sigevent: sigval, signo, notify, then a 48-byte union (64 bytes).
                _fields_ = [('sigev_value', ctypes.c_void_p), ('sigev_signo', ctypes.c_int),
                            ('sigev_notify', ctypes.c_int), ('_pad', ctypes.c_int * 12)]

            self._timespec, self._itimerspec = Timespec, Itimerspec
            libc = ctypes.CDLL(None, use_errno=True)
            if not hasattr(libc, 'timer_create'):
                libc = ctypes.CDLL(ctypes.util.find_library('rt'), use_errno=True)
            self._settime = libc.timer_settime
            self._settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(Itimerspec), ctypes.c_void_p]
            create = libc.timer_create
            create.argtypes = [ctypes.c_int, ctypes.POINTER(Sigevent), ctypes.POINTER(ctypes.c_void_p)]
            event = Sigevent(sigev_signo=signal.SIGKILL, sigev_notify=self.SIGEV_SIGNAL)
            self._timer = ctypes.c_void_p()
            if create(self.CLOCK_BOOTTIME, ctypes.byref(event), ctypes.byref(self._timer)) != 0:
                self.error = os.strerror(ctypes.get_errno())
                return
            self.available = True
        except (ImportError, OSError, AttributeError, TypeError) as error:
            self.error = str(error)

    def arm(self, until):
        """SIGKILL at `until` (lease clock seconds, absolute); a passed time kills now."""
        if not self.available:
            return
        seconds = int(until)
        nanoseconds = int(round((until - seconds) * 1e9))
        value = self._itimerspec(self._timespec(0, 0), self._timespec(seconds, nanoseconds))
        if self._settime(self._timer, self.TIMER_ABSTIME, self._ctypes.byref(value), None) != 0:
            say('arming the kill timer failed ({}); the leash alone kills at the deadline'
                .format(os.strerror(self._ctypes.get_errno())))


NODE = os.environ.get('QSLICE_NODE') or '-'
# The host this node runs on, for the site checks: nodes of one host may share its
# per-host files. qslice-runner sets QSLICE_HOST (its hostname unless configured).
HOST = os.environ.get('QSLICE_HOST') or socket.gethostname()

# The event channel, once main() has made it (the command thread reports a stop while
# initialising on it).
EVENTS = None

# qslice's commands arrive here (stdin), read unbuffered by the command thread only.
COMMAND_FD = 0


def lease_clock():
    """Seconds on the clock leases are measured on."""
    return time.clock_gettime(LEASE_CLOCK)


def say(text):
    """A human-readable line on stderr (qslice tags and logs it)."""
    try:
        sys.stderr.write('qslice_mailman3[{}]: {}\n'.format(os.getpid(), text))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr is gone too; nothing left to tell


class Refused(Exception):
    """A `go` (or command line) qslice must fix; its text becomes the `error` event."""


class Events:
    """The private event stream to qslice: the process's original fd 1."""

    def __init__(self):
        # Keep the channel on a private fd and point fd 1 at stderr, so that nothing
        # Mailman or a library prints can interleave with events. os.dup() gives a
        # non-inheritable fd, so no child process gets the channel either.
        fd = os.dup(1)
        os.dup2(2, 1)
        self._stream = os.fdopen(fd, 'w', encoding='utf-8', errors='replace')
        self._lock = threading.Lock()

    def detach(self):
        """Closes the stream in a forked child, which speaks on a channel of its own."""
        try:
            self._stream.close()
        except (OSError, ValueError):
            pass

    def send(self, *words):
        line = ' '.join(str(w) for w in words).replace('\r', ' ').replace('\n', ' ')
        with self._lock:
            try:
                self._stream.write(line + '\n')
                self._stream.flush()
            except (OSError, ValueError):
                # qslice is gone (broken pipe); EOF on stdin stops us. An exit must
                # not fail for want of an audience.
                pass


class Gate:
    """Whether the runner may take another message, and why not once it may not.

    Shared by the main thread (asks before each message and after each idle sleep), the
    command thread (lease, stop, EOF) and the signal thread (stop signals). It only ever
    closes: the first reason it closes for is the one reported.

    Deadlines are absolute times on the lease clock, as qslice-runner computed them from
    its fence: a renewal read late (this process starved of CPU on a loaded host) is still
    exact. A deadline seen passed while a renewal waits unread in the command pipe is not
    taken for a lapse until the command thread has read it.
    """

    def __init__(self, kill_timer=None):
        self._lock = threading.Lock()
        self._kill_timer = kill_timer
        self._armed = False     # the kill timer follows the deadline once the slice starts
        self._deadline = None   # lease clock seconds; None until `go` is read
        self._runner = None     # the Mailman runner, once built, to stop its loop
        self.reason = None      # None while open, then 'stopped' or 'fenced'
        self.why = ''           # what closed it, for the logs
        # True until Mailman is initialised: a stop then ends the process at once (it
        # holds no message and has touched no queue).
        self.initialising = True
        # Set when the gate closes: wakes the idle sleep at once.
        self.wake = threading.Event()

    def attach(self, runner):
        """The runner whose loop closing the gate stops."""
        with self._lock:
            self._runner = runner
            if self.reason is not None:
                runner.stop()

    def set_deadline(self, until):
        """Messages may be taken until `until` (lease clock seconds), and the process
        lives until then. False once fenced (a lapsed lease is dead for good); a stopped
        gate stays closed, and only the kill timer moves."""
        with self._lock:
            if self.reason == 'fenced':
                return False
            if self.reason is None:
                self._deadline = until
            # A stopped gate takes no message, but the one in hand is finished under the
            # lease: its renewals still move the kill timer.
            if self._armed:
                self._kill_timer.arm(until)
            return True

    def arm_kill_timer(self):
        """From now on the process dies at its deadline, in the kernel's hands: called as
        the slice starts (before its .bak files are recovered). Not before: a process
        still initialising Mailman holds no message, and one starved of CPU then (a cold
        start of many slice runners on a loaded host) may read its renewals late."""
        with self._lock:
            if self._kill_timer is None or LEASE_CLOCK == time.CLOCK_MONOTONIC or self._deadline is None:
                return
            self._armed = True
            self._kill_timer.arm(self._deadline)

    def stop(self, why):
        """Take no other message (the one in hand is finished)."""
        with self._lock:
            if self.reason is None:
                self._close('stopped', why)

    def is_open(self):
        """True while a message may be taken; closes the gate if the lease lapsed."""
        for _ in range(PENDING_RENEWAL_CHECKS):
            with self._lock:
                if self.reason is not None:
                    return False
                if self._deadline is None or lease_clock() < self._deadline:
                    return True
                if not commands_waiting():
                    self._close('fenced', 'lease lapsed')
                    return False
            # A command (a renewal, most likely) waits in the pipe: let the command thread
            # read it before deciding.
            time.sleep(PENDING_RENEWAL_WAIT)
        with self._lock:
            if self.reason is None:
                self._close('fenced', 'lease lapsed (commands kept waiting unread)')
            return False

    def seconds_left(self):
        """Seconds until the deadline, or None before `go`."""
        with self._lock:
            if self._deadline is None:
                return None
            return self._deadline - lease_clock()

    def sleep(self, seconds):
        """Sleeps `seconds`, cut short only by a stop or the fence (a renewed lease does
        not end it): the runner class's own pacing is kept."""
        end = lease_clock() + max(0.0, seconds)
        while self.is_open():
            left = end - lease_clock()
            if left <= 0:
                return
            deadline_left = self.seconds_left()
            if deadline_left is not None:
                # Wake at the deadline to see whether it was renewed.
                left = min(left, max(0.0, deadline_left) + 0.001)
            self.wake.wait(left)

    def _close(self, reason, why):
        # Caller holds the lock.
        self.reason, self.why = reason, why
        self.wake.set()
        if self._runner is not None:
            # Only sets Runner._stop: run() leaves its loop after the current pass.
            self._runner.stop()


# How often, and how long each time, a deadline seen passed waits for a renewal that
# sits unread in the command pipe (50 x 20 ms: a second at most).
PENDING_RENEWAL_CHECKS = 50
PENDING_RENEWAL_WAIT = 0.02


def commands_waiting():
    """Whether qslice wrote commands that the command thread has not read yet."""
    try:
        readable, _, _ = select.select([COMMAND_FD], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)


# --- stop requests: commands, EOF and signals -------------------------------------------

def request_stop(gate, starts, why):
    """Close the gate and wake the main thread if it still waits for `go`. A process
    still initialising Mailman holds no message and has touched no queue: it ends at
    once rather than when initialisation returns."""
    gate.stop(why)
    with gate._lock:
        if gate.initialising and not holds_mailman_lock():
            # Under the gate's lock, so the main thread cannot finish initialising and go
            # on meanwhile; nothing else to flush: Mailman's logs are not open yet.
            say('stopped while initialising Mailman ({}): it held no message'.format(why))
            EVENTS.send('stopped')
            os._exit(EXIT_STOPPED)
    starts.put(('stop', why))


def holds_mailman_lock():
    """Whether this process holds the lock Mailman's initialisation takes around its
    database set-up (`<lock_dir>/dbcreate.lck`, a flufl lock naming its holder's pid).
    Exiting then would leave it to block every other Mailman start on the site until it
    expires: the stop waits for initialisation to return instead."""
    try:
        from mailman.config import config
        path = os.path.join(config.LOCK_DIR, 'dbcreate.lck')
    except (ImportError, AttributeError):
        return False    # the configuration is not read yet: no lock taken either
    try:
        with open(path) as f:
            holder = f.read().strip().split('|')
    except OSError:
        return False
    return len(holder) == 4 and holder[2] == str(os.getpid())


def command_lines():
    """qslice's command lines, read straight from the fd (no buffer beside the pipe's, so
    that `commands_waiting` sees every line not yet handled)."""
    pending = b''
    while True:
        chunk = os.read(COMMAND_FD, 4096)
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b'\n')
        for raw in lines:
            yield raw


def read_commands(gate, starts):
    """Command thread: apply qslice's commands as they arrive, so that a `lease` or a
    `stop` is seen while the main thread is busy inside Mailman."""
    go_read = False
    try:
        for raw in command_lines():
            words = raw.decode('utf-8', 'replace').split()
            if not words:
                continue
            command, args = words[0], words[1:]
            if command == 'go':
                if go_read:
                    say('ignoring a second go ({}): this process already has its slice'
                        .format(' '.join(words)))
                    continue
                go_read = True
                until = parse_until(args[3]) if len(args) == 4 else None
                if until is not None:
                    gate.set_deadline(until)
                starts.put(('go', args))
            elif command == 'lease':
                renew_lease(gate, go_read, args)
            elif command == 'stop':
                request_stop(gate, starts, 'stop command')
            else:
                say('ignoring unknown command {!r}; commands are go, lease, stop'
                    .format(' '.join(words)))
    except (OSError, ValueError) as error:
        say('reading commands failed ({}); stopping as on EOF'.format(error))
    request_stop(gate, starts, 'EOF on stdin (qslice is gone)')


def parse_until(text):
    """A deadline in milliseconds on the lease clock, as seconds; None if malformed."""
    value = parse_int(text)
    if value is None or value < 0:
        return None
    return value / 1000.0


def renew_lease(gate, go_read, args):
    until = parse_until(args[0]) if len(args) == 1 else None
    if until is None:
        say('ignoring malformed lease {!r}; send lease UNTIL_MS with UNTIL_MS the '
            'deadline in milliseconds on CLOCK_BOOTTIME'.format(' '.join(args)))
    elif not go_read:
        say('ignoring lease before go: the lease starts with go')
    elif not gate.set_deadline(until):
        say('ignoring lease {}: the lease already lapsed ({})'.format(args[0], gate.why))


def parse_int(text):
    try:
        return int(text)
    except ValueError:
        return None


class SignalThread:
    """Turns signals into stop requests and log reopening, off the main thread.

    A Python signal handler runs in the main thread between two bytecodes, possibly while
    Mailman (or threading itself) holds a lock the handler would need; setting an Event
    there could deadlock. So the handler only writes the signal number to a pipe, and
    this thread does the work.
    """

    def __init__(self, gate, starts):
        self._gate = gate
        self._starts = starts
        self._read, self._write = os.pipe()
        # Never block in a signal handler: a full pipe already has a byte waiting.
        os.set_blocking(self._write, False)
        self.mailman_initialised = False

    def install(self):
        for signum in STOP_SIGNALS + (signal.SIGHUP,):
            signal.signal(signum, self._handler)
        threading.Thread(target=self._run, name='qslice-signals', daemon=True).start()

    def _handler(self, signum, frame):
        try:
            os.write(self._write, bytes([signum]))
        except OSError:
            pass

    def _run(self):
        while True:
            for signum in os.read(self._read, 64):
                if signum == signal.SIGHUP:
                    self._reopen_logs()
                else:
                    request_stop(self._gate, self._starts, signal.Signals(signum).name)

    def _reopen_logs(self):
        if not self.mailman_initialised:
            say('SIGHUP before Mailman is initialised: no logs to reopen yet')
            return
        from mailman.core import logging as mailman_logging
        # Mailman's reopen() closes and reopens each handler's stream; hold the handlers'
        # locks so the main thread is never mid-write on a stream being swapped.
        handlers = list(getattr(mailman_logging, '_handlers', {}).values())
        for handler in handlers:
            handler.acquire()
        try:
            mailman_logging.reopen()
        finally:
            for handler in handlers:
                handler.release()
        say('SIGHUP: reopened Mailman\'s logs')


# --- the slice runner -------------------------------------------------------------------

def check_go(args, runner_name):
    """The slice, count, epoch and lease of a `go`, or Refused naming what is wrong."""
    if len(args) != 4:
        raise Refused('go takes SLICE COUNT EPOCH UNTIL_MS, got {!r}; send e.g. go 0 4 1 '
                      '{}'.format(' '.join(args), int(lease_clock() * 1000) + 60000))
    values = []
    for name, text in zip(('SLICE', 'COUNT', 'EPOCH', 'UNTIL_MS'), args):
        value = parse_int(text)
        if value is None:
            raise Refused('go: {} {!r} is not an integer; send go SLICE COUNT EPOCH UNTIL_MS '
                          'with integers'.format(name, text))
        values.append(value)
    slice_, count, epoch, lease_ms = values
    if count < 1 or count & (count - 1):
        raise Refused('go: COUNT {} is not a power of two; Mailman 3 splits a queue only into '
                      'a power of two slices (1, 2, 4, 8, ...): choose such a slice count'
                      .format(count))
    if not 0 <= slice_ < count:
        raise Refused('go: SLICE {} is outside 0..{} for COUNT {}; send a slice number below '
                      'the count'.format(slice_, count - 1, count))
    if lease_ms < 0:
        raise Refused('go: UNTIL_MS {} is negative; send the deadline in milliseconds on '
                      'CLOCK_BOOTTIME'.format(lease_ms))
    check_runner(runner_name)
    return slice_, count, epoch, lease_ms


def check_runner(name):
    """Refused unless [runner.NAME] exists and its class manages a queue."""
    from mailman.config import config
    from mailman.utilities.modules import find_name

    section = getattr(config, 'runner.' + name, None)
    if section is None:
        raise Refused('runner {!r} is not defined (no [runner.{}] section in the Mailman '
                      'config); pass --runner with a runner name such as in, out, pipeline'
                      .format(name, name))
    class_path = section['class']
    try:
        runner_class = find_name(class_path)
    except (ImportError, AttributeError) as error:
        raise Refused('runner {!r}: cannot import its class {} ({}); fix class in '
                      '[runner.{}]'.format(name, class_path, error, name))
    if not getattr(runner_class, 'is_queue_runner', True):
        raise Refused('runner {!r} ({}) does not manage a queue, so it has no slices; '
                      'qslice can only run queue runners such as in, out, pipeline'
                      .format(name, class_path))


def build_runner(name, slice_, count):
    """Mailman's runner for slice `slice_` of `count`, its slice's .bak files recovered."""
    from mailman.bin.runner import make_runner
    from mailman.config import config

    # Runner.__init__ reads the slice count from [runner.NAME] instances, not from its
    # arguments, so set it in process: mailman.cfg's value must not matter.
    config.push('qslice-slices', '[runner.{}]\ninstances: {}\n'.format(name, count))
    instances = int(getattr(config, 'runner.' + name).instances)
    if instances != count:
        raise RuntimeError('config.push did not set [runner.{}] instances to {} (reads {})'
                           .format(name, count, instances))
    # Not runner.set_signals(): Mailman's handlers raise inside the runner.
    return make_runner(name, slice_, count)


class GatedListing:
    """A queue listing that hands out each entry only while the gate is open.

    Runner._one_iteration iterates it, and between two entries dequeues, processes,
    finishes and commits one message; so the gate is asked exactly between messages.
    len() is the number listed, which _one_iteration returns (and run() uses to decide
    whether to sleep).
    """

    def __init__(self, filebases, gate):
        self._filebases = filebases
        self._gate = gate

    def __len__(self):
        return len(self._filebases)

    def __iter__(self):
        for filebase in self._filebases:
            if not self._gate.is_open():
                return
            yield filebase


def gate_runner(runner, gate, events, slice_):
    """Make `runner` take messages only while `gate` is open, keep its class's own
    pacing, and run what must not run twice in a cluster only where it belongs.

    Both objects get a subclass of their own class made here (same names, so Mailman's
    logs read the same):
    - the switchboard's `files` becomes a GatedListing, and names Mailman cannot parse
      are quarantined before it lists them;
    - the runner's sleeps (its class's own `_snooze`, RetryRunner's included) are cut
      short only by a stop or the fence;
    - `_do_periodic` never runs once the gate has closed, and cluster-wide periodic work
      (BounceRunner's) runs in slice 0 only;
    - the runners whose work touches per-list shared state (pipeline and virgin, digest,
      archive) process each message under a lock of its list (ListLocks).
    """
    switchboard_class = type(runner.switchboard)
    queue_name = runner.switchboard.name

    class GatedSwitchboard(switchboard_class):
        def get_files(self, extension='.pck'):
            quarantine_junk(self.queue_directory, queue_name, events)
            return super().get_files(extension)

        @property
        def files(self):
            # Looking at the gate here too makes an empty pass notice a lapsed lease.
            gate.is_open()
            return GatedListing(super().files, gate)

    runner_class = type(runner)
    sleepers = sleeping_modules(runner_class)
    once_per_cluster = runs_periodic_once(runner_class)
    list_locks = ListLocks(gate) if serialises_lists(runner_class) else None
    if list_locks is not None:
        say('{} messages are processed under a lock of their list ({})'
            .format(queue_name, list_locks.kind))

    class GatedRunner(runner_class):
        def _snooze(self, filecnt):
            # The class's own rule (RetryRunner always sleeps), with its `time.sleep`
            # made one that only a stop or the fence cuts short.
            with gated_sleep(sleepers, gate):
                super()._snooze(filecnt)
            # Closes the gate (and stops the loop) if the deadline passed meanwhile.
            gate.is_open()

        def _do_periodic(self):
            if not gate.is_open():
                return
            # Runner keeps no slice number of its own (NNTPRunner does): the go's is used.
            if once_per_cluster and slice_ != 0:
                return
            super()._do_periodic()

        def _dispose(self, mlist, msg, msgdata):
            # A message of no list (Mailman shunts those before here) has nothing to lock.
            if list_locks is None or mlist is None:
                return super()._dispose(mlist, msg, msgdata)
            with list_locks.hold(mlist):
                keep = super()._dispose(mlist, msg, msgdata)
                # Inside the lock, so the next holder reads what this message wrote
                # (post_id, digest number); Mailman commits after the message anyway.
                config_db().commit()
            return keep

    for made, base in ((GatedSwitchboard, switchboard_class), (GatedRunner, runner_class)):
        made.__name__, made.__qualname__ = base.__name__, base.__qualname__
    runner.switchboard.__class__ = GatedSwitchboard
    runner.__class__ = GatedRunner
    gate.attach(runner)


def config_db():
    from mailman.config import config
    return config.db


class GatedTime:
    """The `time` module as a runner module sees it during `_snooze`: the same, except
    that `sleep` is the gate's."""

    def __init__(self, gate):
        self._gate = gate

    def sleep(self, seconds):
        self._gate.sleep(seconds)

    def __getattr__(self, name):
        return getattr(time, name)


def sleeping_modules(runner_class):
    """The modules of the runner class and its bases that call `time.sleep`."""
    modules = []
    for klass in runner_class.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is not None and getattr(module, 'time', None) is time and module not in modules:
            modules.append(module)
    return modules


class gated_sleep:
    """Within it, `modules` see the gate's sleep as `time.sleep`."""

    def __init__(self, modules, gate):
        self._modules = modules
        self._proxy = GatedTime(gate)

    def __enter__(self):
        for module in self._modules:
            module.time = self._proxy

    def __exit__(self, *exc):
        for module in self._modules:
            module.time = time
        return False


def runs_periodic_once(runner_class):
    """BounceRunner's periodic work (processing every unprocessed BounceEvent, sending
    the warnings) is cluster-wide: run in every slice it would act twice."""
    try:
        from mailman.runners.bounce import BounceRunner
    except ImportError:
        return False
    return issubclass(runner_class, BounceRunner)


def serialises_lists(runner_class):
    """The runners whose messages change per-list state that Mailman guards badly across
    processes: to-digest's mailbox (a non-blocking lockf: a second process gets
    ExternalClashError and the post is shunted), the post_id bump (a lost update), the
    digest files, and the prototype archiver's maildir (a one-second lock, then the post
    is discarded)."""
    names = (('mailman.runners.pipeline', 'PipelineRunner'),
             ('mailman.runners.virgin', 'VirginRunner'),
             ('mailman.runners.digest', 'DigestRunner'),
             ('mailman.runners.archive', 'ArchiveRunner'))
    for module_name, class_name in names:
        try:
            module = __import__(module_name, fromlist=[class_name])
        except ImportError:
            continue
        if issubclass(runner_class, getattr(module, class_name)):
            return True
    return False


class ListLocks:
    """A blocking lock per mailing list, taken around each message of the runners that
    change per-list state, on every host that serves the site.

    With PostgreSQL it is an advisory transaction lock (pg_advisory_xact_lock): the
    commit that ends the message releases it, and so does the server when the process
    dies. Otherwise it is an flock on `<lock_dir>/qslice-list-<list id>.lock` (the
    kernel drops it when the process dies).

    Every process that takes Mailman's own per-list locks (to-digest's and the digest
    runner's mailbox dot locks, the prototype archiver's maildir lock) does so inside this
    lock, so a Mailman lock of the list found while holding it was left by a process that
    died: it is broken, and the log says so.
    """

    def __init__(self, gate):
        from mailman.config import config
        self._gate = gate
        url = str(config.db.engine.url)
        self.kind = 'PostgreSQL advisory lock' if url.startswith('postgres') else 'flock in the lock dir'
        self._postgres = url.startswith('postgres')

    def hold(self, mlist):
        return _HeldListLock(self, mlist)

    def acquire(self, mlist):
        from mailman.config import config
        list_id = mlist.list_id
        # End the transaction that looked the list up before waiting: with SQLite it
        # would hold a shared lock that the current holder's commit waits for.
        config.db.commit()
        if self._postgres:
            from sqlalchemy import text
            key = zlib.crc32(('qslice list ' + list_id).encode('utf-8'))
            config.db.store.execute(text('SELECT pg_advisory_xact_lock(:key)'), {'key': key})
            handle = None
        else:
            path = os.path.join(config.LOCK_DIR, 'qslice-list-{}.lock'.format(list_id))
            handle = open(path, 'a')
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        # Whatever was read before the lock is stale (the previous holder may have bumped
        # post_id or the digest number since): read it all again from here.
        config.db.store.expire_all()
        break_dead_locks(mlist)
        return handle

    def release(self, handle):
        # The advisory lock goes with the transaction (committed by the caller, or
        # rolled back by Mailman after a failure).
        if handle is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


class _HeldListLock:
    def __init__(self, locks, mlist):
        self._locks, self._mlist, self._handle = locks, mlist, None

    def __enter__(self):
        self._handle = self._locks.acquire(self._mlist)
        return self

    def __exit__(self, *exc):
        self._locks.release(self._handle)
        return False


def break_dead_locks(mlist):
    """Removes the list's Mailman locks that only a dead process can have left: called
    while holding the list's lock, inside which every live holder takes them."""
    from mailman.config import config
    dot_locks = []
    try:
        dot_locks = [os.path.join(mlist.data_path, name) for name in os.listdir(mlist.data_path)
                     if name.startswith('digest') and name.endswith('.mmdf.lock')]
    except FileNotFoundError:
        pass
    for path in dot_locks:
        remove_lock(path, 'a mailbox dot lock')
    maildir_lock = os.path.join(config.LOCK_DIR, '{}-maildir.lock'.format(mlist.fqdn_listname))
    try:
        with open(maildir_lock) as f:
            claim = f.read().strip()
    except FileNotFoundError:
        return
    except OSError:
        claim = ''
    remove_lock(maildir_lock, 'the prototype archiver\'s lock')
    # flufl.lock's claim file, named in the lock file, beside it in the lock dir.
    if claim and os.path.dirname(os.path.abspath(claim)) == os.path.abspath(config.LOCK_DIR):
        remove_lock(claim, 'the prototype archiver\'s lock claim')


def remove_lock(path, what):
    import logging
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    text = 'broke {} left by a process that died: {}'.format(what, path)
    say(text)
    logging.getLogger('mailman.runner').warning('qslice slice runner: ' + text)


# Mailman's entry names: TIME '+' DIGEST, DIGEST read with int(digest, 16); a digest
# outside 0 .. 2^160-1 falls in no slice, so no runner of a sliced queue would ever take it.
DIGEST_LIMIT = 1 << 160


def junk_reason(filebase):
    """Why Mailman cannot serve an entry named `filebase` (its listing would raise, or no
    slice would ever take it); None for a name it serves."""
    if '+' not in filebase:
        return "no '+' between time and digest"
    when, digest = filebase.split('+', 1)
    try:
        float(when)
    except ValueError:
        return 'the time {!r} is not a number'.format(when)
    try:
        value = int(digest, 16)
    except ValueError:
        return 'the digest {!r} is not hexadecimal'.format(digest)
    if not 0 <= value < DIGEST_LIMIT:
        return 'the digest {!r} is outside the 160-bit hash space'.format(digest)
    return None


# A queue file's `.tmp` (Mailman writes `<name>.pck.tmp`, fsyncs it and renames it) older
# than this is a write that was cut off: the writer crashed, or was killed at its fence
# deadline as a paused host thawed. No write takes an hour, even on a slow NFS server, and
# an hour also absorbs the clock skew between this host and a file server's mtimes.
STALE_TMP_AGE = 3600


def stale_tmp_reason(path):
    """Why the `.tmp` file at `path` is litter; None while it may still be written."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    if age < STALE_TMP_AGE:
        return None
    return ('a queue file write cut off {:.0f} minutes ago (its writer crashed or was '
            'killed at its fence deadline; the message was served again from its .bak)'
            .format(age / 60))


def quarantine_junk(queue_dir, queue_name, events):
    """Moves the .pck and .bak files of `queue_dir` that Mailman cannot serve, and the
    .tmp files of writes cut off long ago, into `<spool root>/.qslice/quarantine/<queue>/`
    and reports each on the event channel."""
    try:
        names = os.listdir(queue_dir)
    except FileNotFoundError:
        return
    for name in names:
        filebase, ext = os.path.splitext(name)
        if ext == '.tmp':
            reason = stale_tmp_reason(os.path.join(queue_dir, name))
        elif ext in ('.pck', '.bak'):
            reason = junk_reason(filebase)
        else:
            continue
        if reason is None:
            continue
        target_dir = os.path.join(os.path.dirname(queue_dir), '.qslice', 'quarantine', queue_name)
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, name)
        n = 1
        while os.path.lexists(target):
            target = os.path.join(target_dir, '{}.{}'.format(name, n))
            n += 1
        try:
            os.rename(os.path.join(queue_dir, name), target)
        except FileNotFoundError:
            continue    # another slice runner of the queue moved it first
        say('quarantined {}: {}'.format(name, reason))
        events.send('quarantined', name, reason)


# The directories every node of a site must share, and the paths each host must keep
# to itself ([paths.*] keys of mailman.cfg, as Mailman's config exposes them).
SHARED_DIRS = ('queue_dir', 'list_data_dir', 'messages_dir', 'cache_dir', 'data_dir',
               'archive_dir', 'template_dir', 'lock_dir')
PER_HOST_PATHS = (('log_dir', False), ('pid_file', True), ('lock_file', True))
# A node's marker counts while it is younger than this: a node that served the site
# within a day is taken as part of it (its slice runners rewrite it at every start).
MARKER_MAX_AGE = 24 * 3600
SITE_MARKERS = '.qslice-site'


def config_queue(runner_name):
    """The queue (switchboard) name of runner `runner_name`: Mailman names them alike."""
    return runner_name


def check_site(node):
    """Refuses (naming the key and what to do) a site whose shared state would corrupt
    mail once nodes on more than one host serve it: SQLite, a directory that must be
    shared but is not the same on every host, or a per-host path that is shared.

    How it tells: each node's slice runners place a marker named after the node into
    every directory concerned, then one saying its host into the spool
    (`<queue_dir>/.qslice/site/`), which is shared by definition. A node whose spool
    marker is seen here must have its marker in each shared directory as listed from
    here, and a node of another host none in a per-host one. Nodes of one host share
    that host's files, as Mailman's own runners on a host do."""
    from mailman.config import config
    if node == '-':
        return      # not run by qslice-runner: no node name to mark with
    where = {key: getattr(config, key.upper()) for key in SHARED_DIRS}
    per_host = {key: getattr(config, key.upper()) for key, _ in PER_HOST_PATHS}
    marker_dirs = {key: os.path.join(path, SITE_MARKERS)
                   for key, path in where.items() if key != 'queue_dir'}
    for key, is_file in PER_HOST_PATHS:
        path = per_host[key]
        marker_dirs[key] = os.path.join(os.path.dirname(path) if is_file else path, SITE_MARKERS)
    # The other directories first, the spool last: a node seen in the spool has written
    # every other marker already.
    for directory in set(marker_dirs.values()):
        place_marker(directory, node)
    nodes_dir = os.path.join(where['queue_dir'], '.qslice', 'site')
    write_marker(nodes_dir, node)
    peers = {name: host for name, host in fresh_markers(nodes_dir).items() if name != node}
    elsewhere = sorted(name for name, host in peers.items() if host != HOST)
    url = str(config.db.engine.url)
    if elsewhere and url.startswith('sqlite'):
        raise Refused('[database] url is SQLite ({}), which only one host can use, and nodes '
                      '{} on other hosts serve this site too: move the site to PostgreSQL '
                      '([database] class: mailman.database.postgresql.PostgreSQLDatabase) '
                      'before nodes on more than one host serve it'.format(url, ', '.join(elsewhere)))
    for key in SHARED_DIRS:
        if key == 'queue_dir':
            continue
        missing = missing_markers(marker_dirs[key], peers)
        if missing:
            raise Refused('[paths] {} = {} is not the directory that node(s) {} use: their '
                          'markers, seen in the shared spool, are not in {} as listed on node {} '
                          '(host {}). Every node must mount the same {} (if a node no longer '
                          'serves this site, remove its marker {})'.format(
                              key, where[key], ', '.join(missing), marker_dirs[key], node, HOST,
                              key, os.path.join(nodes_dir, missing[0])))
    for key, _ in PER_HOST_PATHS:
        shared_with = sorted(set(listdir(marker_dirs[key])) & set(elsewhere))
        if shared_with:
            raise Refused('[paths] {} = {} is shared with node(s) {} on other hosts (their '
                          'markers are in {}); it must be kept per host: point {} at a local '
                          'path on each host'.format(key, per_host[key], ', '.join(shared_with),
                                                     marker_dirs[key], key))


def missing_markers(directory, peers):
    """The peers whose marker is not in `directory`, listed a few times over a second
    before a peer counts as missing: a peer writing its first marker there races the
    listing."""
    for _ in range(5):
        seen = set(listdir(directory))
        missing = sorted(peer for peer in peers if peer not in seen)
        if not missing:
            return missing
        time.sleep(0.2)
    return missing


def place_marker(directory, node):
    """`<directory>/<node>/`: an empty directory, not a file, because Mailman's task
    runner deletes every file under messages_dir that its message store does not know."""
    path = os.path.join(directory, node)
    os.makedirs(path, exist_ok=True)
    os.utime(path)


def write_marker(directory, node):
    """`<directory>/<node>`, saying the node's host, written whole. One that says so
    already is only touched: a rename over it could hide the name from another node
    listing the directory at that moment (tmpfs moves a renamed entry in its list)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, node)
    try:
        with open(path) as f:
            if f.read().strip() == HOST:
                os.utime(path)
                return
    except FileNotFoundError:
        pass
    tmp = '{}.{}.tmp'.format(path, os.getpid())
    with open(tmp, 'w') as f:
        f.write(HOST + '\n')
    os.replace(tmp, path)


def fresh_markers(directory):
    """Node -> host of the markers in `directory` younger than MARKER_MAX_AGE."""
    now = time.time()
    found = {}
    for name in listdir(directory):
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime > MARKER_MAX_AGE:
                continue
            with open(path) as f:
                found[name] = f.read().strip() or '?'
        except FileNotFoundError:
            pass
    return found


def listdir(directory):
    try:
        return [n for n in os.listdir(directory) if not n.endswith('.tmp')]
    except FileNotFoundError:
        return []


def runner_line(name, slice_, count, epoch, what):
    return 'qslice slice runner: {} slice {}/{} epoch {} node {} pid {} {}'.format(
        name, slice_, count, epoch, NODE, os.getpid(), what)


def run_slice(args, go, gate, events):
    """Check and run a `go`; return the exit status."""
    import logging
    from mailman.config import config

    slice_, count, epoch, _ = check_go(go, args.runner)
    check_site(NODE)
    # Building the runner recovers the slice's .bak files: only under a valid lease.
    if not gate.is_open():
        return finish(gate, events)   # stopped (or fenced) while the go waited
    gate.arm_kill_timer()
    queue_dir = config.switchboards[config_queue(args.runner)].queue_directory
    quarantine_junk(queue_dir, os.path.basename(queue_dir), events)
    runner = build_runner(args.runner, slice_, count)
    gate_runner(runner, gate, events, slice_)
    events.send('running', slice_, count)
    rlog = logging.getLogger('mailman.runner')
    rlog.info(runner_line(args.runner, slice_, count, epoch, 'started'))
    say('running {} slice {}/{} epoch {}'.format(args.runner, slice_, count, epoch))
    runner.run()
    if gate.reason is None:
        raise RuntimeError('the {} runner left its loop on its own'.format(args.runner))
    # _one_iteration commits after each message and the gate only closes between
    # messages, so nothing should be pending; commit anyway so that whatever the runner's
    # _do_periodic or _clean_up did is not dropped by os._exit.
    config.db.commit()
    what = 'stopped ({})'.format(gate.why if gate.reason == 'stopped' else 'fenced: ' + gate.why)
    rlog.info(runner_line(args.runner, slice_, count, epoch, what))
    return finish(gate, events)


def finish(gate, events):
    """Tell qslice how the process ends; return the exit status."""
    say('{}: {}'.format(gate.reason, gate.why))
    if gate.reason == 'fenced':
        events.send('fenced')
        return EXIT_FENCED
    events.send('stopped')
    return EXIT_STOPPED


def leave(status):
    """Exit now: flush logs and streams, then os._exit, so interpreter teardown (Mailman,
    SQLAlchemy, daemon threads) adds no delay to a stop."""
    import logging
    try:
        logging.shutdown()
    except Exception:
        pass  # nothing may keep the process from exiting with its status
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as an `error` event too."""

    events = None

    def error(self, message):
        if self.events is not None:
            self.events.send('error', 'command line: {}; run as qslice_mailman3.py '
                             '--config MAILMAN_CFG --runner NAME'.format(message))
        self.print_usage(sys.stderr)
        leave(EXIT_REFUSED)


def parse_args(argv, events):
    parser = ArgumentParser(description='qslice\'s Mailman 3 slice runner (protocol: see '
                            'the module docstring)')
    parser.events = events
    parser.add_argument('--config', help='the site\'s mailman.cfg (default: Mailman\'s own '
                        'search, $MAILMAN_CONFIG_FILE first)')
    parser.add_argument('--runner', default='in', help='the Mailman runner name (default: in)')
    parser.add_argument('--fork-server', action='store_true', help='initialise Mailman '
                        'once and fork slice runners on request (protocol: serve_forks)')
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:
        leave(done.code or 0)   # --help: not a crash
    if args.config is not None and not os.path.isfile(args.config):
        raise Refused('config file {!r} does not exist or is not a file; pass --config '
                      'with the site\'s mailman.cfg'.format(args.config))
    return args


def warm_up_database():
    """Does, read-only, the one-off database work of a process's first message: SQLAlchemy
    configures its mappers and compiles the list and member lookups on first use, which
    made the first message take 87 ms instead of 8 (measured on Mailman 3.3.10). Done
    here, while the process waits as a warm spare, it is off the hand-off's path."""
    from mailman.config import config
    from mailman.interfaces.listmanager import IListManager
    from sqlalchemy.orm import configure_mappers
    from zope.component import getUtility
    try:
        configure_mappers()
        lists = getUtility(IListManager)
        for mlist in lists.mailing_lists:
            lists.get_by_list_id(mlist.list_id).members.get_member('qslice-warm-up@example.invalid')
            break
    except Exception as error:     # only an optimisation: never a reason not to run
        say('database warm-up skipped: {}'.format(error))
    finally:
        config.db.abort()


def main(argv=None):
    global EVENTS
    events = EVENTS = Events()   # first, so that nothing else can write to the channel
    try:
        args = parse_args(argv, events)
    except Refused as refusal:
        events.send('error', refusal)
        say(str(refusal))
        return EXIT_REFUSED
    if args.fork_server:
        return serve_forks(args, events)
    return run_runner(args, events, initialised=False)


def initialise_mailman(config_path):
    """Mailman's start-up, the slow part of a process's life (0.7-2 s of CPU)."""
    from mailman.core.initialize import initialize
    initialize(config_path)
    warm_up_database()


def run_runner(args, events, initialised):
    """The slice runner's life: initialise Mailman unless `initialised` (a child of the
    fork server), say `ready`, wait for `go` or a stop, run the slice."""
    kill_timer = KillTimer()
    if not kill_timer.available:
        say('no kill timer ({}): the leash alone kills this process at its deadline'
            .format(kill_timer.error or 'timer_create failed'))
    gate = Gate(kill_timer)
    starts = queue.Queue()       # the first `go`, or a stop, for the main thread
    signals = SignalThread(gate, starts)
    # Before initialising Mailman: a SIGTERM during start-up must not kill the process.
    signals.install()
    threading.Thread(target=read_commands, args=(gate, starts), name='qslice-commands',
                     daemon=True).start()

    if not initialised:
        initialise_mailman(args.config)
    signals.mailman_initialised = True
    with gate._lock:
        gate.initialising = False
    if gate.reason is not None:
        return finish(gate, events)
    events.send('ready', os.getpid())

    kind, payload = starts.get()
    if kind == 'stop':
        return finish(gate, events)   # a warm spare: nothing in hand
    try:
        return run_slice(args, payload, gate, events)
    except Refused as refusal:
        events.send('error', refusal)
        say(str(refusal))
        return EXIT_REFUSED


# --- the fork server ------------------------------------------------------------------

def serve_forks(args, events):
    """The fork server: initialise Mailman once, then fork initialised slice runners.

    fd 0 is a Unix stream socket. Each request is one line, `fork RUNNER QUEUE`, sent in
    one message with three file descriptors (SCM_RIGHTS): the new runner's stdin, stdout
    and stderr. The child takes them as its fds 0, 1 and 2, becomes a process group of
    its own, and lives as a slice runner started with `--runner RUNNER` that has just
    initialised Mailman: it says `ready PID` on its own stdout and speaks the slice
    runner's protocol from there. The server answers each request with `forked PID` (or
    `error TEXT` for a request it cannot serve) and reports each child it reaps with
    `exited PID STATUS` (STATUS: the exit code, or -SIGNAL). EOF on fd 0 ends it; its
    children live on and die with it only if it is killed (their parent-death signal).

    Mailman is initialised and the database warmed up before the first fork, and the
    connection pool emptied, so that no child shares a database connection."""
    initialise_mailman(args.config)
    release_database()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    requests = socket.socket(fileno=COMMAND_FD)
    events.send('ready', os.getpid())
    say('fork server ready: Mailman initialised once for every slice runner it forks')
    while True:
        readable, _, _ = select.select([requests, wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 512)
        reap_children(events)
        if requests not in readable:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(requests, 4096, 3)
        except OSError as error:
            say('reading fork requests failed ({}); the fork server ends'.format(error))
            return EXIT_STOPPED
        if not data:
            say('fork server: EOF on its requests (qslice is done with it)')
            return EXIT_STOPPED
        words = data.decode('utf-8', 'replace').split()
        if len(words) != 3 or words[0] != 'fork' or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            events.send('error', 'bad fork request {!r} with {} fds; send `fork RUNNER '
                        'QUEUE` with stdin, stdout and stderr'.format(' '.join(words), len(fds)))
            continue
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            become_forked_runner(args, words[1], words[2], fds, parent,
                                 (requests, wake_read, wake_write))
        for fd in fds:
            os.close(fd)
        events.send('forked', pid)


def release_database():
    """Closes the fork server's database connections, so that no forked child inherits
    one (two processes on one connection corrupt its protocol)."""
    from mailman.config import config
    try:
        config.db.abort()
        config.db.engine.dispose()
    except Exception as error:     # a child then opens its own anyway
        say('releasing the fork server\'s database connections failed: {}'.format(error))


def reap_children(events):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        events.send('exited', pid, code)


def become_forked_runner(args, runner, queue_name, fds, parent, server_fds):
    """In a child of the fork server: take the request's fds as 0, 1 and 2 and live as
    a slice runner of `runner`. Never returns."""
    global EVENTS
    status = EXIT_CRASHED
    try:
        requests, wake_read, wake_write = server_fds
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setpgid(0, 0)
        die_with(parent)
        for fd in (wake_read, wake_write):
            os.close(fd)
        requests.detach()
        EVENTS.detach()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.environ['QSLICE_QUEUE'] = queue_name
        child_args = argparse.Namespace(**vars(args))
        child_args.runner, child_args.fork_server = runner, False
        events = EVENTS = Events()
        status = run_runner(child_args, events, initialised=True)
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        say('crashed')
    leave(status)


def die_with(parent):
    """SIGKILL when the fork server dies (it dies with qslice-runner), as a process
    qslice-runner started itself would."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError) as error:
        say('no parent-death signal ({}): this runner outlives a killed fork server'.format(error))
    if os.getppid() != parent:
        os._exit(EXIT_CRASHED)   # the server died before the signal was armed


if __name__ == '__main__':
    try:
        status = main()
    except BaseException:
        # A crash (SystemExit too: Mailman exits from deep inside on some errors).
        # qslice restarts the slice runner.
        traceback.print_exc(file=sys.stderr)
        say('crashed')
        status = EXIT_CRASHED
    leave(status)
