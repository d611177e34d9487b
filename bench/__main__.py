"""`python -m bench`: the datapath micro-benchmarks (bench.datapath), the admin API benchmarks
against a real agent (bench.api), flow events to Kafka (bench.events), then microseg side by
side with nftables and with no filter on real traffic (bench.compare); `--only SUITE` runs one."""

from bench.datapath import main

raise SystemExit(main())
