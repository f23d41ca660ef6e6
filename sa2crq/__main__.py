"""`python -m sa2crq` = the `sa2crq` command."""
import sys

from sa2crq.cli import main

sys.exit(main())
