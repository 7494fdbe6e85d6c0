"""The Ray backend of the worker pool: the same `map` as the local pool, on a Ray cluster.

    from pool import make_pool
    with make_pool("ray", 64, init_worker, (logdir, True, config), ray_address="10.0.0.1:6379") as pool:
        returns = pool.map(episodes_task, tasks)

One Ray actor per worker, each its own process holding 1 CPU: it runs `initializer(*initargs)`
once (load V and M, make an env: the initializers set module globals, and an actor process
keeps them like a spawned local worker does), then `fn(*task)` calls, one at a time. Tasks
are pure functions of their arguments, so results do not depend on the backend.

Failures are handled as in pool/base.py, for both backends (this module imports `ray` at the
top: import it only through pool.make_pool, which says in one line how to install Ray when it
is missing):
- a task that raises stops the map with WorkerError holding the worker's traceback (a bug is
  not retried);
- an actor that dies (its process killed, its node lost) or runs one task past
  `task_timeout` (then `ray.kill`ed) is replaced by a new actor and its task rerun
  elsewhere, up to `max_retries` times per task; one lost while starting up is replaced too,
  up to `max_retries + 1` times in a row;
- an actor that cannot start (an initializer error, code missing on a node) or is not placed
  within `start_timeout` (no free CPU in the cluster) is a WorkerError: nothing waits forever.
A task's clock starts once its actor has imported the task's function (a `prepare` call
queued just before the task, the first time an actor meets a function), as in the local pool.

Where Ray runs:
- no address (neither `ray_address` nor RAY_ADDRESS): a private local Ray for this process,
  with `workers` CPUs, bound to 127.0.0.1 only, stopped by `close()`;
- an address: the cluster there is joined. Every node needs this checkout at the same path
  (actors import the project's modules from it) and the same Python packages; paths in
  task arguments (--logdir, --rootdir) must name the same files on every node, i.e. a
  shared filesystem (actors start in the driver's working directory when it exists there).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from pool.base import BasePool, Event, Slot, WorkerError
from utils.errors import BadInputError, StageError

ROOT = Path(__file__).resolve().parents[1]  # the checkout; actors import the project from here
# Ray rewrites a loopback address (127.0.0.1, localhost) to this machine's routable IP, and then
# binds its servers to all interfaces. With this variable at 0, Ray's single-machine mode, it
# keeps 127.0.0.1 and binds to it alone. Only set for a private local Ray, or to join a cluster
# that listens on loopback only (`ray start --head --node-ip-address 127.0.0.1` with it set).
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# -- where the cluster is --------------------------------------------------------------------
def resolve_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else $RAY_ADDRESS, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def _host_port(address: str) -> tuple[str, int] | None:
    """("host", port) for a plain host:port address; None for "auto", "ray://..." and the like."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return None
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _reachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return error.strerror or type(error).__name__


def _routable_ip() -> str | None:
    """This machine's outward IP (a UDP connect sends nothing), or None without a route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
    except OSError:
        return None


def check_address(address: str | None) -> None:
    """Stop with one line if the cluster at `address` (or $RAY_ADDRESS) cannot be reached.

    Ray itself retries an unreachable address for minutes without saying why; a plain TCP
    connection to the head's port answers at once.
    """
    address = resolve_address(address)
    target = _host_port(address) if address else None
    if target is None:
        return
    problem = _reachable(*target, timeout=5.0)
    if problem is not None:
        raise BadInputError(
            f"cannot reach a Ray cluster at {address} ({problem}); start one with "
            f"`ray start --head --port {target[1]}` or fix --ray-address / RAY_ADDRESS"
        )


def _keep_loopback() -> None:
    """Make this process's Ray keep 127.0.0.1 as the node address (see _LOOPBACK_ENV)."""
    os.environ[_LOOPBACK_ENV] = "0"  # for the Ray processes a local ray.init starts
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False  # ray read the variable when it was imported


