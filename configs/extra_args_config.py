"""Config driven by extra options (see configs/arg_parser_example.py for the command line).

Starts ``extra_options.apple`` echo components on localhost, each printing the bread, the
cheese and the SSH user the arg parser recorded. Works with the muddler
configs/example_muddler.py too (which appends an argument to every component).
"""

if extra_options is None:
    raise SystemExit("this config needs -a configs/arg_parser_example.py --extra-args '...'")

template = Component()
template.host = localhost
template.executable = "/bin/echo"
template.start_index = 1
for number in range(extra_options.apple):
    template.name = "apple-%d" % number
    template.args = [extra_options.bread, extra_options.cheese, "user=" + extra_options.user]
    config.add_component(template)
