"""`python -m tasks.chat.gorender build`: build the cached Ollama template renderer."""

import sys

from tasks.chat.gorender import main

sys.exit(main())
