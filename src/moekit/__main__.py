import sys

from moekit.apps.cli.main import main

sys.exit(main())
