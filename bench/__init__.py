"""The microseg benchmarks (`make bench`, or `python -m bench`).

bench.__main__ runs the suites in order and writes their results: bench.datapath (the TC
classifier on crafted frames with BPF_PROG_TEST_RUN: ns per packet next to an empty classifier,
session hits, new flows at 10 to 100,000 rules, cost against the number of rule shapes, the time
to apply a large set), bench.api (the admin API against a real agent: bench.agentproc,
bench.apidocs, bench.apisplit, bench.apireport), bench.events (flow events to Kafka, a broker
of its own from bench.kafkabroker, which the tests use too) and bench.compare (microseg side by
side with nftables and with no filter, on real traffic in a lab of its own: bench.lab,
bench.workloads, bench.nft, bench/nettool.c). bench.common holds what they share: BenchError
and the options.
"""
