"""`python -m jaxalign ...` is the `jaxalign` command."""

import sys

from jaxalign.cli import main

sys.exit(main())
