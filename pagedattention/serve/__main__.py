"""``python -m pagedattention.serve``: the same options as ``pagedattention serve``."""
import sys

from .command import main

sys.exit(main())
