from glmtune.cli import main

raise SystemExit(main())
