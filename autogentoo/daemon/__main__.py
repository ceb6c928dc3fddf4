import sys

from autogentoo.daemon.main import main

sys.exit(main())
