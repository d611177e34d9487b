"""The agent: the process that loads the classifier, keeps the policy, runs the event pipeline
and serves the API (service), and the pressure monitor that watches its maps (pressure)."""
