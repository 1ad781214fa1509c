# A campaign arg parser written for SPAR's Python 2 remote_runner (not valid Python 3).
import argparse
import getpass
import logging

LOGGER = logging.getLogger(__name__)

def parse_args(extra_args, ssh_user):
  if not ssh_user:
    LOGGER.warning('--user was not defined; using current user for default '
                   'remote destinations')
    ssh_user = getpass.getuser()
  parser = argparse.ArgumentParser('py2 campaign remote-runner options')
  parser.add_argument('-t', '--test_case', dest = 'test_case', required = True)
  parser.add_argument('--remote-base', dest = 'remote_base',
      default = '/home/%s/spar-testing' % ssh_user)
  parser.add_argument('--clients', dest = 'clients', type = int, default = 4)
  extra_options = parser.parse_args(extra_args.split())
  if not extra_options.__dict__.has_key('user'):
    extra_options.user = ssh_user
  print "Test case %s for user %s" % (extra_options.test_case, extra_options.user)
  LOGGER.info('Remote results will be stored in %s', extra_options.remote_base)
  return extra_options
