# A TA3-style muddler written for SPAR's Python 2 remote_runner: muddle(config,
# options), clients spread over the hosts of a host-info file with integer
# division feeding range(), xrange, iteritems, has_key and print >>.
import copy
import os
import sys

def muddle(config, options):
  server = None
  client = None
  for c in config.all_components():
    if c.name == "server":
      server = c
    elif c.name == "client":
      client = c
  assert server and client, "config needs a server and a client"

  HOST_INFO = {}
  for line in open("host_info.txt"):
    items = line.strip().split(' ')
    HOST_INFO[items[0]] = {"num_cores" : int(items[1]), "model" : items[2]}
  CLIENT_HOSTS = sorted([h for h, info in HOST_INFO.iteritems() if h != server.host])
  NUM_CLIENTS = extra_options.clients
  NUM_SLAVE_HARNESSES = min(len(CLIENT_HOSTS), NUM_CLIENTS)
  NUM_CLIENTS_PER_HOST = [NUM_CLIENTS/NUM_SLAVE_HARNESSES]*NUM_SLAVE_HARNESSES
  for i in xrange(NUM_CLIENTS % NUM_SLAVE_HARNESSES):
    NUM_CLIENTS_PER_HOST[i] += 1

  config.clear_components()
  server.files.update(util.recursive_files_dict("queries", "queries"))
  server.files.update(util.recursive_files_dict("mods", "mods"))
  config.add_component(server)
  clients_processed = 0
  for i in range(NUM_SLAVE_HARNESSES):
    for j in range(NUM_CLIENTS_PER_HOST[i]):
      c = copy.deepcopy(client)
      c.name = "client-%d" % clients_processed
      c.host = CLIENT_HOSTS[i]
      c.start_index = 2
      c.wait = True
      c.args = [arg.replace("%n", str(clients_processed)) for arg in client.args]
      config.add_component(c)
      clients_processed += 1
  if not HOST_INFO.has_key(server.host):
    print >>sys.stderr, "server host missing from the host info file"
    sys.exit(1)
  print "  ", clients_processed, "clients on", len(CLIENT_HOSTS), "hosts"
