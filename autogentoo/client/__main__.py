import sys

from autogentoo.client.main import main

sys.exit(main())
