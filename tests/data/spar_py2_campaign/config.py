# A campaign config written for SPAR's Python 2 remote_runner: a template
# component copied per role, host data read from a file next to the config,
# string.join, integer division, dict iteration and print statements.
import copy
import string

HOST_INFO_FILE = "host_info.txt"

HOSTS = {}
for line in open(HOST_INFO_FILE):
  items = string.split(line.strip(), ' ')
  HOSTS[items[0]] = int(items[1])

base_component = Component()
base_component.start_index = 1
base_component.executable = "report.sh"
base_component.base_dir = extra_options.remote_base + "/bin"
base_component.files = {"report.sh" : "report.sh"}

server = copy.deepcopy(base_component)
server.name = "server"
server.host = sorted(HOSTS.keys())[0]
server.args = ["server", extra_options.test_case]
server.num_cores = HOSTS[server.host] / 2
config.add_component(server)

client = copy.deepcopy(base_component)
client.name = "client"
# the muddler puts clients on real hosts
client.host = "TBD"
client.args = ["client-%n", string.join([extra_options.test_case, "x"], "-")]
client.num_cores = 1
config.add_component(client)

for host, cores in HOSTS.iteritems():
  print "host", host, "has", cores, "cores"
