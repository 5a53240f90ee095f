"""`python -m mishards`."""

import sys

from mishards.main import main

sys.exit(main())
