"""The portable runner's entry point (deploy/portable.spec): `python -m shepherd_runner`.

`/opt/shepherd-runner/shepherd-runner [serve|hook|--help|--version]` runs
`shepherd_runner.main` as the module does, once the bootloader's own
variables are out of the environment that the runner hands to its children.
"""

import os
import sys

import shepherd_runner

shepherd_runner.unfreeze_environ(os.environ)
sys.exit(shepherd_runner.main())
