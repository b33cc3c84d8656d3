from grokserve.cli import main

raise SystemExit(main())