def connect(address: str | None, cpus: int) -> bool:
    """ray.init for this process unless it is connected already; True if this call connected.

    Quiet: Ray's own log at WARNING, no dashboard; the actors' stdout and stderr still reach
    this terminal (prefixed by Ray) as a local worker's would. Ray's SIGTERM handler (exit at
    once) is undone, so a script's own clean shutdown on `kill` still runs.
    """
    if ray.is_initialized():
        return False
    address = resolve_address(address)
    check_address(address)
    target = _host_port(address) if address else None
    if address is None or (target and _is_loopback(target[0]) and _loopback_only(*target)):
        _keep_loopback()
    options: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address is None:
        # "local" starts a new Ray even when one is running on this machine, which a bare
        # ray.init() would join instead. Its token-auth notice is not news to anyone here.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        options |= dict(address="local", num_cpus=cpus, include_dashboard=False)
    else:
        options |= dict(address=address)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(**options)
    except Exception as error:  # version mismatch, refused connection, ...: one line
        where = f"join the Ray cluster at {address}" if address else "start a local Ray"
        details = "".join(traceback.format_exception(error))
        if "InvalidAuthToken" in details or "AuthenticationError" in details:
            raise BadInputError(
                f"cannot {where}: its token authentication refused this process; set RAY_AUTH_MODE=token "
                f"and give it the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN_PATH), or RAY_AUTH_MODE "
                f"to the cluster's own setting"
            ) from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
        raise StageError(f"cannot {where} ({type(error).__name__}: {first})") from None
    finally:
        if main_thread and previous is not None:  # None: a handler not set from Python; leave Ray's
            signal.signal(signal.SIGTERM, previous)
    return True


def _loopback_only(host: str, port: int) -> bool:
    """Whether a cluster found at a loopback address listens on loopback only.

    A default `ray start --head` listens on all interfaces under this machine's routable IP,
    which is what Ray turns 127.0.0.1 into; one started on 127.0.0.1 alone must be joined
    there, with Ray kept from rewriting the address.
    """
    routable = _routable_ip()
    return routable is None or _is_loopback(routable) or _reachable(routable, port, timeout=2.0) is not None


# -- functions by name -----------------------------------------------------------------------
@dataclass(frozen=True)
class _ByName:
    """A module-level function named by (module, qualname), imported where it runs.

    A script run as `python data/generation_script.py` defines its worker functions in
    `__main__`, which on a Ray worker is Ray's own worker script, so cloudpickle would copy
    each function by value with a private copy of the script's globals, and the globals the
    initializer sets would never reach the tasks. Importing the script's module by name gives
    the initializer and the tasks one module, as in a spawned local worker.
    """

    module: str
    qualname: str

    def resolve(self) -> Callable:
        target: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            target = getattr(target, part)
        return target


def _main_file() -> Path | None:
    """The file of the `__main__` script, None in an interactive session."""
    file = getattr(sys.modules["__main__"], "__file__", None)
    return Path(file).resolve() if file else None


def _portable(fn: Callable | None) -> Callable | _ByName | None:
    """`fn` itself, or a _ByName for a function of the `__main__` script.

    The script's module name is its path inside this checkout (data/generation_script.py is
    `data.generation_script`), or its file name for a script elsewhere, whose folder then goes
    on the actors' PYTHONPATH (see RayPool).
    """
    if fn is None or getattr(fn, "__module__", None) != "__main__":
        return fn
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None and spec.name:  # python -m package.module
        return _ByName(spec.name, fn.__qualname__)
    path = _main_file()
    if path is None:  # interactive: let cloudpickle copy the function by value
        return fn
    parts = path.relative_to(ROOT).with_suffix("").parts if path.is_relative_to(ROOT) else (path.stem,)
    return _ByName(".".join(parts), fn.__qualname__)


def _resolve(fn: Callable | _ByName) -> Callable:
    return fn.resolve() if isinstance(fn, _ByName) else fn


# -- the actor -------------------------------------------------------------------------------
def _writable(args: tuple) -> tuple:
    """`args` with read-only numpy arrays copied.

    Ray hands numpy arguments over read-only (zero copy from its object store); a local
    worker gets its own writable copies, and tasks may rely on that (torch warns on
    read-only arrays, in-place updates would fail).
    """
    return tuple(np.array(a) if isinstance(a, np.ndarray) and not a.flags.writeable else a for a in args)


