"""``python -m torchmhc``: the ``torchmhc`` command line (see ``torchmhc.cli``)."""

import sys

from torchmhc.cli import main

sys.exit(main())
