"""Micro-benchmarks of the microseg datapath (`make bench`, or `python -m bench`).

Runs the TC classifier on crafted frames with BPF_PROG_TEST_RUN and reports nanoseconds per
packet next to an empty classifier (the floor): session hits, new flows at 10 to 100,000 rules,
cost against the number of rule shapes, and the time to apply a large policy set.
"""
