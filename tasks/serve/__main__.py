"""`python -m tasks.serve stop <record.json|pid>`: stop a server kept running by the serve stage."""

import sys

from tasks.serve.stage import main

sys.exit(main())
