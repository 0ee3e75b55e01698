from autotune.tune import main

raise SystemExit(main())
