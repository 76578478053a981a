from wsnic.cli import main

raise SystemExit(main())
