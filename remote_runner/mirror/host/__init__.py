"""The agent's parts: the code that runs on the host, shipped in the zipapp as ``rrmirror.host``.

Everything here is stdlib-only and Python 3.8 compatible (the host is not this
machine: another Debian release, an old python3), and imports mfusepy only
once :func:`.mount.choose_libfuse` has picked the libfuse version. The entry
point that ties the parts together is :mod:`remote_runner.mirror.agent`.

* :mod:`.link` -- the framed channel to this machine (requests, heartbeat);
* :mod:`.caches` -- attributes sent ahead, whole-file copies kept between sessions;
* :mod:`.profile` -- the names a command looked up last time (warm start);
* :mod:`.listings` -- whole directory answers kept between sessions, confirmed at start;
* :mod:`.names` -- local names' attributes and whole directories, kept until invalidated;
* :mod:`.answers` -- what replies and ``inval`` frames teach the name cache;
* :mod:`.kernel` -- the kernel's copy of changed names dropped, on its own thread;
* :mod:`.writes` -- writes and changes sent without waiting, and what the host guesses meanwhile;
* :mod:`.written` -- what the host wrote into a file, answering its reads and size until the close;
* :mod:`.operations` -- the FUSE operations, each one a request over the link unless a cache answers;
* :mod:`.state` -- what a mount keeps between operations, and the one request path;
* :mod:`.fusebinding` -- the mfusepy FUSE class, with the binding's fixes;
* :mod:`.mount` -- libfuse choice, /dev/fuse check, one FUSE mount in its thread;
* :mod:`.namespaces` -- mount/user namespaces, the host's /dev /proc /sys /run bound in;
* :mod:`.command` -- the command's process (chroot, ids, tty) and its descendants;
* :mod:`.session` -- one mirror: namespaces + mounts + warm start, torn down as one;
* :mod:`.jobs` -- ``exec`` (stdio over the link) and ``daemon``/``attach`` (SCM_RIGHTS).
"""
