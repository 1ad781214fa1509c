"""The mirror: run a local program on a remote host inside a FUSE mirror of the local file system.

Why: a program (and its libraries, inputs and outputs) lives on this machine,
but the CPU we want is elsewhere. The host gets nothing installed: an agent
zipapp is shipped over the SSH connection and cached by content hash; it
mounts this machine's file system over FUSE (every file operation becomes a
request on the same SSH channel, answered here as the local user), chroots
the command into it with the host's own /dev, /proc, /sys and /run, and
carries stdio, signals and the exit status back.

Modules:

* :mod:`.protocol` -- frames (JSON header + raw bytes), shared with the agent, and
  :mod:`.packing` (the codecs both ends have, and when packing a payload pays);
* :mod:`.service` -- the local file service (errno preserved), with
  :mod:`.replies` (handle table, reply), :mod:`.sendahead` (lookups, whole
  files and libraries sent before the host asks), :mod:`.xattrs` (extended
  attributes), :mod:`.linuxcalls`;
* :mod:`.localnames` -- files unlinked while open held here, paths beyond PATH_MAX;
* :mod:`.agent` -- the remote side's entry point; its parts are the package
  :mod:`.host` (link, caches, profile, FUSE operations, mount, namespaces,
  command, session, jobs: exec and daemon/attach);
* :mod:`.hardlinks` -- (agent side) every name of a hard-linked file shows its current attributes;
* :mod:`.bundle` -- the shipped zipapp and its cache-or-upload launch line;
* :mod:`.components` -- :func:`serve_components` for the runner (one daemon per host);
* :mod:`.session` -- the local side: :func:`~.session.run_command` (``remote-runner exec``)
  and :class:`~.session.MirrorServer` (the runner's ``component.mirror = True``), with
  :mod:`.locallink` (the link's local end), :mod:`.streams`, :mod:`.environment`
  (what a command takes along) and :mod:`.terminal`.

Runner API: ``remote_runner.runner`` calls :func:`serve_components` (connections,
mirrored specs) and gets an object with ``argv(spec, base_dir)`` and ``close()``;
underneath, per host::

    from remote_runner.mirror.session import MirrorServer
    server = MirrorServer(conn).start()       # conn: remote_runner.ssh.Connection
    argv = server.window_argv(["prog", "arg"], cwd="/local/dir", env={"X": "1"})
    # run argv (shlex-quoted) in the screen window: it exits with the command's
    # status (128+N if killed by signal N), or 254 if the mirror/link is gone.
    server.close()                            # unmounts, kills what still runs

Exit codes of ``exec``: the command's own status; 254 (errors.EXIT_LINK)
when the tool or the link failed.
"""


def serve_components(connections, specs):
    """Start the mirrors the runner needs; see :func:`remote_runner.mirror.components.serve_components`."""
    from remote_runner.mirror.components import serve_components as _serve
    return _serve(connections, specs)
