import sys

from layerprune.cli import main

sys.exit(main())
