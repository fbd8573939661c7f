"""``python -m ttsstream``: same as the ``ttsstream`` command."""

import sys

from ttsstream.cli import main

sys.exit(main())
