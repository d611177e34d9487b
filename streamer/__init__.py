"""microseg: eBPF microsegmentation with an asyncio event-streaming control plane."""

__version__ = "0.1.0"
