from cellseg.cli import main

raise SystemExit(main())
