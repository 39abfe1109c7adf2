"""`python -m zfkernels bench|visualize|info` (torchrun too): the `zfkernels` command."""

import sys

from .cli import main

sys.exit(main())
