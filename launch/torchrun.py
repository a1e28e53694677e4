"""`python -m epmoe.launch.torchrun <torchrun arguments>`: torchrun, with the ranks' exit statuses
and a rendezvous on loopback.

torchrun's own `main` (torch/distributed/run.py) is `@record`-decorated: any failed rank ends
it with a ChildFailedError report and exit 1, so the one line and exit 2 of a rank that found
the user's error, or the 75 of ranks that saved and stopped on SIGTERM / SIGUSR1, never reach
the launcher or Slurm. This runs the same `parse_args` + `run` and maps the ranks' statuses:
every failed rank 2 -> 2 (their lines were printed already), every one 75 -> 75 (130 -> 130:
Ctrl-C, after a checkpoint), else torch's usual report and 1. Stopped by a signal (torchrun
forwards it to the ranks and waits --shutdown-timeout for them): the ranks' 75 or 130 if they
all saved and agree, else 128 + the signal.

`--rdzv-backend=epmoe-bound` (what `torchrun_command` passes for one node, and for several
with launcher.local_addr): torch's TCPStore server binds the wildcard address (`::` / 0.0.0.0)
whatever host it is given, so `--standalone` leaves torchrun's rendezvous store and the ranks'
store reachable from every interface. The only thing TCPStore honours is `master_listen_fd`,
a socket bound by the caller: this backend is torch's c10d rendezvous with both stores on
sockets bound to --local-addr (127.0.0.1 for one node).
"""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
from datetime import timedelta

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import parse_args
from torch.distributed.run import run as torchrun

from epmoe.comm.process import TCPStore, bound_store
from epmoe.exit_codes import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_PREEMPTED, EXIT_USAGE
from epmoe.launch.commands import DEFAULT_PORT

BOUND_BACKEND = "epmoe-bound"
LOOPBACK = "127.0.0.1"


class _BoundBackend(C10dRendezvousBackend):
    """torch's c10d rendezvous backend under this backend's name (the registry checks it)."""

    @property
    def name(self) -> str:
        return BOUND_BACKEND


def _bound_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's c10d rendezvous handler with both of its stores listening on --local-addr only
    (default 127.0.0.1): the rendezvous store where this node hosts it (--rdzv-conf=is_host,
    default true), and the ranks' store where this node's agent is rank 0."""
    addr = params.local_addr or LOOPBACK
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)
    read_timeout = timedelta(seconds=params.get_as_int("read_timeout", 60) or 60)
    if params.get_as_bool("is_host", True):
        store = bound_store(addr, port, read_timeout.total_seconds())
    else:
        store = TCPStore(host, port, is_master=False, multi_tenant=True, timeout=read_timeout)
    handler = create_handler(store, _BoundBackend(store, params.run_id), params)
    # NOTE: DynamicRendezvousHandler makes the ranks' store (MASTER_ADDR:MASTER_PORT) in
    # _create_tcp_store_server (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py),
    # a wildcard-bound TCPStore; this handler's listens on `addr`. Checked by
    # tests/test_launch_signals.py, which reads a job's listening sockets.
    handler._create_tcp_store_server = lambda _addr, _port: bound_store(addr)
    return handler


# statuses the ranks agree on, which the job passes on: a user error, stopped after a checkpoint
# on SIGTERM / SIGUSR1, or on Ctrl-C
AGREED = (EXIT_USAGE, EXIT_PREEMPTED, EXIT_INTERRUPTED)


def rank_exit_status(codes: list[int]) -> int | None:
    """The job's status when its ranks exited with `codes`: 2 if all found a user error, 75 (or
    130) if all stopped after their checkpoint on SIGTERM / SIGUSR1 (or Ctrl-C); None for
    anything else (a crash, or ranks that disagree)."""
    if codes and codes[0] in AGREED and all(c == codes[0] for c in codes):
        return codes[0]
    return None


def _ranks_codes() -> list[int]:
    """The exit statuses of the ranks torchrun started and has reaped.

    NOTE: on a signal torchrun's agent stops the ranks and raises SignalException without
    their statuses (torch/distributed/launcher/api.py); its SubprocessHandlers' Popen objects,
    the only processes this one started, still hold them. (`type(o) is`, not isinstance: that
    would ask torch's deprecated lazy modules among the objects for their __class__, and warn.)"""
    return [o.returncode for o in gc.get_objects() if type(o) is subprocess.Popen and o.returncode is not None]


class _AgreedExits(logging.Filter):
    """Drops torch's "failed (exitcode: N) local_rank: ..." log line where N is an agreed status:
    the ranks said it themselves in one line (a real failure keeps it, and torch's report)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("failed (exitcode") and args and args[0] in AGREED)


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_AgreedExits())
    rendezvous_handler_registry.register(BOUND_BACKEND, _bound_handler)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun(args)
    except ChildFailedError as e:
        status = rank_exit_status([f.exitcode for f in e.failures.values()])
        if status is None:
            print(e.format_msg(), file=sys.stderr)
            sys.exit(EXIT_JOB_FAILED)
        sys.exit(status)
    except SignalException as e:
        status = rank_exit_status(_ranks_codes())
        sys.exit(128 + int(e.sigval) if status in (None, EXIT_USAGE) else status)


if __name__ == "__main__":
    main()
