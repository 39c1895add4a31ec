"""`python -m hugepaged`."""

from hugepaged.cli import main

raise SystemExit(main())
