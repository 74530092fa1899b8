import sys

from hxtrain.cli import main

sys.exit(main())
