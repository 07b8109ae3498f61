"""``python -m sigproxy``."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while still importing: stop quietly
    sys.exit(130)

sys.exit(main())
