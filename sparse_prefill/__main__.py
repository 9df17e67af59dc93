"""``python -m sparse_prefill``: the ``sparse-prefill`` command (see ``sparse_prefill.cli``)."""

import sys

from sparse_prefill.cli import main

sys.exit(main())
