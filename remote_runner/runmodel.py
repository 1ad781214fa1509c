"""What a run is told and what it reports: the data the runner, the CLI and the record share.

Kept apart from :mod:`remote_runner.runner` (the orchestration of one run) so
that the commands that work from a finished run's record, the recap and the
JSON output can use these types without the run's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from remote_runner import screen as scr
from remote_runner.errors import MirrorError
from remote_runner.failpolicy import DEFAULT_FORKS, FailLimit
from remote_runner.sync import HostSync

if TYPE_CHECKING:  # pragma: no cover
    from remote_runner.config import ComponentSpec
    from remote_runner.ssh import Connection


# --------------------------------------------------------------------------- options and results

@dataclass(frozen=True)
class RunOptions:
    """How a run behaves (the classic CLI's flags, minus SSH and config)."""

    screen: str = "runner"
    kill_first: bool = True
    zombie: bool = True
    terminate: bool = False
    always_copy: bool = False
    #: trust no remembered SHA-1 (host manifests, local cache): hash everything, rewrite them
    rehash: bool = False
    remote_done_dir: Optional[str] = None
    wait_timeout: Optional[float] = None
    start_timeout: float = 30.0
    terminate_grace: float = 10.0
    forks: int = DEFAULT_FORKS
    #: Seconds between reads of waited components' last log lines (0: never), for live views.
    tail_logs: float = 0.0
    #: hosts that may stay unreachable (skipped, the rest runs; exit 8); None: all-or-nothing
    max_fail: Optional[FailLimit] = None
    #: A component without ``ready`` is started once it is alive this long after its start.
    settle: float = 1.0
    #: Given by the caller so the record and the host directories share it; else made up.
    run_id: Optional[str] = None


@dataclass(frozen=True)
class Placement:
    """Where one component lives on its host once the host is prepared."""

    spec: "ComponentSpec"
    base_dir: str
    window: scr.Window
    temp_base: bool


@dataclass
class ComponentResult:
    """What happened to one component."""

    host: str
    name: str
    base_dir: str
    pid: Optional[int] = None
    status: Optional[int] = None
    failure: Optional[str] = None
    terminated: bool = False


@dataclass
class RunReport:
    """Everything a run did, for the CLI to summarise."""

    session: Dict[str, str] = field(default_factory=dict)
    state_dirs: Dict[str, str] = field(default_factory=dict)
    sync: Dict[str, HostSync] = field(default_factory=dict)
    components: Dict[Tuple[str, str], ComponentResult] = field(default_factory=dict)
    #: unreachable hosts skipped under --max-fail -> why
    skipped: Dict[str, str] = field(default_factory=dict)
    #: host -> exec channels, SFTP sessions and requests its connection made (traffic.py)
    traffic: Dict[str, Dict[str, int]] = field(default_factory=dict)
    #: each remote host name -> the name its login group goes by (aliases of one login)
    host_of: Dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> Dict[str, str]:
        return {f"{r.host}:{r.name}": r.failure for r in self.components.values() if r.failure}


# --------------------------------------------------------------------------- mirror hook

class MirrorSession(Protocol):
    """What the mirror provides while mirrored components run (see remote_runner.mirror)."""

    def argv(self, spec: "ComponentSpec", base_dir: str) -> List[str]:
        """Return the argv a window runs to start *spec* inside the mirror."""

    def close(self) -> None:
        """Stop serving (called after every mirrored component has ended)."""


MirrorFactory = Callable[[Dict[str, "Connection"], Sequence["ComponentSpec"]], MirrorSession]


def default_mirror_factory(connections: Dict[str, "Connection"],
                           specs: Sequence["ComponentSpec"]) -> MirrorSession:
    """Start the mirror for *specs* through ``remote_runner.mirror.serve_components``."""
    try:
        from remote_runner import mirror
        serve = getattr(mirror, "serve_components")
    except (ImportError, AttributeError, OSError) as exc:
        raise MirrorError(f"mirror=True components need remote_runner.mirror.serve_components "
                          f"({exc})") from exc
    return serve(connections, specs)


def path_lookup(spec: "ComponentSpec") -> Optional[str]:
    """Return the bare executable name to look up on the host's PATH, or None.

    A name without ``/`` runs from base_dir when it is there (a copied file),
    and otherwise is looked up on the PATH of the host.
    """
    exe = spec.executable
    return exe if "/" not in exe else None


def component_argv(spec: "ComponentSpec") -> List[str]:
    """Return the argv a window runs for *spec* (relative executables are in base_dir)."""
    exe = spec.executable
    if not exe.startswith("/") and "/" not in exe:
        exe = "./" + exe
    return [exe, *spec.args]
