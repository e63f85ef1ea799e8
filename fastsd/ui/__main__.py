"""python -m fastsd.ui DEPLOYMENT_DIR: the page as a child of the deployment's supervisor."""
import sys

from .server import main

sys.exit(main())
