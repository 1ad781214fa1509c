"""The runner's entry point: mirrors for the components marked ``mirror = True``.

The runner (``remote_runner.runner``) calls :func:`serve_components` once per
run with its open connections and the mirrored component specs; it gets back
a :class:`ComponentMirrors` whose ``argv(spec, base_dir)`` is what each screen
window runs, and whose ``close()`` ends every mirror after the components
have ended. One daemon agent per host serves all of that host's components.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Sequence

from remote_runner.errors import MirrorError
from remote_runner.mirror.session import MirrorOptions, MirrorServer

LOG = logging.getLogger(__name__)


class ComponentMirrors:
    """Running mirrors, one per host, for the runner's mirrored components."""

    def __init__(self, servers: Dict[str, MirrorServer], cwd: Optional[str] = None) -> None:
        self.servers = servers
        self.cwd = cwd or os.getcwd()

    def local_cwd(self, spec: Any) -> str:
        """Return the local directory the component runs in: its base_dir if that exists here, else ours."""
        base = getattr(spec, "base_dir", None)
        if base and os.path.isdir(base):
            return base
        return self.cwd

    def argv(self, spec: Any, base_dir: str) -> List[str]:
        """Return the argv the screen window runs for *spec* (inside the host's mirror)."""
        server = self.servers.get(spec.host)
        if server is None:
            raise MirrorError(f"host {spec.host}: no mirror was started for component {spec.name!r}")
        cwd = self.local_cwd(spec)
        exe = spec.executable
        if "/" not in exe and os.path.exists(os.path.join(cwd, exe)):
            exe = "./" + exe
        return server.window_argv([exe, *spec.args], cwd=cwd)

    def close(self) -> None:
        """End every mirror (commands still running in them are stopped)."""
        for server in self.servers.values():
            try:
                server.close()
            except Exception as exc:  # closing must reach every host
                LOG.warning("mirror on %s: close failed: %s", server.link.host if server.link else "?", exc)


def serve_components(connections: Dict[str, Any], specs: Sequence[Any],
                     options: Optional[MirrorOptions] = None) -> ComponentMirrors:
    """Start one mirror per host that has mirrored *specs* (in parallel); raise MirrorError on failure."""
    hosts = sorted({spec.host for spec in specs})
    servers: Dict[str, MirrorServer] = {}
    errors: Dict[str, BaseException] = {}
    lock = threading.Lock()

    def start(host: str) -> None:
        try:
            conn = connections[host]
            here = ComponentMirrors({})
            mine = [spec for spec in specs if spec.host == host]
            commands = [([spec.executable, *spec.args], here.local_cwd(spec)) for spec in mine]
            base = options or MirrorOptions()
            export = tuple(base.export) + tuple(e for spec in mine for e in getattr(spec, "export", ()))
            private_tmp = base.private_tmp or any(getattr(spec, "private_tmp", False) for spec in mine)
            server = MirrorServer(conn, dataclasses.replace(base, export=export, private_tmp=private_tmp),
                                  commands=commands).start()
        except BaseException as exc:  # reported together below
            with lock:
                errors[host] = exc
            return
        with lock:
            servers[host] = server

    threads = [threading.Thread(target=start, args=(host,), daemon=True) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        ComponentMirrors(servers).close()
        detail = "; ".join(f"{host}: {exc}" for host, exc in sorted(errors.items()))
        raise MirrorError(f"the mirror could not start: {detail}")
    return ComponentMirrors(servers)
