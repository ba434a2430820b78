"""`python -m dist_gru ...` is the same as the `dist-gru` command."""

import sys

from dist_gru.cli import main

sys.exit(main())
