"""Example experiment: a pub/sub broker, subscribers, publishers and a checker on lab hosts.

Run it (the lead's scripts/demo.sh does this on the lab):

    remote_runner.py -F "$(remote-runner lab ssh-config)" -c examples/experiment.py \
        -m muddlers/ta3_muddler.py

What runs where (HOSTS = h1,h2,h3 by default):

    start 1  server             on HOSTS[0]   pubsub.py broker
    start 2  subscriber-<host>  on HOSTS[1:]  subscribes, exits 0 after every message arrived
    start 3  publisher-<host>   on HOSTS[1:]  waits for all subscribers, publishes MESSAGES messages
                                              (the TA3 muddler wraps these in its test harness)
    start 4  checker            on HOSTS[-1]  wait=True: exits 0 once the broker answered and all
                                              the traffic went through (1 after a timeout)

Everything the hosts run is shipped with ``files`` (one python3 script, examples/demo/pubsub.py);
the hosts need nothing but python3. Each component gets a fresh temporary base_dir.

Settings, from the demo arg parser (``-a examples/demo_arg_parser.py --extra-args "..."``) or
else from the environment:

    hosts        --hosts        RR_DEMO_HOSTS        comma-separated, default h1,h2,h3
    server addr  --server-addr  RR_DEMO_SERVER_ADDR  how clients reach the broker; default: the
                                                     server's host name (lab hosts know each other
                                                     by name; give an IP where they do not)
    port         --port         RR_DEMO_PORT         default 5555
    messages     --messages     RR_DEMO_MESSAGES     per publisher, default 5
"""

import os


def setting(name, env, default):
    """Return a setting from the arg parser's extra_options, else the environment, else *default*."""
    value = getattr(extra_options, name, None)
    if value is None or value == "":
        value = os.environ.get(env) or default
    return value


HOSTS = [h.strip() for h in str(setting("hosts", "RR_DEMO_HOSTS", "h1,h2,h3")).split(",") if h.strip()]
SERVER_HOST = HOSTS[0]
CLIENT_HOSTS = HOSTS[1:] or HOSTS
SERVER_ADDR = setting("server_addr", "RR_DEMO_SERVER_ADDR", SERVER_HOST)
PORT = int(setting("port", "RR_DEMO_PORT", 5555))
MESSAGES = int(setting("messages", "RR_DEMO_MESSAGES", 5))
TIMEOUT = 300                      # seconds any client waits for the others before giving up
TOTAL = MESSAGES * len(CLIENT_HOSTS)

PROGRAM = "pubsub.py"              # relative: shipped into, and run from, each base_dir
SHIP = {"demo/pubsub.py": PROGRAM}  # local source (relative to this file) -> destination

server = Component()
server.name = "server"
server.host = SERVER_HOST
server.executable = PROGRAM
server.args = ["broker", "--port", PORT, "--lifetime", 3600]
server.files = dict(SHIP)
server.start_index = 1
config.add_component(server)

# One template, changed and added once per host: add_component stores a deep copy.
client = Component()
client.executable = PROGRAM
client.files = dict(SHIP)
for host in CLIENT_HOSTS:
    client.host = host
    client.name = "subscriber-" + host
    client.args = ["subscribe", SERVER_ADDR, PORT, "--expect", TOTAL, "--out", "received.txt",
                   "--timeout", TIMEOUT]
    client.start_index = 2
    config.add_component(client)

    client.name = "publisher-" + host
    client.args = ["publish", SERVER_ADDR, PORT, "--count", MESSAGES, "--from", client.name,
                   "--subscribers", len(CLIENT_HOSTS), "--timeout", TIMEOUT]
    client.start_index = 3
    config.add_component(client)

checker = Component()
checker.name = "checker"
checker.host = HOSTS[-1]
checker.executable = PROGRAM
checker.args = ["check", SERVER_ADDR, PORT, "--published", TOTAL,
                "--delivered", TOTAL * len(CLIENT_HOSTS), "--timeout", TIMEOUT]
checker.files = dict(SHIP)
checker.start_index = 4
checker.wait = True
config.add_component(checker)
