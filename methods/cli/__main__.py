"""`python -m vdistill.methods.cli ...` (what torchrun runs): the `vdistill` command."""

import sys

from vdistill.methods.cli.main import main

sys.exit(main())