class _Worker:
    """One pool worker in its own Ray worker process; errors come back as values.

    A task's exception is returned as ("error", traceback text) rather than raised, so that in
    the driver every Ray exception means a lost actor (rerun the task) and never a bug in the
    task (stop). The initializer's error is kept for `ready()` to report, for the same reason.
    """

    def __init__(self, initializer: Callable | _ByName | None, initargs: tuple, cwd: str) -> None:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the driver, which stops us
        except ValueError:  # not the main thread of this process: nothing to ignore then
            pass
        # One compute thread per worker: the pool supplies the parallelism.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = "1"
        self.error: str | None = None
        try:
            if os.path.isdir(cwd):
                os.chdir(cwd)  # relative --logdir / --rootdir mean what they mean to the driver
            if initializer is not None:
                _resolve(initializer)(*_writable(initargs))
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(1)
        except BaseException:  # a StageError or a SystemExit too
            self.error = traceback.format_exc()

    def ready(self) -> tuple[int, str, str | None]:
        """(pid, host, initializer traceback or None): the actor has started."""
        return os.getpid(), socket.gethostname(), self.error

    def prepare(self, fn: Callable | _ByName) -> None:
        """Import `fn`'s module (receiving `fn` does, or resolving it); an error is left for `run` to report."""
        try:
            _resolve(fn)
        except BaseException:
            pass

    def run(self, fn: Callable | _ByName, args: tuple) -> tuple[str, Any]:
        args = _writable(args)
        try:
            return "ok", _resolve(fn)(*args)
        except BaseException:
            return "error", traceback.format_exc()


_RemoteWorker = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_Worker)


@dataclass(eq=False)  # slots are compared by identity
class _Actor(Slot):
    actor: Any = None
    ready_ref: Any = None  # ObjectRef of ready() until the actor has started, then None
    created: float = 0.0
    pid: int | None = None
    host: str | None = None
    prepare_ref: Any = None  # ObjectRef of prepare() queued before the task in flight
    ref: Any = None  # ObjectRef of the task in flight
    prepared: set = field(default_factory=set)  # functions this actor has imported


