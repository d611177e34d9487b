"""The admin API (aiohttp): routes, auth, the flow feed, OpenAPI and Prometheus metrics."""
