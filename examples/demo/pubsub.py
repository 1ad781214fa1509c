#!/usr/bin/env python3
"""A tiny TCP publish/subscribe system: the programs of the example experiment.

One file, four roles, so a config ships a single script to every host:

* ``broker``    -- accepts clients; forwards each published message to the subscribers of its topic.
* ``subscribe`` -- subscribes to a topic, prints and records messages, exits 0 after ``--expect`` of them.
* ``publish``   -- waits until ``--subscribers`` subscribers are there, publishes ``--count`` messages.
* ``check``     -- polls the broker's counters; exits 0 once the expected traffic has gone through.

The line protocol (UTF-8, one request per line): ``PING`` -> ``PONG``; ``SUB topic`` ->
``OK``, then ``MSG topic text`` lines; ``PUB topic text`` -> ``OK``; ``STATS`` -> ``STATS {json}``.
Clients retry connecting until ``--timeout`` so start order races between hosts do not
matter. Standard library only, Python 3.6 syntax: lab hosts have nothing but python3.
"""

import argparse
import json
import socket
import socketserver
import sys
import threading
import time

POLL_SECONDS = 0.2


class Broker(socketserver.ThreadingTCPServer):
    """The broker's state: subscribers per topic and traffic counters."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address):
        socketserver.ThreadingTCPServer.__init__(self, address, Handler)
        self.lock = threading.Lock()
        self.topics = {}
        self.published = 0
        self.delivered = 0

    def stats(self):
        """Return the counters as a dict."""
        with self.lock:
            return {"subscribers": sum(len(s) for s in self.topics.values()),
                    "published": self.published, "delivered": self.delivered}

    def publish(self, topic, text):
        """Send *text* to every subscriber of *topic*."""
        with self.lock:
            self.published += 1
            targets = list(self.topics.get(topic, ()))
        for handler in targets:
            if handler.send("MSG %s %s" % (topic, text)):
                with self.lock:
                    self.delivered += 1


class Handler(socketserver.StreamRequestHandler):
    """One client connection."""

    def setup(self):
        socketserver.StreamRequestHandler.setup(self)
        self.write_lock = threading.Lock()
        self.closed = False
        self.subscribed = []

    def send(self, line):
        """Write one line to the client; return False if the client is gone."""
        with self.write_lock:
            if self.closed:
                return False
            try:
                self.wfile.write((line + "\n").encode("utf-8"))
                self.wfile.flush()
                return True
            except OSError:
                return False

    def handle(self):
        broker = self.server
        for raw in self.rfile:
            words = raw.decode("utf-8", "replace").rstrip("\r\n").split(" ", 2)
            verb = words[0].upper()
            if verb == "PING":
                self.send("PONG")
            elif verb == "SUB" and len(words) >= 2:
                with broker.lock:
                    broker.topics.setdefault(words[1], set()).add(self)
                self.subscribed.append(words[1])
                self.send("OK")
            elif verb == "PUB" and len(words) == 3:
                broker.publish(words[1], words[2])
                self.send("OK")
            elif verb == "STATS":
                self.send("STATS " + json.dumps(broker.stats(), sort_keys=True))
            elif verb == "QUIT":
                break
            else:
                self.send("ERR unknown request")

    def finish(self):
        with self.server.lock:
            for topic in self.subscribed:
                self.server.topics.get(topic, set()).discard(self)
        # Close under the write lock, so a delivery from another client's thread
        # either completes (and is counted) or sees the stream closed.
        with self.write_lock:
            self.closed = True
            socketserver.StreamRequestHandler.finish(self)


class Client(object):
    """A line-protocol connection to the broker."""

    def __init__(self, host, port, timeout):
        self.sock = connect(host, port, timeout)
        self.rfile = self.sock.makefile("rb")

    def request(self, line):
        """Send one request and return the first reply line."""
        self.sock.sendall((line + "\n").encode("utf-8"))
        return self.read()

    def read(self):
        """Return the next line from the broker ('' when it closed the connection)."""
        return self.rfile.readline().decode("utf-8", "replace").rstrip("\r\n")

    def stats(self):
        """Return the broker's counters."""
        reply = self.request("STATS")
        if not reply.startswith("STATS "):
            raise RuntimeError("unexpected reply to STATS: %r" % reply)
        return json.loads(reply[len("STATS "):])


