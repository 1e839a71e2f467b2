import sys

from pacsgrid.cli.main import main

sys.exit(main())
