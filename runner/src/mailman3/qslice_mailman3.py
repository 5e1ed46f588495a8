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

    go SLICE COUNT EPOCH LEASE_MS
        Run slice SLICE of COUNT of the runner's queue for claim epoch EPOCH (an integer,
        only logged), taking messages for LEASE_MS more milliseconds from the moment the
        command is read. COUNT must be a power of two >= 1 (Mailman 3 slices queues only
        that way), 0 <= SLICE < COUNT, LEASE_MS >= 0, and the runner must exist
        ([runner.NAME]) and manage a queue; otherwise: `error <text>`, exit 2. The slice
        count is set in process (config.push of `[runner.NAME] instances: COUNT`), so
        mailman.cfg's `instances` does not matter. Building the runner recovers the
        slice's .bak files, as Mailman does. Then `running SLICE COUNT`, and the runner
        loop. A second `go` is logged on stderr and ignored.
    lease MS
        Messages may be taken until now + MS (CLOCK_BOOTTIME, which keeps counting through
        a suspend). Replaces the deadline. Ignored (logged) before `go`, and once the
        deadline has passed: a lapsed lease is never revived.
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
closing the gate also sets the runner's stop flag, so run() leaves its loop. The idle
sleep is an Event wait that a stop or the deadline cuts short. Nothing ever raises
inside dequeue, processing or finish.
"""

import argparse
import os
import queue
import signal
import sys
import threading
import time
import traceback

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

NODE = os.environ.get('QSLICE_NODE') or '-'


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
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._deadline = None   # lease clock seconds; None until `go` is read
        self._runner = None     # the Mailman runner, once built, to stop its loop
        self.reason = None      # None while open, then 'stopped' or 'fenced'
        self.why = ''           # what closed it, for the logs
        # Set when the gate closes: wakes the idle sleep at once.
        self.wake = threading.Event()

    def attach(self, runner):
        """The runner whose loop closing the gate stops."""
        with self._lock:
            self._runner = runner
            if self.reason is not None:
                runner.stop()

    def set_lease(self, ms):
        """Messages may be taken for `ms` more milliseconds. False if too late."""
        with self._lock:
            if not self._check():
                return False
            self._deadline = lease_clock() + ms / 1000.0
            return True

    def stop(self, why):
        """Take no other message (the one in hand is finished)."""
        with self._lock:
            if self._check():
                self._close('stopped', why)

    def is_open(self):
        """True while a message may be taken; closes the gate if the lease lapsed."""
        with self._lock:
            return self._check()

    def seconds_left(self):
        """Seconds until the deadline, or None before `go`."""
        with self._lock:
            if self._deadline is None:
                return None
            return self._deadline - lease_clock()

    def _check(self):
        # Caller holds the lock. A lapsed deadline closes the gate the moment anyone
        # looks, so a renewal that comes too late cannot reopen it.
        if self.reason is not None:
            return False
        if self._deadline is not None and lease_clock() >= self._deadline:
            self._close('fenced', 'lease lapsed')
            return False
        return True

    def _close(self, reason, why):
        # Caller holds the lock.
        self.reason, self.why = reason, why
        self.wake.set()
        if self._runner is not None:
            # Only sets Runner._stop: run() leaves its loop after the current pass.
            self._runner.stop()


# --- stop requests: commands, EOF and signals -------------------------------------------

def request_stop(gate, starts, why):
    """Close the gate and wake the main thread if it still waits for `go`."""
    gate.stop(why)
    starts.put(('stop', why))


def read_commands(gate, starts):
    """Command thread: apply qslice's commands as they arrive, so that a `lease` or a
    `stop` is seen while the main thread is busy inside Mailman."""
    go_read = False
    try:
        for raw in sys.stdin.buffer:
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
                # The lease runs from receipt, not from when the main thread gets to it.
                lease_ms = parse_int(args[3]) if len(args) == 4 else None
                if lease_ms is not None and lease_ms >= 0:
                    gate.set_lease(lease_ms)
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


def renew_lease(gate, go_read, args):
    ms = parse_int(args[0]) if len(args) == 1 else None
    if ms is None or ms < 0:
        say('ignoring malformed lease {!r}; send lease MS with MS a non-negative integer'
            .format(' '.join(args)))
    elif not go_read:
        say('ignoring lease before go: the lease starts with go')
    elif not gate.set_lease(ms):
        say('ignoring lease {}: the gate is already closed ({})'.format(ms, gate.why))


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
        raise Refused('go takes SLICE COUNT EPOCH LEASE_MS, got {!r}; send e.g. go 0 4 1 60000'
                      .format(' '.join(args)))
    values = []
    for name, text in zip(('SLICE', 'COUNT', 'EPOCH', 'LEASE_MS'), args):
        value = parse_int(text)
        if value is None:
            raise Refused('go: {} {!r} is not an integer; send go SLICE COUNT EPOCH LEASE_MS '
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
        raise Refused('go: LEASE_MS {} is negative; send the milliseconds the claim is valid for'
                      .format(lease_ms))
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


def gate_runner(runner, gate):
    """Make `runner` take messages only while `gate` is open and sleep on its Event.

    Both objects get a subclass of their own class made here (same names, so Mailman's
    logs read the same): the switchboard's `files` becomes a GatedListing, and the
    runner's idle sleep an Event wait.
    """
    switchboard_class = type(runner.switchboard)

    class GatedSwitchboard(switchboard_class):
        @property
        def files(self):
            # Looking at the gate here too makes an empty pass notice a lapsed lease.
            gate.is_open()
            return GatedListing(super().files, gate)

    runner_class = type(runner)

    class GatedRunner(runner_class):
        def _snooze(self, filecnt):
            # As Runner._snooze: sleep only after a pass that found nothing.
            if filecnt or self.sleep_float <= 0:
                return
            timeout = self.sleep_float
            left = gate.seconds_left()
            if left is not None:
                # Wake at the deadline: it must be honoured while idle too.
                timeout = max(0.0, min(timeout, left))
            gate.wake.wait(timeout)
            # Closes the gate (and stops the loop) if it was the deadline that woke us.
            gate.is_open()

    for made, base in ((GatedSwitchboard, switchboard_class), (GatedRunner, runner_class)):
        made.__name__, made.__qualname__ = base.__name__, base.__qualname__
    runner.switchboard.__class__ = GatedSwitchboard
    runner.__class__ = GatedRunner
    gate.attach(runner)


def runner_line(name, slice_, count, epoch, what):
    return 'qslice slice runner: {} slice {}/{} epoch {} node {} pid {} {}'.format(
        name, slice_, count, epoch, NODE, os.getpid(), what)


def run_slice(args, go, gate, events):
    """Check and run a `go`; return the exit status."""
    import logging
    from mailman.config import config

    slice_, count, epoch, _ = check_go(go, args.runner)
    if gate.reason is not None:
        return finish(gate, events)   # stopped while the go waited; take nothing
    runner = build_runner(args.runner, slice_, count)
    gate_runner(runner, gate)
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
    events = Events()            # first, so that nothing else can write to the channel
    gate = Gate()
    starts = queue.Queue()       # the first `go`, or a stop, for the main thread
    signals = SignalThread(gate, starts)
    # Before initialising Mailman: a SIGTERM during start-up must not kill the process.
    signals.install()
    try:
        args = parse_args(argv, events)
    except Refused as refusal:
        events.send('error', refusal)
        say(str(refusal))
        return EXIT_REFUSED
    threading.Thread(target=read_commands, args=(gate, starts), name='qslice-commands',
                     daemon=True).start()

    from mailman.core.initialize import initialize
    initialize(args.config)
    warm_up_database()
    signals.mailman_initialised = True
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