def connect(host, port, timeout):
    """Connect to the broker, retrying until *timeout* seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=10)
            sock.settimeout(None)
            return sock
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise SystemExit("cannot reach broker %s:%s: %s" % (host, port, exc))
            time.sleep(POLL_SECONDS)


def say(text):
    """Print one line at once (the screen window and the harness see it immediately)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_broker(opts):
    """Serve until --lifetime seconds have passed."""
    broker = Broker((opts.bind, opts.port))
    say("broker listening on %s:%d" % broker.server_address[:2])
    threading.Thread(target=broker.serve_forever, daemon=True).start()
    time.sleep(opts.lifetime)  # the broker's whole job is to stay up this long
    broker.shutdown()
    return 0


def run_subscriber(opts):
    """Receive --expect messages on --topic, recording them in --out."""
    client = Client(opts.server, opts.port, opts.timeout)
    client.sock.settimeout(opts.timeout)
    if client.request("SUB " + opts.topic) != "OK":
        return 1
    say("subscribed to %s on %s:%d" % (opts.topic, opts.server, opts.port))
    received = 0
    with open(opts.out, "a") as out:
        while received < opts.expect:
            try:
                line = client.read()
            except socket.timeout:
                say("timed out after %d of %d messages" % (received, opts.expect))
                return 1
            if not line:
                say("broker closed the connection after %d messages" % received)
                return 1
            received += 1
            say(line)
            out.write(line + "\n")
            out.flush()
    say("received all %d messages" % received)
    return 0


def run_publisher(opts):
    """Wait for --subscribers subscribers, then publish --count messages."""
    client = Client(opts.server, opts.port, opts.timeout)
    deadline = time.monotonic() + opts.timeout
    while client.stats()["subscribers"] < opts.subscribers:
        if time.monotonic() >= deadline:
            say("gave up waiting for %d subscribers" % opts.subscribers)
            return 1
        time.sleep(POLL_SECONDS)
    for number in range(1, opts.count + 1):
        text = "%s #%d" % (opts.sender, number)
        if client.request("PUB %s %s" % (opts.topic, text)) != "OK":
            return 1
        say("published " + text)
    return 0


def run_checker(opts):
    """Exit 0 once the broker has seen the expected traffic, 1 on timeout."""
    client = Client(opts.server, opts.port, opts.timeout)
    if client.request("PING") != "PONG":
        say("broker did not answer PING")
        return 1
    deadline = time.monotonic() + opts.timeout
    while True:
        stats = client.stats()
        if stats["published"] >= opts.published and stats["delivered"] >= opts.delivered:
            say("OK: broker answered; %s" % json.dumps(stats, sort_keys=True))
            return 0
        if time.monotonic() >= deadline:
            say("FAILED: expected %d published / %d delivered, broker has %s"
                % (opts.published, opts.delivered, json.dumps(stats, sort_keys=True)))
            return 1
        time.sleep(POLL_SECONDS)


def parser():
    """Build the command-line parser for the four roles."""
    top = argparse.ArgumentParser(prog="pubsub.py", description=__doc__.split("\n")[0])
    roles = top.add_subparsers(dest="role")
    broker = roles.add_parser("broker", help="run the broker")
    broker.add_argument("--port", type=int, default=5555)
    broker.add_argument("--bind", default="0.0.0.0")
    broker.add_argument("--lifetime", type=float, default=3600.0, help="seconds to serve")
    for name in ("subscribe", "publish", "check"):
        role = roles.add_parser(name)
        role.add_argument("server")
        role.add_argument("port", type=int)
        role.add_argument("--timeout", type=float, default=300.0)
        role.add_argument("--topic", default="demo")
        if name == "subscribe":
            role.add_argument("--expect", type=int, required=True)
            role.add_argument("--out", default="received.txt")
        elif name == "publish":
            role.add_argument("--count", type=int, default=5)
            role.add_argument("--from", dest="sender", default=socket.gethostname())
            role.add_argument("--subscribers", type=int, default=1)
        else:
            role.add_argument("--published", type=int, required=True)
            role.add_argument("--delivered", type=int, required=True)
    return top


def main(argv=None):
    """Run the role named on the command line."""
    opts = parser().parse_args(argv)
    runners = {"broker": run_broker, "subscribe": run_subscriber,
               "publish": run_publisher, "check": run_checker}
    if opts.role not in runners:
        parser().error("choose a role: broker, subscribe, publish or check")
    return runners[opts.role](opts)


if __name__ == "__main__":
    sys.exit(main())
