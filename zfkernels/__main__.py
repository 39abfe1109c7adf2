"""`python -m zfkernels bench|info`: the same command as the `zfkernels` entry point."""

import sys

from .cli import main

sys.exit(main())
