from kvrouter.cli import main

raise SystemExit(main())
