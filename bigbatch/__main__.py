"""`python -m bigbatch ...` (what torchrun runs: `torchrun ... -m bigbatch train CONFIG`)."""

import sys

from bigbatch.cli import main

sys.exit(main())
