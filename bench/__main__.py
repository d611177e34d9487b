"""`python -m bench`: the datapath micro-benchmarks (bench.datapath), then the admin API
benchmarks against a real agent (bench.api); `--only datapath|api` runs one of them."""

from bench.datapath import main

raise SystemExit(main())
