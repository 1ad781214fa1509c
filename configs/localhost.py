"""A localhost-only config: runs two small programs on this machine, no SSH involved.

    remote_runner.py -c configs/localhost.py

Relative executables of localhost components are relative to this file's directory, and
localhost components may not have ``files`` (nothing is copied locally). ``hello`` is waited
for; ``goodbye`` starts after it has been started (higher start_index).
"""

hello = Component()
hello.name = "hello"
hello.host = localhost
hello.executable = "scripts/hello.sh"        # -> <this directory>/scripts/hello.sh
hello.args = ["from the localhost config", "$HOME is not expanded"]
hello.start_index = 1
hello.wait = True
config.add_component(hello)

goodbye = Component(name="goodbye", host=localhost, executable="/bin/sh",
                    args=["-c", "echo goodbye from $(hostname)"], start_index=2)
config.add_component(goodbye)
