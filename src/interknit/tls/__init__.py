"""TLS for every wire: certificate files checked at load, server contexts chosen by SNI and
reloaded in place, client contexts for upstreams, health checks and the registry API, and a
sans-IO reader of the ClientHello for routing by SNI without terminating.

A utility, as ``http1`` is: the proxy, the health checker, the registry API, the client and
the CLI all use it, and it imports none of them.
"""
