import sys

from monai_fedpriv.cli import main

sys.exit(main())
