"""`python3 -m tools.records {pack,verify,audit,compare} ...`: the command line of tools/records/cli.py."""

import sys

from tools.records.cli import main

sys.exit(main())
