"""`python -m bench`: the datapath micro-benchmarks (see bench.datapath)."""

from bench.datapath import main

raise SystemExit(main())
