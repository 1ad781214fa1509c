# A SPAR-era config, written the old way: a template component mutated in a
# loop, num_cores set (TA3 style), wait never set, the name "client" reused
# on several hosts, 'localhost' as a string, and copy imported by the config.
import copy

main = Component()
main.name = 'server'
main.base_dir = '/home/me/subdir'
main.executable = 'script.sh'
main.args = ['-a', 'something', '-b', 'more']
main.files = util.recursive_files_dict('dir1', '.')
main.files['script.sh'] = 'script.sh'
main.host = '10.0.0.1'
main.num_cores = 4
main.start_index = 1
config.add_component(main)

client = copy.deepcopy(main)
client.name = 'client'
client.base_dir = None
client.num_cores = 1
for i in range(2, 5):
    client.host = '10.0.0.%d' % i
    client.args = ['--id', i]
    client.start_index = 2
    config.add_component(client)

local = Component()
local.name = 'Local thing'
local.host = 'localhost'
local.executable = 'script.sh'
local.args = ['I run locally']
local.start_index = 5
config.add_component(local)