class RayPool(BasePool):
    """`workers` Ray actors running `fn(*args)` tasks; the interface of pool.local.WorkerPool.

    Use as a context manager; `map` may be called many times (one CMA-ES generation each) and
    reuses the same initialised actors. See the module docstring for failures and addresses.
    """

    startup_hint = f" (is this checkout at {ROOT} on every node, with the same packages?)"

    def __init__(
        self,
        workers: int,
        initializer: Callable | None = None,
        initargs: tuple = (),
        task_timeout: float | None = None,
        max_retries: int = 2,
        log: Callable[[str], None] | None = None,
        address: str | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.address = address
        self.start_timeout = start_timeout
        self._owns_ray = False
        super().__init__(workers, initializer, initargs, task_timeout, max_retries, log)

    # -- lifecycle -----------------------------------------------------------------------
    def _open(self) -> None:
        """Join or start Ray; use as many actors as the cluster can ever place, with what they need to import."""
        self._owns_ray = connect(self.address, self.n_workers)
        # An actor holds a CPU: actors beyond the cluster's CPUs would wait forever. Ones that
        # wait for CPUs other jobs hold are bounded by start_timeout instead.
        total = int(ray.cluster_resources().get("CPU", 0))
        if total < self.n_workers:
            self.log(
                f"warning: the Ray cluster has {total} CPU(s); using {max(total, 1)} worker(s) "
                f"instead of {self.n_workers}"
            )
            self.n_workers = max(total, 1)
        self._initializer = _portable(self.initializer)
        # Actors import the project from this checkout, and (through sys.path entries inside it,
        # e.g. tests/, or a script's own folder) whatever module defines the task functions.
        prefix = Path(sys.prefix).resolve()  # a .venv inside the checkout is not project code
        paths = [str(ROOT)] + [
            p
            for p in sys.path
            if p and Path(p).resolve().is_relative_to(ROOT) and not Path(p).resolve().is_relative_to(prefix)
        ]
        main = _main_file()
        if main is not None and not main.is_relative_to(ROOT):
            paths.append(str(main.parent))  # a script elsewhere: its functions import by file name
        if os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        self._runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}

    def _start(self) -> _Actor:
        actor = _RemoteWorker.options(runtime_env=self._runtime_env).remote(
            self._initializer, self.initargs, os.getcwd()
        )
        return _Actor(actor=actor, ready_ref=actor.ready.remote(), created=time.monotonic())

    def _stop(self, slot: _Actor) -> None:
        try:
            ray.kill(slot.actor)  # a hung actor stops here; a dead one is unaffected
        except Exception:  # already dead, or Ray already gone
            pass

    def _shutdown(self) -> None:
        """Stop the local Ray if this pool started it."""
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the current actors (None while one is starting); tests kill one."""
        return [slot.pid for slot in self._slots]

    # -- running tasks -------------------------------------------------------------------
    def _portable(self, fn: Callable) -> Callable | _ByName:
        return _portable(fn)

    def _send(self, slot: _Actor, fn: Callable | _ByName, args: tuple) -> bool:
        first_time = fn not in slot.prepared
        if first_time:  # the actor imports fn first; the clock starts when that is done
            slot.prepared.add(fn)
            slot.prepare_ref = slot.actor.prepare.remote(fn)
        slot.ref = slot.actor.run.remote(fn, args)
        return not first_time

    def _poll(self, timeout: float) -> list[Event]:
        # Every call in flight: (order, slot, what its result means); a slot's start comes before its task.
        waiting = {
            slot.ready_ref: (0, slot, self._started) for slot in self._slots if slot.ready_ref is not None
        }
        waiting |= {
            slot.prepare_ref: (1, slot, self._prepared)
            for slot in self._slots
            if slot.prepare_ref is not None
        }
        waiting |= {slot.ref: (2, slot, self._finished) for slot in self._slots if slot.ref is not None}
        done = ray.wait(list(waiting), num_returns=1, timeout=timeout)[0] if waiting else []
        if done:  # take everything that has finished meanwhile, not one per poll
            done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        events: list[Event] = []
        for _, slot, meaning in sorted((waiting[ref] for ref in done), key=lambda entry: entry[0]):
            events.append((slot, *meaning(slot)))
        now = time.monotonic()
        for slot in self._slots:
            if slot.ready_ref is not None and now - slot.created > self.start_timeout:
                raise WorkerError(
                    f"a Ray worker did not start within {self.start_timeout:.0f}s "
                    f"(no free CPU in the cluster? see `ray status`)"
                )
        return events

    def _started(self, slot: _Actor) -> tuple[str, Any]:
        """The event for a finished ready() call."""
        ref, slot.ready_ref = slot.ready_ref, None
        try:
            slot.pid, slot.host, init_error = ray.get(ref)
        except RayError as error:
            if isinstance(error, RayActorError) and not error.actor_init_failed:  # killed, node lost
                return "died", f"was lost ({type(error).__name__})"
            # __init__'s arguments or the class could not be loaded there, or its runtime env failed
            raise WorkerError(f"a Ray worker failed to start{self.startup_hint}:\n{error}") from None
        return ("init_error", init_error) if init_error is not None else ("ready", None)

    def _prepared(self, slot: _Actor) -> tuple[str, Any]:
        """The event for a finished prepare() call: the task is running (errors come with its result)."""
        try:
            ray.get(slot.prepare_ref)
        except RayError:
            pass
        slot.prepare_ref = None
        return "started", None

    def _finished(self, slot: _Actor) -> tuple[str, Any]:
        """The event for a finished run() call."""
        ref, slot.ref = slot.ref, None
        try:
            return ray.get(ref)
        except RayTaskError as error:  # run() returns errors: this is e.g. an unpicklable result
            return "error", str(error)
        except RayError as error:  # the actor or its node is gone: rerun the task elsewhere
            return "died", f"was lost ({type(error).__name__})"

    def _name(self, slot: _Actor) -> str:
        return (
            f"Ray worker pid {slot.pid} on {slot.host}"
            if slot.pid is not None
            else "Ray worker (not started yet)"
        )
