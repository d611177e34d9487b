"""The fleet (contract §7): many agents, one policy through Kafka.

`records` holds what goes on the topics (a policy generation, an agent's status) and how it
is encoded; `topic` reads and writes them (the transactional policy writer, the policy
reader an agent follows, the status publisher and the fleet view). docs/fleet.md explains
the design.
"""
