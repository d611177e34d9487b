"""The demo lab: network namespaces joined by a veth pair, and traffic through them."""
