"""``python -m pagedattention``: the same command line as the ``pagedattention`` script."""
import sys

from .cli import main

sys.exit(main())
