import sys

from gnlm.cli import main

sys.exit(main())
