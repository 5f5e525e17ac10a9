import sys

from pgvpn_agent.cli import main

sys.exit(main())
